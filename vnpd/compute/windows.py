"""Window mode for sequences longer than the model's truncation: plan, then combine.

A sequence of L > truncation residues is covered by windows of ``truncation`` residues
that start at 0, stride, 2·stride, … and one more that ends exactly at L, so every window
is full. Each window runs as its own sequence (BOS + residues + EOS). A residue's
representation is the mean over the windows that contain it; the sequence's mean is the
mean over all its residues. A sequence of L ≤ truncation is one window, (0, L): exactly
what truncate mode computes.

Pure functions on numpy arrays; nothing here knows about batches or files.

Example::

    plan_windows(40, truncation=30, stride=15)        # [(0, 30), (10, 40)]
    per_residue, mean = combine_windows(40, [(0, 30), (10, 40)], [rows_a, rows_b])
    # rows_* (30, D); per_residue (40, D) float32, mean (D,) float32
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

LONG_SEQUENCES = ("truncate", "window")


def default_stride(truncation: int) -> int:
    """Half a window (511 for fair-esm's 1022): every residue but the ends is seen twice."""
    return max(1, truncation // 2)


def plan_windows(length: int, truncation: int, stride: int) -> list[tuple[int, int]]:
    """(start, stop) residue spans of the windows covering a sequence of ``length``.

    Raises ValueError unless 1 <= stride <= truncation (a larger stride leaves gaps).
    """
    if not 1 <= stride <= truncation:
        raise ValueError(f"window stride must be in 1..truncation ({truncation}), not {stride}")
    if length <= truncation:
        return [(0, length)]
    last = length - truncation
    return [(s, s + truncation) for s in range(0, last, stride)] + [(last, length)]


def count_windows(lengths: np.ndarray, truncation: int, stride: int) -> np.ndarray:
    """Windows per sequence, vectorised: 1 up to ``truncation``, else
    ceil((L - truncation) / stride) + 1."""
    lengths = np.asarray(lengths, dtype=np.int64)
    over = np.maximum(lengths - truncation, 0)
    return np.where(over > 0, -(-over // stride) + 1, 1)


@dataclass(frozen=True)
class Pieces:
    """The windows of a run of sequences, flattened: piece k is residues
    ``start[k]:stop[k]`` of sequence ``row[k]`` (rows ascending, windows in order)."""

    row: np.ndarray    # (P,) int64
    start: np.ndarray  # (P,) int64
    stop: np.ndarray   # (P,) int64

    @property
    def lengths(self) -> np.ndarray:
        return self.stop - self.start


def split_into_windows(lengths: np.ndarray, truncation: int, stride: int) -> Pieces:
    """Every sequence's windows (:func:`plan_windows`), as one flat :class:`Pieces`."""
    rows, starts, stops = [], [], []
    for row, length in enumerate(np.asarray(lengths, dtype=np.int64).tolist()):
        for start, stop in plan_windows(length, truncation, stride):
            rows.append(row)
            starts.append(start)
            stops.append(stop)
    as_array = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return Pieces(as_array(rows), as_array(starts), as_array(stops))


def combine_windows(length: int, spans: Sequence[tuple[int, int]],
                    window_rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-residue rows (length, ...) and the sequence mean (...), float32, from each
    window's residue rows (stop - start, ...), as the module doc defines them.

    Raises ValueError if a window's rows do not match its span or a residue is uncovered.
    """
    combiner = WindowSum(length, np.asarray(window_rows[0]).shape[1:])
    for (start, stop), rows in zip(spans, window_rows, strict=True):
        combiner.add(start, stop, rows)
    return combiner.result()


@dataclass
class WindowSum:
    """Running sums of one sequence's windows, which may arrive in any order."""

    length: int
    row_shape: tuple[int, ...]
    sums: np.ndarray = field(init=False)
    counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.sums = np.zeros((self.length, *self.row_shape), dtype=np.float32)
        self.counts = np.zeros(self.length, dtype=np.int32)

    def add(self, start: int, stop: int, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        if rows.shape != (stop - start, *self.row_shape) or not 0 <= start < stop <= self.length:
            raise ValueError(f"window {start}:{stop} of a {self.length}-residue sequence "
                             f"with rows of shape {rows.shape}")
        self.sums[start:stop] += rows
        self.counts[start:stop] += 1

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(per-residue rows, mean), float32. Raises ValueError if a residue is uncovered."""
        if self.length and self.counts.min() == 0:
            raise ValueError(f"residue {int(np.argmin(self.counts))} is in no window")
        shape = (self.length,) + (1,) * len(self.row_shape)
        per_residue = self.sums / self.counts.reshape(shape)
        mean = (per_residue.mean(0, dtype=np.float64).astype(np.float32) if self.length
                else np.zeros(self.row_shape, dtype=np.float32))
        return per_residue, mean
