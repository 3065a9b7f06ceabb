"""The output file's names and shapes, in one place.

Datasets (N rows, one per input record, in input order):

- ``embeddings``: (N, D), or (N, n_layers, D) when several layers are asked for, in
  ``output_dtype``; ``ids`` (N,) UTF-8; ``lengths`` (N,) int32 (residues before truncation).
- With ``per_residue``: ``residues`` (R, D) or (R, n_layers, D) in ``output_dtype`` and
  ``residue_offsets`` (N + 1,) int64; row i's residues are
  ``residues[residue_offsets[i]:residue_offsets[i + 1]]``, BOS/EOS excluded, in order.

Layer attributes: ``layers`` (int64 list, in the order of the ``embeddings`` axis) always;
``layer`` as well when there is exactly one (the schema before several layers existed).

Example::

    embedding_shape(3, 1280, 2)                       # (3, 2, 1280)
    residue_counts(np.array([5, 2000]), 1022, "truncate")   # array([   5, 1022])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

EMBEDDINGS = "embeddings"
IDS = "ids"
LENGTHS = "lengths"
RESIDUES = "residues"
RESIDUE_OFFSETS = "residue_offsets"
# Scratch of the daemon's partial file in window mode (float32, one slot per window of a
# long sequence: vnpd.daemon.window_rows); finalize leaves it behind: never in an output.
WINDOW_SLOTS = "window_slots"


def row_shape(dim: int, num_layers: int = 1) -> tuple[int, ...]:
    """One row's shape: (D,) for one layer, (n_layers, D) for several."""
    return (dim,) if num_layers == 1 else (num_layers, dim)


def embedding_shape(n: int, dim: int, num_layers: int = 1) -> tuple[int, ...]:
    return (n, *row_shape(dim, num_layers))


def layer_attributes(layers: Sequence[int]) -> dict[str, Any]:
    """Root attributes naming the resolved ``layers`` (see the module doc)."""
    attrs: dict[str, Any] = {"layers": np.asarray(list(layers), dtype=np.int64)}
    if len(layers) == 1:
        attrs["layer"] = np.int64(layers[0])
    return attrs


def residue_counts(lengths: np.ndarray, truncation: int, long_sequences: str) -> np.ndarray:
    """Residue rows per sequence (int64): up to ``truncation`` in truncate mode, every
    residue in window mode."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return lengths.copy() if long_sequences == "window" else np.minimum(lengths, truncation)


BLOCK_BYTES = 32 << 20
"""Bytes of rows read or copied at a time when streaming a file (verify, compaction)."""


def rows_per_block(row_bytes: int, block_bytes: int | None = None) -> int:
    """How many rows of ``row_bytes`` one block of ``block_bytes`` (default
    ``BLOCK_BYTES``) holds, at least 1."""
    return max(1, (BLOCK_BYTES if block_bytes is None else block_bytes) // max(1, row_bytes))


def batch_runs(pos: np.ndarray, order: np.ndarray, rows: np.ndarray,
               starts: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """The rows of each run of adjacent positions, for writing one run at a time:
    ``(lo, data)``, where ``pos[lo]`` is the run's first position. ``pos`` is the batch's
    positions sorted (``positions[order]``); item i of the batch owns
    ``rows[starts[i]:starts[i + 1]]`` (row i without ``starts``). ``data`` is a view of
    ``rows`` where the run's items are adjacent in the batch too (one item always), else a
    gathered copy. Lazy, so that a writer thread can do the gathering."""
    breaks = np.flatnonzero(np.diff(pos) != 1) + 1
    for lo, hi in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(pos)].tolist()):
        run = order[lo:hi]
        first, last = int(run[0]), int(run[-1])
        if hi - lo == 1 or (last - first == hi - lo - 1 and np.all(np.diff(run) == 1)):
            data = (rows[first:last + 1] if starts is None
                    else rows[starts[first]:starts[last + 1]])
        elif starts is None:
            data = rows[run]
        else:
            data = np.concatenate([rows[starts[i]:starts[i + 1]] for i in run.tolist()])
        yield lo, data
