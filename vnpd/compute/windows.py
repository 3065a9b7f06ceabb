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
    index = PieceIndex.plan(np.array([40, 5]), truncation=30, stride=15)
    index.spans(np.array([0, 1, 2]))       # rows [0, 0, 1], starts [0, 10, 0], stops [30, 40, 5]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from vnpd.compute.tokenizer import tokens_for

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
    index = PieceIndex.plan(np.asarray(lengths, dtype=np.int64), truncation, stride)
    return Pieces(*index.spans(np.arange(index.num_pieces, dtype=np.int64)))


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


def coverage(length: int, truncation: int, stride: int) -> np.ndarray:
    """How many windows contain each residue of a sequence of ``length``: (length,) int32."""
    counts = np.zeros(length, dtype=np.int32)
    for start, stop in plan_windows(length, truncation, stride):
        counts[start:stop] += 1
    return counts


def window_share(rows: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """One window's share of its sequence's sum over residues: Σ_r rows[r] / covered[r],
    float32. The shares of all windows add up to Σ_r (mean over the windows holding r),
    so the sequence's mean is their sum over its length."""
    weights = (1.0 / covered.astype(np.float64)).reshape((-1,) + (1,) * (rows.ndim - 1))
    return (np.asarray(rows, dtype=np.float64) * weights).sum(0).astype(np.float32)


@dataclass(frozen=True)
class PieceIndex:
    """A job's pieces, numbered 0..P-1 in row order, so that a batch of pieces can be
    journaled as positions: piece ``offsets[r] + k`` is window k of row r.

    ``stride`` None (truncate mode): piece p is row p, whole (cut to the truncation by
    :func:`vnpd.compute.packing.build_batch`). In window mode a row longer than the
    truncation has several pieces, each a full window; each such (*windowed*) piece also
    has a *slot*, ``slots[r] + k``, numbering the windowed pieces alone. Costs 16 bytes per
    row in window mode, nothing in truncate mode.
    """

    lengths: np.ndarray
    truncation: int
    stride: int | None = None
    offsets: np.ndarray | None = None  # (N+1,) int64, window mode only
    slots: np.ndarray | None = None    # (N+1,) int64, window mode only

    @classmethod
    def plan(cls, lengths: np.ndarray, truncation: int, stride: int | None) -> PieceIndex:
        """The pieces of rows of these ``lengths``; raises ValueError for a bad stride."""
        if stride is None:
            return cls(lengths, truncation)
        plan_windows(0, truncation, stride)  # checks the stride
        counts = count_windows(np.asarray(lengths), truncation, stride)
        offsets = np.zeros(counts.shape[0] + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        slots = np.zeros_like(offsets)
        np.cumsum(np.where(counts > 1, counts, 0), out=slots[1:])
        return cls(lengths, truncation, stride, offsets, slots)

    @property
    def windows(self) -> bool:
        return self.stride is not None

    @property
    def num_pieces(self) -> int:
        return len(self.lengths) if self.offsets is None else int(self.offsets[-1])

    @property
    def num_slots(self) -> int:
        return 0 if self.slots is None else int(self.slots[-1])

    def rows(self, pieces: np.ndarray) -> np.ndarray:
        pieces = np.asarray(pieces, dtype=np.int64)
        if self.offsets is None:
            return pieces
        return np.searchsorted(self.offsets, pieces, side="right") - 1

    def pieces_of(self, rows: np.ndarray) -> np.ndarray:
        """Every piece of ``rows``, row after row, windows in order."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.offsets is None:
            return rows
        first, counts = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
        return np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))

    def spans(self, pieces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, start, stop) of each piece: residues ``start:stop`` of its row."""
        rows = self.rows(pieces)
        lengths = np.asarray(self.lengths[rows], dtype=np.int64)
        if self.offsets is None or self.stride is None:
            return rows, np.zeros_like(lengths), lengths
        k = np.asarray(pieces, dtype=np.int64) - self.offsets[rows]
        last = self.offsets[rows + 1] - self.offsets[rows] - 1
        starts = np.where(k == last, np.maximum(lengths - self.truncation, 0), k * self.stride)
        return rows, starts, np.minimum(starts + self.truncation, lengths)

    def windowed(self, pieces: np.ndarray) -> np.ndarray:
        """Whether each piece is one of several of its row (its result goes to a slot)."""
        if self.offsets is None:
            return np.zeros(np.shape(pieces), dtype=bool)
        rows = self.rows(pieces)
        return self.offsets[rows + 1] - self.offsets[rows] > 1

    def slot_of(self, pieces: np.ndarray) -> np.ndarray:
        """The slot of each windowed piece."""
        assert self.offsets is not None and self.slots is not None
        rows = self.rows(pieces)
        return self.slots[rows] + np.asarray(pieces, dtype=np.int64) - self.offsets[rows]

    def is_last(self, pieces: np.ndarray) -> np.ndarray:
        """Whether each piece is its row's last (a row counts as done with it)."""
        if self.offsets is None:
            return np.ones(np.shape(pieces), dtype=bool)
        return self.offsets[self.rows(pieces) + 1] - 1 == np.asarray(pieces, dtype=np.int64)

    def tokens(self, pieces: np.ndarray) -> np.ndarray:
        """Tokens of each piece (BOS and EOS included)."""
        _, starts, stops = self.spans(pieces)
        return tokens_for(stops - starts, self.truncation)

    def row_tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens of each of rows ``start..stop-1``, all its pieces together."""
        lengths = np.asarray(self.lengths[start:stop], dtype=np.int64)
        if self.offsets is None:
            return tokens_for(lengths, self.truncation)
        counts = np.diff(self.offsets[start:stop + 1])
        return np.where(counts > 1, counts * (self.truncation + 2),
                        tokens_for(lengths, self.truncation))
