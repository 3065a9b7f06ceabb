"""The worker process: one warm engine on one device, fed batches over a pipe.

Started by the supervisor with the ``spawn`` method. It loads the model once, reports
:class:`ReadyMsg`, then loops: launch every batch it receives (up to ``depth`` on the
device at once, so the device never waits on the parent), send each result when its
copy has finished, and let a side thread send heartbeats. The heartbeat names the batch
on the device and since when, so the parent can also enforce a per-batch deadline: a
thread that keeps ticking proves nothing about a hung kernel.

Test-only faults: the spec's fault plan (empty in production) makes the worker crash,
hang, or raise an OOM or a sticky CUDA error on one record; see :mod:`vnpd.faults`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

import structlog

from vnpd.faults import FaultPlan
from vnpd.workers.protocol import (BatchMsg, ErrorMsg, HeartbeatMsg, PingMsg, ReadyMsg,
                                   ResultMsg, StopMsg, WorkerSpec)
from vnpd.workers.wire import recv_message, send_message, widen

log = structlog.get_logger()

DEPTH = 2  # batches launched on the device at once
SIMULATED_MAX_TOKENS = 131072  # what a 3B model chooses on an H200 (MAX_AUTO_TOKENS)
STICKY_MARKERS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                  "CUDA error", "misaligned address", "an illegal instruction")


class _Channel:
    """The worker's end of the pipe; sends are serialised (heartbeat thread + main loop):
    the lock covers a whole frame, header and buffers."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, msg: Any) -> None:
        with self.lock:
            send_message(self.conn, msg)


class _State:
    def __init__(self) -> None:
        self.batches_done = 0
        self.busy_batch: int | None = None
        self.busy_since: float | None = None
        self.ping_echo: float | None = None
        self.stop = threading.Event()


def _heartbeats(channel: _Channel, state: _State, interval: float) -> None:
    while not state.stop.wait(interval):
        try:
            channel.send(HeartbeatMsg(os.getpid(), time.time(), state.batches_done,
                                      state.busy_batch, state.busy_since, state.ping_echo))
        except (OSError, EOFError):
            return  # parent gone; the main loop notices too


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _is_sticky(exc: BaseException) -> bool:
    return any(m in str(exc) for m in STICKY_MARKERS)


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """Entry point of the spawned process. Exits 0 after StopMsg or when the parent goes."""
    prepare_worker_process(spec)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    widen(conn)
    channel = _Channel(conn)
    state = _State()
    started = time.monotonic()
    try:
        started = time.monotonic()
        engine = _simulated_engine(spec) if spec.simulate_dim else load_engine(spec)
    except BaseException as exc:
        log.error("worker_load_failed", error=str(exc))
        channel.send(ErrorMsg("fatal", f"model load failed: {exc}",
                              traceback=traceback.format_exc()))
        os._exit(3)
    channel.send(ReadyMsg(os.getpid(), spec.device, engine.embed_dim, engine.layer,
                          engine.attention_backend, engine.max_tokens,
                          time.monotonic() - started, engine.layers))
    threading.Thread(target=_heartbeats, args=(channel, state, spec.heartbeat_interval_s),
                     daemon=True, name="heartbeat").start()
    faults = FaultPlan(worker=spec.faults)
    log.info("worker_ready", max_tokens=engine.max_tokens, attention=engine.attention_backend,
             gemm=getattr(getattr(engine, "packed", engine), "gemm", None))
    _serve(conn, channel, state, engine, faults, spec.residues)
    state.stop.set()
    log.info("worker_exit", batches_done=state.batches_done)


def prepare_worker_process(spec: WorkerSpec) -> None:
    """What a worker process (local or Ray actor) does first: its environment (the
    devices it sees, before anything touches CUDA), its logging, its heap."""
    os.environ.update(spec.env)
    from vnpd.log import configure_logging
    from vnpd.malloc import pin_mmap_threshold

    configure_logging(spec.log_format, spec.log_level, worker=spec.worker_id,
                      device=spec.device, pid=os.getpid())
    pin_mmap_threshold()


