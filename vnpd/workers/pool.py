"""The one interface between the daemon and wherever its batches run: :class:`WorkerPool`.

A pool owns slots (one per device), each holding a warm model. The daemon never sees a
process, a pipe or an actor, only this:

- :meth:`WorkerPool.ready` resolves once a slot has loaded the model, with the model's
  facts (:class:`ModelInfo`): width, resolved layer, attention backend and token budget.
- :meth:`WorkerPool.dispatch` pulls batches from a :class:`BatchSource` (the scheduler)
  for every slot with free credit, so a faster device takes more work.
- What became of each batch comes back as an :class:`Outcome` on :attr:`WorkerPool.outcomes`,
  a queue the daemon drains; results never travel back through callbacks.

Pools live beside this file, one module each (``local.py``: processes over pipes), and
are chosen by ``[workers] backend``.

Example::

    pool.start(loop)
    info = await pool.ready()              # ModelInfo(embed_dim=1280, ...)
    pool.dispatch(scheduler)               # scheduler.take_batch(max_tokens, alone)
    for outcome in pool.take_outcomes():   # BatchDone | BatchFailed | BatchesLost
        scheduler.apply(outcome)
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import structlog

from vnpd.workers.restarts import Supervision, schedule_restart

log = structlog.get_logger()

if TYPE_CHECKING:  # annotations only
    from vnpd.compute.packing import TokenBatch


@dataclass(frozen=True)
class ModelInfo:
    """What the daemon needs to know of the model, from the first slot that loaded it."""

    embed_dim: int
    layer: int               # resolved, non-negative
    attention_backend: str
    max_tokens: int          # the smallest budget any ready slot chose
    layers: tuple[int, ...] = ()  # resolved, in the order of the rows' layer axis; () = (layer,)


@dataclass
class Dispatch:
    """A batch handed to a slot. ``key`` is the scheduler's own handle, returned as is."""

    key: Any
    batch_id: int
    batch: TokenBatch
    sent: float = 0.0
    exclusive: bool = False  # a suspect: its slot gets nothing else until it is done

    @property
    def tokens(self) -> int:
        return self.batch.num_tokens


@dataclass(frozen=True)
class BatchDone:
    dispatch: Dispatch
    rows: np.ndarray         # (n, D) or (n, n_layers, D) float32, row i = i-th sequence
    device: str
    seconds: float
    residues: np.ndarray | None = None        # per-residue rows, as ResultMsg
    residue_counts: np.ndarray | None = None


@dataclass(frozen=True)
class BatchFailed:
    """``kind``: "oom" (split it), "batch" or "fatal" (see :class:`ErrorMsg`)."""

    dispatch: Dispatch
    kind: str
    message: str


@dataclass(frozen=True)
class BatchesLost:
    """Batches whose slot died, hung or stopped (``reason`` "shutdown": not a failure)."""

    dispatches: list[Dispatch]
    reason: str


Outcome = BatchDone | BatchFailed | BatchesLost


class BatchSource(Protocol):
    def take_batch(self, max_tokens: int, alone: bool) -> Dispatch | None:
        """The next batch for a slot with budget ``max_tokens``; ``alone``: the slot
        holds no other batch. None when there is nothing to send."""


