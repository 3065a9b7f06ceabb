"""The per-residue datasets of an output file: allocate, write by position, copy, check.

``residue_offsets`` (N + 1, int64) is written whole when the file is created: each row's
residue count is known from its length then (:func:`vnpd.output.schema.residue_counts`).
``residues`` (R, [n_layers,] D) is allocated in full at creation and filled as results
arrive, so the writer holds no more than one batch of rows in memory.

Why contiguous and never filled: rows arrive scattered (batches are packed by length), and
a contiguous dataset takes each sequence's rows as one slice, with no chunk
read-modify-write; allocating it at creation fixes the file's layout metadata, so a
flushed file stays readable whenever the process dies (as for ``embeddings``, see
``vnpd.output.hdf5``). It is not filled (filling would write R·D values once more): the
NaN fill of ``embeddings`` marks unwritten rows, and a row's residues are always written
in the same call, before the same flush, as its embedding.

Example::

    create_residue_datasets(f, counts=np.array([3, 1]), row_shape=(1280,), dtype="float16")
    write_residues(f, offsets, positions=np.array([1, 0]), rows=rows4, counts=np.array([1, 3]))
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from vnpd.output.schema import RESIDUE_OFFSETS, RESIDUES, batch_runs, rows_per_block

_BLOCK_BYTES = 64 << 20  # bounded memory when copying residues (compaction)


def create_residue_datasets(f: h5py.File, counts: np.ndarray, row_shape: tuple[int, ...],
                            dtype: str) -> np.ndarray:
    """Create ``residue_offsets`` (written) and ``residues`` (allocated); return the offsets."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or (counts.size and counts.min() < 0):
        raise ValueError(f"residue counts must be a 1-D array of counts >= 0, not {counts}")
    offsets = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    f.create_dataset(RESIDUE_OFFSETS, data=offsets)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    f.create_dataset(RESIDUES, (int(offsets[-1]), *row_shape), dtype, dcpl=dcpl,
                     fill_time="never")
    return offsets


def read_offsets(f: h5py.File) -> np.ndarray | None:
    """The file's residue offsets, or None if it has no per-residue datasets."""
    return f[RESIDUE_OFFSETS][:] if RESIDUE_OFFSETS in f else None


def write_residues(f: h5py.File, offsets: np.ndarray, positions: np.ndarray,
                   rows: np.ndarray, counts: np.ndarray) -> None:
    """Write the residue rows of the sequences at ``positions`` through HDF5.

    ``rows`` holds them sequence after sequence, ``counts[i]`` rows for ``positions[i]``.
    Sequences with adjacent positions are written as one slice. Raises ValueError when a
    count disagrees with the file's offsets or the rows do not add up
    (:func:`check_residue_rows`).
    """
    check_residue_rows(f, offsets, positions, rows, counts)
    dset = f[RESIDUES]
    for start, data in residue_runs(offsets, positions, rows, counts):
        dset[start:start + data.shape[0]] = data


def check_residue_rows(f: h5py.File, offsets: np.ndarray, positions: np.ndarray,
                       rows: np.ndarray, counts: np.ndarray) -> None:
    """Raise ValueError unless ``rows`` fit the file's residue rows of ``positions``."""
    positions = np.asarray(positions, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    dset = f[RESIDUES]
    if rows.shape[1:] != dset.shape[1:] or rows.shape[0] != int(counts.sum()):
        raise ValueError(f"residue rows of shape {rows.shape} for {int(counts.sum())} "
                         f"residues of shape {dset.shape[1:]}")
    if positions.size == 0:
        return
    if positions.min() < 0 or positions.max() >= offsets.shape[0] - 1:
        raise ValueError(f"positions outside 0..{offsets.shape[0] - 2}")
    expected = offsets[positions + 1] - offsets[positions]
    if not np.array_equal(expected, counts):
        bad = int(np.flatnonzero(expected != counts)[0])
        raise ValueError(f"row {int(positions[bad])} has {int(counts[bad])} residue rows, "
                         f"the file expects {int(expected[bad])}")


def residue_runs(offsets: np.ndarray, positions: np.ndarray, rows: np.ndarray,
                 counts: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(first residue row in the file, rows) of each run of adjacent positions, for rows
    checked by :func:`check_residue_rows`: a view of ``rows`` where the run's sequences are
    adjacent in it too, else a gathered copy. Lazy: a writer thread may do the work."""
    positions = np.asarray(positions, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    if positions.size == 0:
        return
    starts = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    order = np.argsort(positions, kind="stable")
    pos = positions[order]
    for lo, data in batch_runs(pos, order, rows, starts):
        if data.shape[0]:
            yield int(offsets[pos[lo]]), data


def copy_residues(src: h5py.File, dst: h5py.File, keep: np.ndarray) -> None:
    """Copy the residues of the ``keep`` rows (bool mask over N) from ``src`` into new
    datasets in ``dst``, in order, in bounded memory. Does nothing if ``src`` has none."""
    offsets = read_offsets(src)
    if offsets is None:
        return
    residues = src[RESIDUES]
    counts = np.diff(offsets)[keep]
    new_offsets = create_residue_datasets(dst, counts, residues.shape[1:], str(residues.dtype))
    out = dst[RESIDUES]
    row_bytes = int(np.prod(residues.shape[1:])) * residues.dtype.itemsize
    block = rows_per_block(row_bytes, _BLOCK_BYTES)
    kept_rows = np.flatnonzero(keep)
    # Runs of kept rows are contiguous in both files; copy each run in blocks.
    breaks = np.flatnonzero(np.diff(kept_rows) != 1) + 1
    cursor = 0
    for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(kept_rows)]):
        if hi <= lo:
            continue
        a, b = int(offsets[kept_rows[lo]]), int(offsets[kept_rows[hi - 1] + 1])
        for s in range(a, b, block):
            e = min(s + block, b)
            out[cursor:cursor + e - s] = residues[s:e]
            cursor += e - s
    assert cursor == new_offsets[-1]


def check_residues(f: h5py.File, path: Path, n: int, expected_counts: np.ndarray | None
                   ) -> str | None:
    """What is wrong with the per-residue datasets of a file of ``n`` rows, or None.

    ``expected_counts``: the residue count each row must have (from its length, the
    truncation and the long-sequence mode), or None to skip that check.
    """
    has = [name in f for name in (RESIDUES, RESIDUE_OFFSETS)]
    if not any(has):
        return None
    if not all(has):
        return f"{path}: one of {RESIDUES!r} and {RESIDUE_OFFSETS!r} is missing"
    offsets = f[RESIDUE_OFFSETS][:]
    residues = f[RESIDUES]
    if offsets.shape != (n + 1,) or offsets.dtype != np.int64:
        return f"{path}: {RESIDUE_OFFSETS} is {offsets.dtype} {offsets.shape}, expected ({n + 1},)"
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != residues.shape[0]:
        return f"{path}: {RESIDUE_OFFSETS} do not run from 0 to {residues.shape[0]}"
    if expected_counts is not None and not np.array_equal(np.diff(offsets), expected_counts):
        return f"{path}: residue counts disagree with the lengths"
    return None
