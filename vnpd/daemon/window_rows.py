"""Window mode in the daemon: the windows of long sequences kept by slot, their rows made
at the end of the job.

A row longer than the truncation runs as several pieces, its windows
(:class:`vnpd.compute.windows.PieceIndex`), which may land in different batches and on
different workers. Each finished window is written into its own slot of the partial
file's scratch dataset (``window_slots``), before the flush after which the journal marks
its batch done: so a done window survives a crash, and a window written again (its batch
replayed after a crash) holds what it held, never counted twice. Nothing about a row's
windows is kept in memory.

When the job has no work left, just before finalize, every long row is made from its
slots and written like any other row, with its copies (:func:`write_long_rows`). That
pass reads only the slots and writes raw data at fixed offsets, so a crash in it is
repaired by running it again; finalize then leaves the scratch behind.

What a slot holds:

- mean only: the window's share Σ_{r∈w} h_r / c_r, where c_r counts the windows holding
  residue r (:func:`vnpd.compute.windows.window_share`); the row is Σ shares / L;
- with ``per_residue``: the window's residue rows (truncation, [n_layers,] D), combined
  by :class:`vnpd.compute.windows.WindowSum` as ``vnpd embed`` does.

Example::

    shape = slot_shape(index, row_shape=(1280,), per_residue=False)  # (slots, 1280)
    pieces, rows, residues, counts = store_windows(partial, index, pieces, rows, residues,
                                                   counts)  # as batches finish: the rest
    write_long_rows(partial, index, duplicates, quarantined=[3])     # before finalize
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from vnpd.compute.windows import (
    PieceIndex,
    combine_windows,
    coverage,
    default_stride,
    plan_windows,
    window_share,
)
from vnpd.daemon.rows import select_residues, write_with_copies

if TYPE_CHECKING:  # annotations only
    from vnpd.config.schema import ModelConfig
    from vnpd.inputs.duplicates import DuplicatePlan
    from vnpd.output.hdf5 import PartialOutput

BLOCK_BYTES = 64 << 20  # slots read at once when making mean rows: bounded memory


def configured_stride(model: ModelConfig) -> int | None:
    """The window stride of ``[model]`` in window mode (``window_stride``, or its
    default), else None."""
    if model.long_sequences != "window":
        return None
    return model.window_stride or default_stride(model.truncation)


def slot_shape(index: PieceIndex, row_shape: tuple[int, ...],
               per_residue: bool) -> tuple[int, ...] | None:
    """The scratch dataset's shape for a job, or None in truncate mode."""
    if not index.windows:
        return None
    if per_residue:
        return (index.num_slots, index.truncation, *row_shape)
    return (index.num_slots, *row_shape)


def window_plan(index: PieceIndex) -> tuple[int, ...]:
    """What numbers a job's slots (truncation, stride), kept with them: a restart under
    other window settings must not read them (the job is then computed again)."""
    return () if index.stride is None else (index.truncation, index.stride)


def store_windows(partial: PartialOutput, index: PieceIndex, pieces: np.ndarray,
                  rows: np.ndarray, residues: np.ndarray | None,
                  counts: np.ndarray | None) -> tuple[np.ndarray, np.ndarray,
                                                      np.ndarray | None, np.ndarray | None]:
    """Write the windows among a batch's finished ``pieces`` into their slots; return
    what is left to write as rows: (pieces, rows, residues, counts) of the whole pieces,
    with residue rows only if the file takes them. ``residues`` holds each piece's
    residue rows (``counts[i]`` of them), piece after piece."""
    windowed = index.windowed(pieces)
    if windowed.any():
        assert residues is not None and counts is not None
        _store_slots(partial, index, pieces[windowed],
                     *select_residues(residues, counts, np.flatnonzero(windowed)))
        whole = np.flatnonzero(~windowed)
        pieces, rows = pieces[whole], rows[whole]
        if partial.has_residues:
            residues, counts = select_residues(residues, counts, whole)
    if not partial.has_residues:
        residues = counts = None  # asked for the windows' sake only
    return pieces, rows, residues, counts


def _store_slots(partial: PartialOutput, index: PieceIndex, pieces: np.ndarray,
                 residues: np.ndarray, counts: np.ndarray) -> None:
    rows, starts, stops = index.spans(pieces)
    if not np.array_equal(np.asarray(counts), stops - starts):
        raise ValueError(f"window residue counts {counts} for windows of {stops - starts}")
    ends = np.cumsum(counts)
    per_residue = partial.has_residues
    assert index.stride is not None
    covered: dict[int, np.ndarray] = {}
    values = []
    for i, (row, start, stop) in enumerate(zip(rows.tolist(), starts.tolist(),
                                               stops.tolist())):
        window = residues[ends[i] - counts[i]:ends[i]]
        if per_residue:
            values.append(np.asarray(window, dtype=np.float32))
            continue
        if row not in covered:
            covered[row] = coverage(int(index.lengths[row]), index.truncation, index.stride)
        values.append(window_share(window, covered[row][start:stop]))
    partial.write_window_slots(index.slot_of(pieces), np.stack(values))


def long_row_results(partial: PartialOutput, index: PieceIndex, skip: Sequence[int]
                     ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                         np.ndarray | None]]:
    """(positions, mean rows, residue rows or None, residue counts or None) of the long
    rows, made from their slots, in blocks; rows in ``skip`` (quarantined, or copies of
    another row, whose slots were never written) are left out."""
    assert index.offsets is not None and index.slots is not None and index.stride is not None
    long_rows = np.flatnonzero(np.diff(index.offsets) > 1)
    long_rows = long_rows[~np.isin(long_rows, np.asarray(skip, dtype=np.int64))]
    slots = index.slots
    if partial.has_residues:
        for row in long_rows.tolist():
            length = int(index.lengths[row])
            windows = partial.read_window_slots(int(slots[row]), int(slots[row + 1]))
            per_residue, mean = combine_windows(
                length, plan_windows(length, index.truncation, index.stride), list(windows))
            yield (np.array([row]), mean[None], per_residue,
                   np.array([length], dtype=np.int64))
        return
    shape = partial.window_slots_shape or (0,)
    per_block = max(1, BLOCK_BYTES // (4 * int(np.prod(shape[1:]))))
    i = 0
    while i < len(long_rows):
        lo = int(slots[long_rows[i]])
        j = max(i + 1, int(np.searchsorted(slots[long_rows + 1], lo + per_block, side="right")))
        block_rows = long_rows[i:j]
        data = partial.read_window_slots(lo, int(slots[block_rows[-1] + 1]))
        means = np.stack([data[slots[r] - lo:slots[r + 1] - lo].sum(0, dtype=np.float64)
                          / float(index.lengths[r]) for r in block_rows.tolist()])
        yield block_rows, means.astype(np.float32), None, None
        i = j


def write_long_rows(partial: PartialOutput, index: PieceIndex,
                    duplicates: DuplicatePlan | None, quarantined: Sequence[int]) -> int:
    """Make and write every long row of a job whose windows are all done (in a thread,
    before finalize); returns the rows written, copies included. Idempotent."""
    if not index.windows:
        return 0
    written = 0
    # Copies of a long row are written with it; their own slots were never filled.
    skip = np.concatenate([np.asarray(quarantined, dtype=np.int64),
                           np.asarray(duplicates.followers if duplicates is not None else [],
                                      dtype=np.int64)])
    for positions, means, residues, counts in long_row_results(partial, index, skip):
        written += write_with_copies(partial, duplicates, positions, means, residues, counts)
    return written
