"""The Ray actor of one slot: a thin wrapper around the same engine as the local worker.

:class:`EngineActor` is a plain class; :mod:`vnpd.workers.ray_pool` makes it a Ray actor
(``ray.remote(EngineActor)``), so this module imports nothing of Ray at import time. It
loads the engine with :func:`vnpd.workers.process.load_engine`, classifies failures with
:func:`vnpd.workers.process.error_kind`, and speaks the pipe protocol's messages
(:mod:`vnpd.workers.protocol`) as return values instead of over a pipe:

- ``ready()`` -> (:class:`ReadyMsg`, placement: node id, node IP, GPU ids);
- ``embed(batch_id, batch)`` -> :class:`ResultMsg`, or :class:`ErrorMsg` ("oom", "batch",
  "fatal");
- ``heartbeat()`` -> :class:`HeartbeatMsg` (the batch on the device and since when).

It is an async actor: calls interleave on its event loop while the engine runs in a
one-thread executor, so up to ``DEPTH`` batches are launched on the device at once (the
next one is already here when the device finishes one), and a heartbeat is answered while
a batch runs, or hangs. On a sticky CUDA error the actor returns the error, then exits
its process: Ray must never hand a poisoned context another batch. The test fault plan
(``spec.faults``) acts here exactly as in a worker process.
"""

from __future__ import annotations

import asyncio
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from vnpd.compute.packing import TokenBatch
from vnpd.faults import FaultPlan
from vnpd.workers.process import DEPTH, error_kind, load_engine, prepare_worker_process
from vnpd.workers.protocol import ErrorMsg, HeartbeatMsg, ReadyMsg, ResultMsg, WorkerSpec

log = structlog.get_logger()

STICKY_EXIT_DELAY_S = 0.2  # time for the error reply to leave before the process exits


class EngineActor:
    """One warm engine on the device Ray placed this actor on."""

    def __init__(self, spec: WorkerSpec) -> None:
        # A CPU slot hides every GPU; a GPU slot keeps the one GPU Ray assigned it.
        prepare_worker_process(spec)
        started = time.monotonic()
        self.spec = spec
        self.engine = load_engine(spec)  # raises: the actor's creation fails ("load_failed")
        self.load_seconds = time.monotonic() - started
        self.faults = FaultPlan(worker=spec.faults)
        self.device_thread = ThreadPoolExecutor(1, thread_name_prefix="vnpd-engine")
        self.waiters = ThreadPoolExecutor(DEPTH, thread_name_prefix="vnpd-wait")
        self.launched: dict[int, float] = {}  # batch id -> wall clock, in launch order
        self.batches_done = 0
        self.poisoned = False
        self._depth: asyncio.Semaphore | None = None

    async def ready(self) -> tuple[ReadyMsg, dict[str, Any]]:
        import ray

        context = ray.get_runtime_context()
        placement = {"node_id": context.get_node_id(),
                     "node_ip": ray.util.get_node_ip_address(),
                     "gpu": [str(g) for g in context.get_accelerator_ids().get("GPU", [])]}
        engine = self.engine
        log.info("worker_ready", max_tokens=engine.max_tokens,
                 attention=engine.attention_backend, **placement)
        return (ReadyMsg(os.getpid(), self.spec.device, engine.embed_dim, engine.layer,
                         engine.attention_backend, engine.max_tokens, self.load_seconds,
                         engine.layers),
                placement)

    async def embed(self, batch_id: int, batch: TokenBatch) -> ResultMsg | ErrorMsg:
        if self._depth is None:
            self._depth = asyncio.Semaphore(DEPTH)
        async with self._depth:
            while self.poisoned:  # the process exits in a moment; this batch dies with it
                await asyncio.sleep(1.0)
            loop = asyncio.get_running_loop()
            started = time.time()
            self.launched[batch_id] = started
            try:
                pending = await loop.run_in_executor(self.device_thread, self._launch, batch)
                rows = await loop.run_in_executor(self.waiters, pending.result)
                residues = pending.residues()
            except BaseException as exc:
                return self._failed(exc, batch_id)
            finally:
                self.launched.pop(batch_id, None)
            self.batches_done += 1
            return ResultMsg(batch_id, rows, started, time.time(), residues,
                             None if residues is None else pending.lengths)

    async def heartbeat(self) -> HeartbeatMsg:
        busy = next(iter(self.launched.items()), None)
        return HeartbeatMsg(os.getpid(), time.time(), self.batches_done,
                            busy[0] if busy else None, busy[1] if busy else None)

    def _launch(self, batch: TokenBatch) -> Any:
        self.faults.inject(batch.ids)
        return self.engine.submit(batch, residues=batch.residues or self.spec.residues)

    def _failed(self, exc: BaseException, batch_id: int) -> ErrorMsg:
        kind = error_kind(exc, batch_id)
        if kind == "oom":
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("batch_oom", batch=batch_id, error=str(exc))
        elif kind == "fatal":
            # An illegal memory access poisons the CUDA context for good: this process
            # must never run another batch, so it exits (Ray does not restart it).
            log.error("worker_fatal", batch=batch_id, error=str(exc))
            self.poisoned = True
            asyncio.get_running_loop().call_later(STICKY_EXIT_DELAY_S, os._exit, 4)
        else:
            log.error("batch_failed", batch=batch_id, error=str(exc))
        return ErrorMsg(kind, str(exc), batch_id, traceback.format_exc())
