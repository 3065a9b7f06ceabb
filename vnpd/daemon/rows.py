"""Rows into a job's partial file, with the copies of rows that repeat them.

Rows that repeat an earlier row of their file (:mod:`vnpd.inputs.duplicates`) are never
computed: they get their leader's row, under their own id and at their own position,
when the leader's row is written: by the scheduler as batches finish, and in window mode
for long rows by :mod:`vnpd.daemon.window_rows` before finalize.

Which rows of a window are computed at all (leaders the cache does not hold) is
:func:`split_window`.

Example::

    compute, hit, hit_rows = split_window(duplicates, cache, start, stop)
    written = write_with_copies(partial, duplicates, positions, rows)  # rows + copies
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only
    from vnpd.daemon.reuse import RowCache
    from vnpd.inputs.duplicates import DuplicatePlan
    from vnpd.output.hdf5 import PartialOutput


def followers_rows(duplicates: DuplicatePlan | None, positions: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The positions that repeat ``positions``, and for each the index into ``positions``
    of the row it copies."""
    if duplicates is None:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return duplicates.followers_of(positions)


def write_with_copies(partial: PartialOutput, duplicates: DuplicatePlan | None,
                      positions: np.ndarray, rows: np.ndarray,
                      residues: np.ndarray | None = None,
                      residue_counts: np.ndarray | None = None) -> int:
    """Write rows (and per-residue rows, before the same flush) at their positions, and
    copies at the positions that repeat them; returns how many rows were written."""
    partial.write_rows(positions, rows)
    if residues is not None:
        partial.write_residues(positions, residues, residue_counts)
    followers, which = followers_rows(duplicates, positions)
    if len(followers):
        partial.write_rows(followers, rows[which])
        if residues is not None:
            partial.write_residues(followers, *select_residues(residues, residue_counts, which))
    return len(positions) + len(followers)


def select_residues(rows: np.ndarray, counts: np.ndarray, which: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The residue rows of sequences ``which`` (indices, in that order) out of ``rows``,
    which holds ``counts[i]`` rows for sequence i, one after the other; and their counts."""
    counts = np.asarray(counts, dtype=np.int64)
    which = np.asarray(which, dtype=np.int64)
    starts = np.cumsum(counts) - counts
    if not which.size:
        return rows[:0], counts[:0]
    return (np.concatenate([rows[starts[w]:starts[w] + counts[w]] for w in which.tolist()]),
            counts[which])


def split_window(duplicates: DuplicatePlan | None, cache: RowCache | None,
                 start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which rows ``start..stop-1`` of a job must be computed.

    Returns (local indices to compute, local indices served by the cache, their rows).
    Followers (rows that repeat an earlier row) are in neither: they get their leader's
    row when it is written (:func:`vnpd.daemon.rows.write_with_copies`).
    """
    local = np.arange(stop - start)
    if duplicates is not None:
        local = local[duplicates.is_leader(local + start)]
    if cache is None or duplicates is None or not len(local):
        return local, np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    found = cache.lookup(np.asarray(duplicates.keys[local + start]))
    if not found:
        return local, np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    hit = np.fromiter(sorted(found), dtype=np.int64, count=len(found))
    rows = np.stack([found[int(i)] for i in hit])
    keep = np.ones(len(local), dtype=bool)
    keep[hit] = False
    return local[keep], local[hit], rows