class WorkerPool(ABC):
    """Slots with warm models; see the module doc. Owned by the daemon's event loop."""

    def __init__(self, supervision: Supervision, metrics: Any = None) -> None:
        self.supervision = supervision
        self.metrics = metrics
        self.changed = asyncio.Event()  # set whenever a slot frees credit or changes state
        self._outcomes: deque[Outcome] = deque()
        self._ready: asyncio.Future[ModelInfo] | None = None

    # What the daemon calls ------------------------------------------------------------
    @abstractmethod
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start every slot; returns at once (models load in the background)."""

    async def ready(self) -> ModelInfo:
        """Wait until a slot has loaded the model."""
        return await asyncio.shield(self._ready_future())

    @abstractmethod
    def dispatch(self, source: BatchSource) -> int:
        """Hand batches to every ready slot with free credit; returns how many."""

    def take_outcomes(self) -> list[Outcome]:
        """Every outcome reported since the last call, oldest first."""
        taken = list(self._outcomes)
        self._outcomes.clear()
        return taken

    @abstractmethod
    def check_workers(self) -> None:
        """Periodic health work: reap exits, kill the unresponsive, restart or degrade."""

    @abstractmethod
    def ping_workers(self) -> None:
        """Ask every ready slot for a heartbeat."""

    @abstractmethod
    async def stop(self, timeout_s: float) -> None:
        """Let slots finish what they hold, then stop them. Batches still held at the
        deadline come back as :class:`BatchesLost` with reason "shutdown"."""

    @abstractmethod
    def all_ready(self) -> bool: ...

    @abstractmethod
    def all_degraded(self) -> bool: ...

    @abstractmethod
    def healthy(self, fresh_s: float) -> bool:
        """A slot that answered within ``fresh_s``, or one being (re)started."""

    def describe(self) -> list[dict[str, Any]]:
        """One dict per slot for ``vnpd status``: worker, device, pid, state, ..."""
        return [slot.describe() for slot in self._slots()]

    def inflight(self) -> dict[str, int]:
        """Batches held per device, for metrics."""
        held: dict[str, int] = {}
        for slot in self._slots():
            held[slot.device] = held.get(slot.device, 0) + len(slot.inflight)
        return held

    def batch_deadline(self, tokens: int) -> float:
        return self.supervision.batch_deadline(tokens)

    def manage_workers(self) -> None:
        """Start the slots whose restart (or rest, when degraded) is due."""
        now = time.monotonic()
        for slot in self._slots():
            if slot.state in ("dead", "degraded") and now >= slot.next_start_at:
                if slot.state == "degraded":
                    log.info("device_retry", worker=slot.spec.worker_id, device=slot.device)
                    slot.crashes.clear()
                slot.restarts += 1
                self._spawn(slot)

    # What implementations provide and call --------------------------------------------
    @abstractmethod
    def _slots(self) -> Sequence[Any]:
        """The slots, each with ``spec``, ``device``, ``state``, ``inflight``, ``crashes``,
        ``next_start_at``, ``restarts`` and ``describe()``."""

    @abstractmethod
    def _spawn(self, slot: Any) -> None:
        """Start a process or actor for ``slot``."""

    def _schedule_restart(self, slot: Any) -> None:
        schedule_restart(slot, self.supervision)

    def _fill_slots(self, slots: Sequence[Any], source: BatchSource,
                    send: Callable[[Any, Dispatch], None]) -> int:
        """The pull loop of every pool: give each ready slot with free credit a batch from
        ``source``, least-loaded first, until the source or the credit runs out; ``send``
        delivers a dispatch to its slot. A slot being killed gets nothing (a batch sent now
        would die with it and look like it had failed alone), nor does one running a
        suspect, which runs alone so that a failure is surely its own. Slots have
        ``state``, ``credit``, ``inflight``, ``kill_reason`` and ``max_tokens``."""
        sent = 0
        progress = True
        while progress:
            progress = False
            for slot in sorted(slots, key=lambda s: len(s.inflight)):
                if slot.state != "ready" or len(slot.inflight) >= slot.credit \
                        or slot.kill_reason is not None \
                        or any(d.exclusive for d in slot.inflight.values()):
                    continue
                dispatch = source.take_batch(slot.max_tokens, not slot.inflight)
                if dispatch is None:
                    return sent
                dispatch.sent = time.monotonic()
                slot.inflight[dispatch.batch_id] = dispatch
                send(slot, dispatch)
                sent += 1
                progress = True
        return sent

    def _report(self, outcome: Outcome) -> None:
        self._outcomes.append(outcome)
        self.changed.set()

    def _model_ready(self, info: ModelInfo) -> None:
        future = self._ready_future()
        if not future.done():
            future.set_result(info)

    def _ready_future(self) -> asyncio.Future[ModelInfo]:
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
        return self._ready