def load_engine(spec: WorkerSpec) -> Any:
    """The warm engine of a worker (this process, or a Ray actor): loaded and warmed up
    on the one device the worker sees (``cuda:0``, or the CPU)."""
    import torch

    from vnpd.compute.engine import Engine
    from vnpd.log import route_library_loggers

    route_library_loggers()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = "cpu" if spec.device == "cpu" else "cuda:0"  # we see only our GPU
    engine = Engine.load(spec.checkpoint, device=device, dtype=spec.dtype, layer=spec.layer,
                         layers=spec.layers or None, truncation=spec.truncation,
                         max_tokens=spec.max_tokens, attention=spec.attention,
                         compile_mode=spec.compile_mode)
    engine.warmup()
    return engine


def _simulated_engine(spec: WorkerSpec) -> Any:
    """Test-only (``VNPD_TEST_SIMULATE_DIM``): rows from the tokens, no model, no torch.
    Its budget is the configured one, else that of a 3B model on an H200."""
    from vnpd.compute.simulated import SimulatedEngine

    log.warning("worker_simulated", dim=spec.simulate_dim)
    return SimulatedEngine(spec.simulate_dim, spec.max_tokens or SIMULATED_MAX_TOKENS,
                           layer=max(spec.layer, 0))


def error_kind(exc: BaseException, batch_id: int | None) -> str:
    """How a worker treats a failure: "oom" (split the batch, stay up), "fatal" (a sticky
    CUDA error, or no batch to blame: the worker must exit) or "batch" (this batch only)."""
    if _is_oom(exc):
        return "oom"
    if _is_sticky(exc) or batch_id is None:
        return "fatal"
    return "batch"


def _serve(conn: Connection, channel: _Channel, state: _State, engine: Any,
           faults: FaultPlan, residues: str | None = None) -> None:
    """Serve batches until StopMsg; ``residues``: the dtype of per-residue rows, if any."""
    pending: deque[tuple[BatchMsg, Any, float]] = deque()
    stopping = False

    def finish_oldest() -> None:
        msg, result, started = pending.popleft()
        rows = result.result()
        residues = result.residues()
        channel.send(ResultMsg(msg.batch_id, rows, started, time.time(), residues,
                               None if residues is None else result.lengths))
        state.batches_done += 1
        state.busy_batch, state.busy_since = ((pending[0][0].batch_id, pending[0][2])
                                              if pending else (None, None))

    while True:
        if pending and (stopping or len(pending) >= DEPTH or not conn.poll()):
            try:
                finish_oldest()
            except BaseException as exc:
                _fail(channel, exc, None)
            continue
        if stopping:
            return
        try:
            msg = recv_message(conn)
        except (EOFError, OSError):
            log.warning("parent_gone")
            return
        if isinstance(msg, StopMsg):
            stopping = True
        elif isinstance(msg, PingMsg):
            state.ping_echo = msg.sent
        elif isinstance(msg, BatchMsg):
            launched = time.time()
            if not pending:
                state.busy_batch, state.busy_since = msg.batch_id, launched
            try:
                faults.inject(msg.batch.ids)
                result = engine.submit(msg.batch, residues=msg.batch.residues or residues)
            except BaseException as exc:
                _fail(channel, exc, msg.batch_id)
                state.busy_batch, state.busy_since = ((pending[0][0].batch_id, pending[0][2])
                                                      if pending else (None, None))
                continue
            pending.append((msg, result, launched))


def _fail(channel: _Channel, exc: BaseException, batch_id: int | None) -> None:
    """Report a failed batch; exit on errors that poison the device context."""
    kind = error_kind(exc, batch_id)
    if kind == "oom":
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("batch_oom", batch=batch_id, error=str(exc))
        channel.send(ErrorMsg("oom", str(exc), batch_id))
        return
    if kind == "fatal":
        # An illegal memory access poisons the CUDA context for good: never reuse it.
        log.error("worker_fatal", batch=batch_id, error=str(exc))
        channel.send(ErrorMsg("fatal", str(exc), batch_id, traceback.format_exc()))
        os._exit(4)
    log.error("batch_failed", batch=batch_id, error=str(exc))
    channel.send(ErrorMsg("batch", str(exc), batch_id, traceback.format_exc()))

