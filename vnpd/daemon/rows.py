"""Rows into a job's partial file, with the copies of rows that repeat them.

Rows that repeat an earlier row of their file (:mod:`vnpd.inputs.duplicates`) are never
computed: they get their leader's row, under their own id and at their own position,
when the leader's row is written: by the scheduler as batches finish, and in window mode
for long rows by :mod:`vnpd.daemon.window_rows` before finalize.

Example::

    written = write_with_copies(partial, duplicates, positions, rows)  # rows + copies
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only
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
