"""A simulated engine for tests and benchmarks of the parent: no model, no torch.

It answers each batch at once with deterministic rows of width ``dim`` that depend only
on each sequence's tokens, so a benchmark can check that every output row is the one
its input sequence should give (none lost, duplicated or misplaced) without running a
model. It is reached only through the test-only ``VNPD_TEST_SIMULATE_DIM`` hook
(:mod:`vnpd.faults`, docs/DAEMON.md): the worker process stays the real one (pipes,
heartbeats, credit), only its engine is this.

Row of a sequence with tokens t (BOS and EOS included), n = len(t), s = sum(t):
``[s, n, sum((i+1)*t[i]) mod 65521, (s + 0) mod 251, (s + 1) mod 251, ...]``; every value
is an integer below 2**24, exact in float32 (check with ``output_dtype = "float32"``).
Per-residue rows, when asked for, are ``[token, position in the sequence (1-based), 0,
...]`` in the dtype asked for, BOS/EOS excluded, as the engine's: enough to move the
bytes a real worker moves, not meant to be checked.

Example::

    engine = SimulatedEngine(dim=1280, max_tokens=131072)
    rows = engine.submit(batch).result()         # (n, 1280) float32
    rows == simulated_rows(batch.tokens, batch.cu_seqlens, 1280)
    engine.submit(batch, residues="float16").residues()  # (R, 1280) float16
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from vnpd.compute.packing import TokenBatch

SIMULATED_BACKEND = "simulated"
_MOD_WEIGHTED = 65521
_MOD_FILL = 251


def simulated_rows(tokens: np.ndarray, cu_seqlens: np.ndarray, dim: int) -> np.ndarray:
    """The (n, dim) float32 rows of the packed sequences ``tokens`` split at ``cu_seqlens``."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    n = cu.shape[0] - 1
    rows = np.empty((n, dim), dtype=np.float32)
    if n == 0:
        return rows
    tokens = np.asarray(tokens, dtype=np.int64)
    lengths = np.diff(cu)
    starts = cu[:-1]
    sums = np.add.reduceat(tokens, starts)
    local = np.arange(tokens.shape[0], dtype=np.int64) - np.repeat(starts, lengths) + 1
    weighted = np.add.reduceat(tokens * local, starts) % _MOD_WEIGHTED
    columns = [sums, lengths, weighted]
    for j, column in enumerate(columns[:dim]):
        rows[:, j] = column
    if dim > 3:
        rows[:, 3:] = (sums[:, None] + np.arange(dim - 3, dtype=np.int64)) % _MOD_FILL
    return rows


def simulated_residues(tokens: np.ndarray, cu_seqlens: np.ndarray, dim: int,
                       dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The (R, dim) residue rows of the packed sequences and each one's residue count."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    lengths = np.diff(cu) - 2
    body = np.ones(tokens.shape[0], dtype=bool)
    body[cu[:-1]] = False
    body[cu[1:] - 1] = False
    rows = np.zeros((int(lengths.sum()), dim), dtype=dtype)
    rows[:, 0] = np.asarray(tokens)[body]
    if dim > 1:
        rows[:, 1] = np.arange(rows.shape[0]) - np.repeat(np.cumsum(lengths) - lengths,
                                                           lengths) + 1
    return rows, lengths


@dataclass
class SimulatedResult:
    """Rows computed at submit time; the engine's ``PendingResult`` interface."""

    rows: np.ndarray
    lengths: np.ndarray | None = None  # residues per sequence, with residue_rows
    residue_rows: np.ndarray | None = None

    def result(self) -> np.ndarray:
        return self.rows

    def residues(self) -> np.ndarray | None:
        return self.residue_rows


class SimulatedEngine:
    """The :class:`vnpd.compute.engine.Engine` interface that workers use, without a model."""

    def __init__(self, dim: int, max_tokens: int, layer: int = 0) -> None:
        if dim < 1 or max_tokens < 3:
            raise ValueError(f"need dim >= 1 and max_tokens >= 3, got {dim} and {max_tokens}")
        self.embed_dim = dim
        self.max_tokens = max_tokens
        self.layer = layer
        self.layers = (layer,)
        self.attention_backend = SIMULATED_BACKEND
        self.gemm = SIMULATED_BACKEND
        self.started = time.monotonic()

    def submit(self, batch: TokenBatch, residues: str | None = None) -> SimulatedResult:
        rows = simulated_rows(batch.tokens, batch.cu_seqlens, self.embed_dim)
        if residues is None:
            return SimulatedResult(rows)
        residue_rows, lengths = simulated_residues(batch.tokens, batch.cu_seqlens,
                                                   self.embed_dim, residues)
        return SimulatedResult(rows, lengths, residue_rows)

    def warmup(self) -> None:
        pass
