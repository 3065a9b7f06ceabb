"""Output HDF5 files: fill a partial file in state/ and finalize it.

``vnpd.output.verify`` checks a finished file and ``vnpd.output.outbox`` publishes it atomically.

Example::

    out = PartialOutput.create(state / "job7.h5", num_sequences=3, dim=1280,
                               output_dtype="float32")
    out.write_ids_lengths(0, ["a", "b", "c"], np.array([10, 20, 5]))
    out.write_rows(np.array([2, 0, 1]), rows)        # any order
    out.flush()                                      # durable: the journal may record it
    out.finalize(meta, quarantined=[1])              # the file now holds "a" and "c"
    verify_output(out.path)
    publish_atomically(out.path, unique_destination(outbox, output_name_for("sample.fasta")))

Why the layout is what it is:
- Datasets are contiguous and allocated in full at ``create``. Rows arrive scattered
  (batches are packed by length), and a row written into a row-chunk costs a chunk
  read-modify-write: measured ~7k rows/s with 1 MiB chunks against ~60k rows/s
  contiguous. Full allocation reports a full disk at job start, and after it a write
  touches raw data only, never layout metadata, so a flushed file stays readable
  whenever the process dies.
- Unwritten rows read as NaN (embeddings), -1 (lengths) and "" (ids; FASTA ids are
  never empty); ``verify_output`` relies on these fill values to find rows that were
  never written.
- ``ids`` are variable-length strings, kept in HDF5's global heap: writing them changes
  file metadata, which a process killed between two flushes can leave dangling (an id
  pointing into a heap collection that never reached the disk), and which a full disk
  can leave half-written. So the daemon's partial file receives embedding rows only,
  and ``finalize`` gets the ids and lengths (read from the input) and writes the
  output as a new file that replaces the partial one only once it is complete. A file
  with attributes (``finalized``) is therefore complete, and a daemon restarted after
  it must not finalize, or compact, it a second time.
- Format bounds are ("v108", "v108"): "latest" sets a superblock flag that makes a file
  left by a killed process unopenable without ``h5clear``, which would defeat resuming.
  v108 still has dense attribute storage, so a long ``quarantined_ids`` list fits.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, NoReturn, Sequence

import h5py
import numpy as np
import structlog

from vnpd.output import residues as residue_io
from vnpd.output.layout import (_LIBVER, SCHEMA_VERSION, OutputMeta, as_write_error, early_alloc,
                                field_data, field_dtype, new_file, write_attrs)
from vnpd.output.outbox import fsync_dir, fsync_file
from vnpd.output.schema import WINDOW_SLOTS
from vnpd.output.verify import IncompleteOutputError, _block_rows, _check_datasets

__all__ = ["SCHEMA_VERSION", "OutputMeta", "PartialOutput"]  # the first two live in layout

log = structlog.get_logger(__name__)
_attempts = itertools.count()  # names the temp file of each rebuild


class PartialOutput:
    """A partial HDF5 file being filled, in the state dir (never in the outbox).

    Datasets: ``embeddings`` (N, D) of ``output_dtype``, ``ids`` (N,) UTF-8 strings,
    ``lengths`` (N,) int32. Rows may be written in any order at their input positions.
    After ``flush`` returns, everything written so far survives a crash of this process
    or of the machine, and ``open_existing`` can continue the file.
    """

    def __init__(self, path: Path, file: h5py.File) -> None:
        self.path = path
        self._f: h5py.File | None = file
        emb = file["embeddings"]
        self.num_sequences: int = int(emb.shape[0])
        self.row_shape: tuple[int, ...] = tuple(int(d) for d in emb.shape[1:])
        self.dim: int = self.row_shape[-1]
        self.num_layers: int = 1 if emb.ndim == 2 else self.row_shape[0]
        self.output_dtype: str = str(emb.dtype)
        self._residue_offsets = residue_io.read_offsets(file)

    @classmethod
    def create(cls, path: Path, num_sequences: int, dim: int, output_dtype: str, *,
               num_layers: int = 1, residue_counts: np.ndarray | None = None,
               window_slots: tuple[int, ...] | None = None,
               window_plan: tuple[int, ...] = ()) -> PartialOutput:
        """Create (truncating any existing file) a partial file with every row unwritten.

        Writes the fill values for all N*D cells, so this costs O(N*D) disk writes and
        raises OSError (ENOSPC) right here if the output cannot fit; the file is then
        removed, so that ``create`` can be called again (h5py reports a failed write as
        ValueError or RuntimeError too: those become the OSError they carry).
        ``num_layers`` > 1 makes ``embeddings`` (N, n_layers, D); ``residue_counts`` (N,)
        adds the per-residue datasets (``vnpd.output.residues``), allocated here.
        ``window_slots`` (the shape of the daemon's window scratch, float32, slots first)
        adds that dataset, allocated here too and never copied into the output;
        ``window_plan`` is kept with it (what numbers its slots, for a restart to check).
        """
        file = None
        try:
            file = new_file(path, num_sequences, dim, output_dtype, fill=True,
                            num_layers=num_layers)
            if residue_counts is not None:
                residue_io.create_residue_datasets(
                    file, residue_counts, tuple(file["embeddings"].shape[1:]), output_dtype)
            if window_slots is not None:
                slots = file.create_dataset(WINDOW_SLOTS, window_slots, np.float32,
                                            dcpl=early_alloc(), fill_time="never")
                slots.attrs["plan"] = np.asarray(window_plan, dtype=np.int64)
            file.flush()
        except BaseException as exc:
            _discard(file, path, exc)
        return cls(path, file)

    @classmethod
    def open_existing(cls, path: Path) -> PartialOutput:
        """Reopen a partial file for writing (after a daemon restart).

        Raises IncompleteOutputError if the file cannot be opened or lacks the datasets
        or their shapes disagree; the caller should then start the job's file anew.
        """
        try:
            file = h5py.File(path, "r+", libver=_LIBVER)
        except OSError as exc:
            raise IncompleteOutputError(f"{path}: cannot reopen partial output: {exc}") from exc
        try:
            _check_datasets(file, path)
        except BaseException:
            file.close()
            raise
        return cls(path, file)

    @property
    def closed(self) -> bool:
        return self._f is None

    @property
    def finalized(self) -> bool:
        """True once ``finalize`` has written the attributes (on an open file)."""
        return "schema_version" in self._file().attrs

    def _file(self) -> h5py.File:
        if self._f is None:
            raise ValueError(f"{self.path}: partial output is closed")
        return self._f

    def write_ids_lengths(self, start: int, ids: Sequence[str], lengths: np.ndarray) -> None:
        """Write ids and residue lengths for rows ``start .. start+len(ids)-1``.

        Raises ValueError on mismatched sizes, rows out of range, or a negative length.
        """
        lengths = np.asarray(lengths)
        if lengths.ndim != 1 or len(ids) != lengths.shape[0]:
            raise ValueError(f"{len(ids)} ids but lengths of shape {lengths.shape}")
        stop = start + len(ids)
        if start < 0 or stop > self.num_sequences:
            raise ValueError(f"rows {start}..{stop} outside 0..{self.num_sequences}")
        if len(ids) == 0:
            return
        if lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("lengths must fit in 0..2**31-1")  # -1 marks an unwritten row
        f = self._file()
        f["ids"][start:stop] = list(ids)
        f["lengths"][start:stop] = lengths.astype(np.int32)

    def write_rows(self, positions: np.ndarray, embeddings: np.ndarray) -> None:
        """Write ``embeddings[i]`` at row ``positions[i]``, cast to the output dtype.

        ``positions`` are unique, in any order. Raises ValueError on shape mismatch,
        positions duplicated or out of range, or values that are not finite after the
        cast (NaN means "unwritten" in this file, and garbage must not be published).
        """
        positions = np.asarray(positions)
        embeddings = np.asarray(embeddings)
        if positions.ndim != 1 or not np.issubdtype(positions.dtype, np.integer):
            raise ValueError(f"positions must be a 1-D integer array, not {positions.dtype}"
                             f" of shape {positions.shape}")
        if embeddings.shape != (positions.shape[0], *self.row_shape):
            raise ValueError(f"embeddings of shape {embeddings.shape} for "
                             f"{positions.shape[0]} positions of shape {self.row_shape}")
        if positions.size == 0:
            return
        # h5py point selections require increasing indices.
        order = np.argsort(positions, kind="stable")
        pos = positions[order].astype(np.int64)
        if pos[0] < 0 or pos[-1] >= self.num_sequences:
            raise ValueError(f"positions outside 0..{self.num_sequences - 1}")
        steps = np.diff(pos)
        if np.any(steps == 0):
            raise ValueError("duplicate positions")
        with np.errstate(over="ignore", invalid="ignore"):
            rows = embeddings[order].astype(self.output_dtype)
        if not np.isfinite(rows).all():
            raise ValueError(f"non-finite embedding values (as {self.output_dtype})")
        dset = self._file()["embeddings"]
        breaks = np.flatnonzero(steps != 1) + 1
        if len(breaks) < 8:
            # Few contiguous runs: plain slices are the fastest write.
            for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(pos)]):
                dset[pos[lo]:pos[hi - 1] + 1] = rows[lo:hi]
        else:
            dset[pos] = rows  # one HDF5 write; measured ~10x faster than a loop of rows

    def write_residues(self, positions: np.ndarray, rows: np.ndarray,
                       counts: np.ndarray) -> None:
        """Write residue rows: ``counts[i]`` rows for ``positions[i]``, one sequence after
        the other in ``rows`` (cast to the output dtype). Raises ValueError if the file
        has no per-residue datasets or a count disagrees with its offsets."""
        if self._residue_offsets is None:
            raise ValueError(f"{self.path}: no per-residue datasets")
        residue_io.write_residues(self._file(), self._residue_offsets, positions, rows, counts)

    @property
    def has_residues(self) -> bool:
        return self._residue_offsets is not None

    @property
    def window_slots_shape(self) -> tuple[int, ...] | None:
        """The shape of the window scratch, or None if the file has none."""
        f = self._file()
        return tuple(int(d) for d in f[WINDOW_SLOTS].shape) if WINDOW_SLOTS in f else None

    @property
    def window_plan(self) -> tuple[int, ...]:
        """The ``window_plan`` given at ``create`` (() without window scratch)."""
        f = self._file()
        return tuple(int(v) for v in f[WINDOW_SLOTS].attrs["plan"]) if WINDOW_SLOTS in f else ()

    def write_window_slots(self, slots: np.ndarray, values: np.ndarray) -> None:
        """Write ``values[i]`` (float32) into scratch slot ``slots[i]`` (unique, any order);
        writing a slot again replaces it."""
        order = np.argsort(np.asarray(slots, dtype=np.int64), kind="stable")
        dset = self._file()[WINDOW_SLOTS]
        for i in order.tolist():
            dset[int(slots[i])] = values[i]

    def read_window_slots(self, start: int, stop: int) -> np.ndarray:
        return self._file()[WINDOW_SLOTS][start:stop]

    def flush(self) -> None:
        """Make every row written so far durable (HDF5 flush, then fsync)."""
        self._file().flush()
        fsync_file(self.path)

    def finalize(self, meta: OutputMeta, *, quarantined: Sequence[int] = (),
                 ids: Iterable[str] | None = None, lengths: np.ndarray | None = None,
                 row_fields: Mapping[str, np.ndarray] | None = None,
                 attributes: Mapping[str, Any] | None = None) -> None:
        """Make this a complete output: attributes written, ``quarantined`` rows dropped
        (their ids go to ``quarantined_ids``); fsync and close.

        ``ids`` and ``lengths`` (all N, in row order) are for a file whose ids and
        lengths were not written with ``write_ids_lengths``: the daemon passes them at
        the end, read from its input (see the module doc).

        ``row_fields`` are more per-row datasets (name -> (N,) array, in row order;
        strings as an object or str array become UTF-8 strings), with the quarantined
        rows dropped as from ``ids``; ``attributes`` are more root attributes (ints are
        stored as int64, anything else as given). Both come from the input kind
        (:meth:`vnpd.inputs.source.SequenceSource.row_fields`, ``.attributes``).

        With nothing to drop and no ``ids``, the attributes are written in place.
        Otherwise the kept rows are streamed, in order, into a new file beside this one
        (bounded memory), which is fsynced and renamed over it. This file is then never
        changed in place: after a failure (a full disk raises OSError) it is as it was,
        and a reopened file can be finalized again. Does not check that every row was
        written: call ``verify_output``. Raises ValueError on a bad position, ids that
        do not match the rows in number, or ``meta.layer`` < 0.
        """
        f = self._file()
        if meta.layer < 0:
            raise ValueError(f"meta.layer must be resolved to >= 0, not {meta.layer}")
        drop = np.unique(np.asarray(quarantined, dtype=np.int64))
        if drop.size and (drop[0] < 0 or drop[-1] >= self.num_sequences):
            raise ValueError(f"quarantined positions outside 0..{self.num_sequences - 1}")
        fields = {name: np.asarray(values) for name, values in (row_fields or {}).items()}
        for name, values in fields.items():
            if name in f or values.shape[:1] != (self.num_sequences,):
                raise ValueError(f"row field {name!r} of shape {values.shape} for "
                                 f"{self.num_sequences} rows (or a name already taken)")
        extra = dict(attributes or {})
        if not drop.size and ids is None and WINDOW_SLOTS not in f:
            for name, values in fields.items():
                f.create_dataset(name, data=field_data(values), dtype=field_dtype(values))
            write_attrs(f, meta, self.num_sequences, [], extra)
            self.close()
        else:
            self._rebuild(meta, drop, ids, lengths, fields, extra)
        log.info("output_finalized", path=str(self.path), source=meta.source_name,
                 num_sequences=self.num_sequences, quarantined=int(drop.size))

    def _rebuild(self, meta: OutputMeta, drop: np.ndarray, ids: Iterable[str] | None,
                 lengths: np.ndarray | None, fields: dict[str, np.ndarray],
                 extra: dict[str, Any]) -> None:
        src, n = self._file(), self.num_sequences
        kept = n - drop.size
        # A fresh name per attempt: a file whose write failed may stay open in HDF5.
        tmp = self.path.with_name(f".{self.path.name}.compact-{os.getpid()}-{next(_attempts)}")
        dst = None
        try:
            # Every kept row is written below, so the fill pass would be wasted I/O.
            dst = new_file(tmp, kept, self.dim, self.output_dtype, fill=False,
                            num_layers=self.num_layers)
            for name, values in fields.items():
                dst.create_dataset(name, (kept, *values.shape[1:]), field_dtype(values))
            keep = np.ones(n, dtype=bool)
            keep[drop] = False
            id_source = iter(ids) if ids is not None else None
            dropped_ids: list[str] = []
            step = _block_rows(int(np.prod(self.row_shape)), np.dtype(self.output_dtype).itemsize)
            cursor = 0
            for lo in range(0, n, step):
                hi = min(lo + step, n)
                mask = keep[lo:hi]
                count = int(mask.sum())
                block_ids = np.array(list(itertools.islice(id_source, hi - lo)) if id_source
                                     else src["ids"].asstr()[lo:hi], dtype=object)
                if block_ids.shape != (hi - lo,):
                    raise ValueError(f"{lo + len(block_ids)} ids for {n} rows")
                block_lengths = src["lengths"][lo:hi] if lengths is None else lengths[lo:hi]
                dst["embeddings"][cursor:cursor + count] = src["embeddings"][lo:hi][mask]
                dst["ids"][cursor:cursor + count] = block_ids[mask].tolist()
                dst["lengths"][cursor:cursor + count] = np.asarray(block_lengths)[mask]
                dropped_ids += [str(i) for i in block_ids[~mask]]
                for name, values in fields.items():
                    if count:
                        dst[name][cursor:cursor + count] = field_data(values[lo:hi][mask])
                cursor += count
            if id_source is not None and next(id_source, None) is not None:
                raise ValueError(f"more ids than the {n} rows")
            residue_io.copy_residues(src, dst, keep)
            write_attrs(dst, meta, kept, dropped_ids, extra)
            dst.close()
            fsync_file(tmp)
        except BaseException as exc:
            _discard(dst, tmp, exc)
        self.close()
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        self.num_sequences = kept

    def close(self) -> None:
        """Flush, close and fsync the file; calling it again does nothing."""
        if self._f is None:
            return
        self._f.flush()
        self._f.close()
        self._f = None
        fsync_file(self.path)


def _discard(file: h5py.File | None, path: Path, exc: BaseException) -> NoReturn:
    """A file being written failed with ``exc``: close it if it will close, remove it, and
    raise ``exc`` (a write failure as the OSError the daemon retries, ``as_write_error``).
    HDF5 may keep a file it failed to close open: the next try gets a new inode."""
    if file is not None:
        try:
            file.close()
        except Exception:  # noqa: BLE001 - a file whose flush failed (full disk) does not close
            pass
    path.unlink(missing_ok=True)
    error = as_write_error(exc, path) if isinstance(exc, Exception) else None
    if error is None or error is exc:
        raise exc
    raise error from exc
