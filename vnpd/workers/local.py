"""The local worker pool: one worker process per device, supervised over pipes.

Like gunicorn's arbiter, the periodic :meth:`LocalPool.check_workers` is split by reason:
``reap_workers`` (collect exits), ``murder_workers`` (heartbeat silence, batch past its
deadline) and ``manage_workers`` (restart with backoff; mark a device degraded when it
exhausts its crash budget). Pipe I/O runs in two small threads per worker, so a large
batch never blocks the event loop; messages are handed to the loop with
``call_soon_threadsafe``.

The pool owns no job state. It reports what became of each batch as an outcome
(:mod:`vnpd.workers.pool`): results, failed batches, and batches lost with a dead worker,
which the scheduler requeues. Dispatch is pull-based: :meth:`LocalPool.dispatch` asks a
batch source for a batch for every ready worker with free credit, so a faster device
takes more work.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import structlog

from vnpd.workers.pool import (BatchDone, BatchesLost, BatchFailed, BatchSource, Dispatch,
                               ModelInfo, WorkerPool)
from vnpd.workers.process import worker_main
from vnpd.workers.restarts import Supervision
from vnpd.workers.protocol import (BatchMsg, ErrorMsg, HeartbeatMsg, PingMsg, ReadyMsg,
                                   ResultMsg, StopMsg, WorkerSpec)
from vnpd.workers.wire import recv_message, send_message, widen

log = structlog.get_logger()

KILL_GRACE_S = 5.0
START_TIMEOUT_S = 900.0  # loading a 3B model and compiling kernels takes minutes on a cold disk


@dataclass
class WorkerHandle:
    """The parent's view of one worker slot (it survives restarts of the process)."""

    spec: WorkerSpec
    credit: int
    state: str = "stopped"  # starting | ready | stopping | stopped | dead | degraded
    process: Any = None
    conn: Connection | None = None
    outbox: "queue.Queue[Any]" = field(default_factory=queue.Queue)
    pid: int | None = None
    started_at: float = 0.0
    last_heartbeat: float = 0.0
    batches_done: int = 0
    max_tokens: int = 0
    attention_backend: str = ""
    embed_dim: int = 0
    layer: int = -1
    inflight: dict[int, Dispatch] = field(default_factory=dict)
    busy_batch: int | None = None
    busy_since: float | None = None  # worker wall clock
    crashes: deque[float] = field(default_factory=deque)
    restarts: int = 0
    next_start_at: float = 0.0
    kill_reason: str | None = None
    kill_deadline: float | None = None
    last_exit: int | None = None

    @property
    def device(self) -> str:
        return self.spec.device

    def describe(self) -> dict[str, Any]:
        return {"worker": self.spec.worker_id, "device": self.device, "pid": self.pid,
                "state": self.state, "last_heartbeat_age_s":
                    round(time.monotonic() - self.last_heartbeat, 1) if self.last_heartbeat else None,
                "batches_done": self.batches_done, "inflight": len(self.inflight),
                "restarts": self.restarts, "max_tokens": self.max_tokens,
                "attention_backend": self.attention_backend}


