"""The pipe protocol between the parent and each worker: every message that crosses it.

Parent -> worker: :class:`WorkerSpec` (at spawn), :class:`BatchMsg`, :class:`PingMsg`,
:class:`StopMsg`. Worker -> parent: :class:`ReadyMsg`, :class:`ResultMsg`,
:class:`HeartbeatMsg`, :class:`ErrorMsg`. Both sides import this module and nothing else
crosses the pipe. Arrays travel as numpy: :mod:`vnpd.workers.wire` frames each message
(pickle protocol 5, the arrays' bytes sent raw, out of band). Ray actors pass the same
messages through Ray's own transport.

Example::

    send_message(conn, ResultMsg(batch_id, rows, started, time.time()))  # vnpd.workers.wire
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: a BatchMsg carries the one batch type as it is
    from vnpd.compute.packing import TokenBatch



@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to start; passed as the spawn argument."""

    worker_id: int
    device: str              # "cpu" or "cuda:N" as configured (the worker sees only GPU N as cuda:0)
    checkpoint: str
    dtype: str
    layer: int
    truncation: int
    max_tokens: int          # 0 = size from free device memory
    heartbeat_interval_s: float
    log_format: str
    log_level: str
    threads: int = 0         # CPU threads for torch (0 = leave torch's default)
    env: dict[str, str] = field(default_factory=dict)
    attention: str | None = None     # force an attention backend (None: the usual order)
    compile_mode: str | None = None  # None: the engine's default for the device
    faults: dict[str, str] = field(default_factory=dict)  # test fault plan: record -> action
    layers: tuple[int, ...] = ()     # several layers in one pass (overrides layer); () = (layer,)
    residues: str | None = None      # per-residue rows in this dtype ("float16"/"float32"), or none
    simulate_dim: int = 0    # test-only: > 0 runs vnpd.compute.simulated, no model


@dataclass(frozen=True)
class BatchMsg:
    batch_id: int
    batch: TokenBatch


@dataclass(frozen=True)
class PingMsg:
    sent: float              # parent's monotonic clock; echoed in the next heartbeat


@dataclass(frozen=True)
class StopMsg:
    """Finish the batches already received, then exit 0."""


@dataclass(frozen=True)
class ReadyMsg:
    pid: int
    device: str
    embed_dim: int
    layer: int
    attention_backend: str
    max_tokens: int
    load_seconds: float
    layers: tuple[int, ...] = ()  # resolved, in the order of the rows' layer axis


@dataclass(frozen=True)
class ResultMsg:
    batch_id: int
    embeddings: np.ndarray   # (n, D) or (n, n_layers, D) float32, row i = i-th sequence
    started: float           # worker wall clock (time.time) when the batch was launched
    finished: float
    residues: np.ndarray | None = None        # (R, [n_layers,] D), sequence after sequence
    residue_counts: np.ndarray | None = None  # (n,) int64: rows of each sequence in residues


@dataclass(frozen=True)
class HeartbeatMsg:
    pid: int
    sent: float              # worker wall clock
    batches_done: int
    busy_batch: int | None   # the batch the device is working on, if any
    busy_since: float | None  # wall clock when that batch was launched
    ping_echo: float | None = None


@dataclass(frozen=True)
class ErrorMsg:
    """A failure. ``kind``: "oom" (batch too large: split it, worker stays up),
    "batch" (this batch failed, worker stays up), "fatal" (the worker is exiting: load
    failure or a sticky CUDA error that poisons the context)."""

    kind: str
    message: str
    batch_id: int | None = None
    traceback: str = ""