class LocalPool(WorkerPool):
    """Worker processes on this host, one per configured device."""

    def __init__(self, specs: list[WorkerSpec], supervision: Supervision, *,
                 credit: int = 3, metrics: Any = None) -> None:
        super().__init__(supervision, metrics)
        self.workers = [WorkerHandle(spec, credit) for spec in specs]
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ctx = mp.get_context("spawn")

    # Lifecycle ----------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        for handle in self.workers:
            self._spawn(handle)

    def all_ready(self) -> bool:
        return all(h.state in ("ready", "degraded") for h in self.workers) and \
            any(h.state == "ready" for h in self.workers)

    def all_degraded(self) -> bool:
        return all(h.state == "degraded" for h in self.workers)

    def healthy(self, fresh_s: float) -> bool:
        """A ready worker whose last message is younger than ``fresh_s``, or one being
        (re)started: reloading a model after a crash is recovery, not a hang. Ready
        workers that all went silent (wedged) make this False."""
        now = time.monotonic()
        return any((h.state == "ready" and now - h.last_heartbeat < fresh_s)
                   or (h.state == "starting" and now - h.started_at < START_TIMEOUT_S)
                   or h.state == "dead"
                   for h in self.workers)

    async def stop(self, timeout_s: float) -> None:
        """Let workers finish what they hold, then stop them; kill any left at the deadline."""
        for h in self.workers:
            if h.state in ("ready", "starting"):
                h.state = "stopping"
                h.outbox.put(StopMsg())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(
                h.process is not None and h.process.is_alive() for h in self.workers):
            for h in self.workers:
                # A worker that stopped answering will not drain: don't wait for it.
                if h.process is not None and h.process.is_alive() and h.kill_deadline is None \
                        and time.monotonic() - h.last_heartbeat > self.supervision.heartbeat_timeout_s:
                    self.kill(h, "unresponsive_at_shutdown")
                if h.kill_deadline is not None and time.monotonic() >= h.kill_deadline:
                    h.process.kill()
            await asyncio.sleep(0.1)
        for h in self.workers:
            if h.process is not None and h.process.is_alive():
                log.warning("worker_kill_at_shutdown", worker=h.spec.worker_id, pid=h.pid)
                h.process.kill()
                h.process.join(5)
            self._close(h)
        lost = [d for h in self.workers for d in h.inflight.values()]
        if lost:
            self._report(BatchesLost(lost, "shutdown"))
        for h in self.workers:
            h.inflight.clear()

    def _spawn(self, handle: WorkerHandle) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=worker_main, args=(child_conn, handle.spec),
                                    name=f"vnpd-worker-{handle.spec.worker_id}", daemon=True)
        process.start()
        child_conn.close()
        widen(parent_conn)
        handle.process, handle.conn, handle.pid = process, parent_conn, process.pid
        handle.state, handle.started_at = "starting", time.monotonic()
        handle.last_heartbeat = time.monotonic()
        handle.outbox = queue.Queue()
        handle.kill_reason = handle.kill_deadline = None
        handle.busy_batch = handle.busy_since = None
        threading.Thread(target=self._reader, args=(handle, parent_conn, process.pid),
                         daemon=True, name=f"vnpd-rx-{handle.spec.worker_id}").start()
        threading.Thread(target=self._writer, args=(handle.outbox, parent_conn),
                         daemon=True, name=f"vnpd-tx-{handle.spec.worker_id}").start()
        log.info("worker_started", worker=handle.spec.worker_id, device=handle.device,
                 pid=process.pid)

    # Pipe threads -------------------------------------------------------------------
    def _reader(self, handle: WorkerHandle, conn: Connection, pid: int) -> None:
        assert self.loop is not None
        while True:
            try:
                msg = recv_message(conn)
            except (EOFError, OSError):
                return  # reap_workers notices the exit
            except Exception as exc:  # a bad frame (FrameError) or message: drop the worker
                log.error("worker_bad_message", pid=pid, error=str(exc))
                return
            self.loop.call_soon_threadsafe(self._on_message, handle, pid, msg)

    @staticmethod
    def _writer(outbox: "queue.Queue[Any]", conn: Connection) -> None:
        while True:
            msg = outbox.get()
            if msg is None:
                return
            try:
                send_message(conn, msg)
            except (OSError, EOFError, ValueError):
                return

    # Messages -----------------------------------------------------------------------
    def _on_message(self, handle: WorkerHandle, pid: int, msg: Any) -> None:
        if pid != handle.pid:
            return  # from a process already replaced
        handle.last_heartbeat = time.monotonic()
        if isinstance(msg, HeartbeatMsg):
            handle.busy_batch, handle.busy_since = msg.busy_batch, msg.busy_since
            handle.batches_done = msg.batches_done
        elif isinstance(msg, ResultMsg):
            dispatch = handle.inflight.pop(msg.batch_id, None)
            if dispatch is not None:
                handle.batches_done += 1
                self._report(BatchDone(dispatch, msg.embeddings, handle.device,
                                       msg.finished - msg.started, msg.residues,
                                       msg.residue_counts))
                if self.metrics is not None:
                    self.metrics.batch_latency_seconds.labels(device=handle.device).observe(
                        msg.finished - msg.started)
                    self.metrics.busy_interval(handle.device, msg.started, msg.finished)
            self.changed.set()
        elif isinstance(msg, ReadyMsg):
            handle.state = "ready" if handle.state == "starting" else handle.state
            handle.max_tokens, handle.embed_dim = msg.max_tokens, msg.embed_dim
            handle.layer = msg.layer
            handle.attention_backend = msg.attention_backend
            log.info("worker_ready", worker=handle.spec.worker_id, device=handle.device,
                     pid=msg.pid, load_seconds=round(msg.load_seconds, 2),
                     max_tokens=msg.max_tokens, attention=msg.attention_backend)
            # Pack for the smallest budget any ready device chose from its memory.
            self._model_ready(ModelInfo(msg.embed_dim, msg.layer, msg.attention_backend,
                                        min(w.max_tokens for w in self.workers if w.max_tokens),
                                        msg.layers))
            self.changed.set()
        elif isinstance(msg, ErrorMsg):
            self._on_error(handle, msg)

    def _on_error(self, handle: WorkerHandle, msg: ErrorMsg) -> None:
        log.warning("worker_error", worker=handle.spec.worker_id, device=handle.device,
                    kind=msg.kind, batch=msg.batch_id, error=msg.message)
        if msg.batch_id is not None:
            dispatch = handle.inflight.pop(msg.batch_id, None)
            if dispatch is not None:
                if msg.kind == "oom":
                    # Lower this device's budget below the batch that did not fit.
                    handle.max_tokens = max(1024, min(handle.max_tokens, dispatch.tokens) // 2)
                self._report(BatchFailed(dispatch, msg.kind, msg.message))
        if msg.kind == "fatal":
            handle.kill_reason = "sticky_error" if msg.batch_id is not None else "load_failed"
        self.changed.set()

    # Dispatch -----------------------------------------------------------------------
    def dispatch(self, source: BatchSource) -> int:
        """Hand out batches to every ready worker with free credit; returns how many."""
        return self._fill_slots(self.workers, source, lambda handle, dispatch: handle.outbox.put(
            BatchMsg(dispatch.batch_id, dispatch.batch)))

    # Health -------------------------------------------------------------------------
    def check_workers(self) -> None:
        """Periodic: reap exits, kill the unresponsive, restart or degrade."""
        self.reap_workers()
        self.murder_workers()
        self.manage_workers()

    def ping_workers(self) -> None:
        for h in self.workers:
            if h.state == "ready":
                h.outbox.put(PingMsg(time.monotonic()))

    def reap_workers(self) -> None:
        for h in self.workers:
            if h.process is None or h.process.is_alive() or h.state in ("stopped", "dead",
                                                                        "degraded"):
                continue
            h.process.join(0)
            code = h.process.exitcode
            h.last_exit = code
            reason = h.kill_reason or ("exit" if code == 0 else "crash")
            expected = h.state == "stopping"
            self._close(h)
            lost = list(h.inflight.values())
            h.inflight.clear()
            if expected:
                h.state = "stopped"
                if lost:
                    self._report(BatchesLost(lost, "shutdown"))
                continue
            log.error("worker_died", worker=h.spec.worker_id, device=h.device, pid=h.pid,
                      exitcode=code, reason=reason, lost_batches=len(lost))
            if self.metrics is not None:
                self.metrics.worker_restarts_total.labels(device=h.device, reason=reason).inc()
            if lost:
                self._report(BatchesLost(lost, reason))
            self._schedule_restart(h)
            self.changed.set()

    def murder_workers(self) -> None:
        now, wall = time.monotonic(), time.time()
        for h in self.workers:
            if h.process is None or not h.process.is_alive():
                continue
            if h.kill_deadline is not None:
                if now >= h.kill_deadline:
                    h.process.kill()  # SIGKILL works on stopped (SIGSTOP) processes too
                continue
            reason = h.kill_reason
            if reason is None and h.state == "starting" and now - h.started_at > START_TIMEOUT_S:
                reason = "start_timeout"
            if reason is None and h.state == "ready" and \
                    now - h.last_heartbeat > self.supervision.heartbeat_timeout_s:
                reason = "heartbeat"
            if reason is None and h.busy_batch is not None and h.busy_since is not None:
                d = h.inflight.get(h.busy_batch)
                if d is not None and wall - h.busy_since > self.batch_deadline(d.tokens):
                    reason = "hang"
            if reason is not None:
                self.kill(h, reason)

    def kill(self, h: WorkerHandle, reason: str) -> None:
        """SIGTERM now, SIGKILL after a grace period (checked by murder_workers)."""
        log.warning("worker_kill", worker=h.spec.worker_id, device=h.device, pid=h.pid,
                    reason=reason)
        h.kill_reason = reason
        h.kill_deadline = time.monotonic() + KILL_GRACE_S
        try:
            os.kill(h.pid or 0, signal.SIGTERM)
            os.kill(h.pid or 0, signal.SIGCONT)  # a stopped process must run to see SIGTERM
        except ProcessLookupError:
            pass

    def _close(self, h: WorkerHandle) -> None:
        h.outbox.put(None)
        if h.conn is not None:
            h.conn.close()
            h.conn = None
        if h.process is not None:
            h.process.join(0)

    def _slots(self) -> list[WorkerHandle]:
        return self.workers
