"""Output HDF5 files: fill a partial file in state/ and finalize it.

``vnpd.output.verify`` checks a finished file and ``vnpd.output.outbox`` publishes it atomically.

Example (the daemon's way: prefilled at create, finalized in place)::

    out = PartialOutput.create(state / "job7.h5", num_sequences=3, dim=1280,
                               output_dtype="float32", ids=["a", "b", "c"],
                               lengths=np.array([10, 20, 5]), meta=meta)
    out.write_rows(np.array([2, 0, 1]), rows)        # any order
    out.flush()                                      # durable: the journal may record it
    out.finalize(meta, attributes={"cache_hits": 0}) # marks it complete, copies nothing
    verify_output(out.path)
    publish_atomically(out.path, unique_destination(outbox, output_name_for("sample.fasta")))

Without ``meta`` at create (``vnpd embed``, earlier versions' files), ids and lengths come
from ``write_ids_lengths`` or ``finalize(ids=..., lengths=...)``; ``finalize(meta,
quarantined=[1])`` drops rows by writing the file anew.

Why the layout is what it is:
- Datasets are contiguous and allocated in full at ``create``. Rows arrive scattered
  (batches are packed by length), and a row written into a row-chunk costs a chunk
  read-modify-write: measured ~7k rows/s with 1 MiB chunks against ~60k rows/s
  contiguous. Full allocation reports a full disk at job start, and after it a row
  write touches raw data only, never layout metadata, so a flushed file stays readable
  whenever the process dies. ``write_rows`` (and ``write_residues``) therefore write
  with pwrite(2) at the rows' offsets in the file, past HDF5 (an HDF5 point selection
  cost ~20 us a row, the parent's hottest line); files are opened without HDF5's sieve
  buffer (``layout.open_h5``), so HDF5 never holds a stale copy of raw data.
- Unwritten rows read as zeros (embeddings: their space is reserved with
  posix_fallocate, not written, and no embedding is exactly zero everywhere), -1
  (lengths) and "" (ids; FASTA ids are never empty); ``verify_output`` relies on these
  to find rows that were never written.
- ``ids`` (variable-length strings, in HDF5's global heap: file metadata) are never
  written while rows are: the daemon's file is *prefilled* at create with everything
  but the embeddings and a marker ``schema_version`` = 0, which finalize sets to 1 in
  place. Why a SIGKILL anywhere in that leaves a file a restart handles:
  :mod:`vnpd.output.prefill`.
- Window mode's scratch (``window_slots``) is a sidecar file (``vnpd.output.scratch``),
  not a dataset of the partial file, so that finalize need not drop it by copying.
- Quarantined rows, ``meta`` that differs from the attributes written at create, or an
  earlier version's file with the scratch inside make ``finalize`` stream the kept rows
  into a new file beside this one, fsynced and renamed over it: the one case that
  copies the rows.
- Format bounds are ("v108", "v108"): "latest" sets a superblock flag that makes a file
  left by a killed process unopenable without ``h5clear``, which would defeat resuming.
  v108 still has dense attribute storage, so a long ``quarantined_ids`` list fits.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import structlog

from vnpd.output import residues as residue_io
from vnpd.output.background import BackgroundWriter
from vnpd.output.compact import compact, discard, prefilled_contents
from vnpd.output.layout import (SCHEMA_VERSION, OutputMeta, field_data, field_dtype,
                                new_file, open_h5, pwrite_runs, raw_offset, row_fields_of,
                                same_meta, write_attrs)
from vnpd.output.outbox import fsync_dir, fsync_file
from vnpd.output.prefill import mark_finalized, prefill
from vnpd.output.schema import EMBEDDINGS, RESIDUES, WINDOW_SLOTS, batch_runs
from vnpd.output.scratch import WindowScratch, scratch_path
from vnpd.output.verify import IncompleteOutputError, _check_datasets

__all__ = ["SCHEMA_VERSION", "OutputMeta", "PartialOutput"]  # the first two live in layout

log = structlog.get_logger(__name__)
_attempts = itertools.count()  # names the temp file of each rebuild


class PartialOutput:
    """A partial HDF5 file being filled, in the state dir (never in the outbox).

    Datasets: ``embeddings`` (N, D) or (N, n_layers, D) of ``output_dtype``, ``ids`` (N,)
    UTF-8 strings, ``lengths`` (N,) int32, and the per-residue ones if asked for. Rows may
    be written in any order at their input positions. After ``flush`` returns,
    everything written so far survives a crash of this process or of the machine, and
    ``open_existing`` can continue the file.
    """

    def __init__(self, path: Path, file: h5py.File) -> None:
        self.path = path
        self._f: h5py.File | None = file
        emb = file[EMBEDDINGS]
        self.num_sequences: int = int(emb.shape[0])
        self.row_shape: tuple[int, ...] = tuple(int(d) for d in emb.shape[1:])
        self.dim: int = self.row_shape[-1]
        self.num_layers: int = 1 if emb.ndim == 2 else self.row_shape[0]
        self.output_dtype: str = str(emb.dtype)
        self._residue_offsets = residue_io.read_offsets(file)
        # Where rows and residue rows live in the file, for raw writes (None: via HDF5).
        self._rows_at = raw_offset(emb)
        self._residues_at = raw_offset(file[RESIDUES]) if RESIDUES in file else None
        self._fd: int | None = None
        self._writer: BackgroundWriter | None = None
        self._writer_limit = 0  # > 0: raw writes go through a BackgroundWriter
        self._scratch: WindowScratch | None = None

    @classmethod
    def create(cls, path: Path, num_sequences: int, dim: int, output_dtype: str, *,
               num_layers: int = 1, residue_counts: np.ndarray | None = None,
               window_slots: tuple[int, ...] | None = None,
               window_plan: tuple[int, ...] = (), ids: Iterable[str] | None = None,
               lengths: np.ndarray | None = None, meta: OutputMeta | None = None,
               row_fields: Mapping[str, np.ndarray] | None = None,
               attributes: Mapping[str, Any] | None = None) -> PartialOutput:
        """Create (truncating any existing file) a partial file with every row unwritten.

        Reserves the space of all N*D cells (posix_fallocate, nothing written) and
        raises OSError (ENOSPC) right here if the output cannot fit; the file is then
        removed, so that ``create`` can be called again (h5py reports a failed write as
        ValueError or RuntimeError too: those become the OSError they carry).
        ``num_layers`` > 1 makes ``embeddings`` (N, n_layers, D); ``residue_counts`` (N,)
        adds the per-residue datasets (``vnpd.output.residues``), allocated here.
        ``window_slots`` (the shape of the daemon's window scratch, float32, slots first)
        creates the sidecar that holds it (``vnpd.output.scratch``), allocated here too
        and never part of the output; ``window_plan`` is kept with it (what numbers its
        slots, for a restart to check).

        With ``meta`` (the daemon), the file is *prefilled*: ``ids`` (an iterable of N
        strings, read in blocks), ``lengths``, ``row_fields`` and every root attribute
        (``attributes`` added) are written and made durable now, then the marker
        ``schema_version`` = 0; ``finalize`` later only marks it in place (see the module
        doc). Raises ValueError if the ids or fields do not match N.
        """
        out = None
        side = scratch_path(path)
        try:
            out = cls(path, new_file(path, num_sequences, dim, output_dtype, fill=True,
                                     num_layers=num_layers))
            f = out._file()
            if residue_counts is not None:
                residue_io.create_residue_datasets(f, residue_counts, out.row_shape,
                                                   output_dtype)
                out._residue_offsets = residue_io.read_offsets(f)
                out._residues_at = raw_offset(f[RESIDUES])
            WindowScratch.remove(side)  # an earlier try's
            if window_slots is not None:
                out._scratch = WindowScratch.create(side, window_slots, window_plan)
            if meta is not None:
                prefill(f, ids, lengths, meta, row_fields, attributes, out.write_ids_lengths,
                        out.flush)
                fsync_dir(path.parent)
            else:
                f.flush()  # the layout on disk; the caller's flush makes rows durable
            return out
        except BaseException as exc:
            if out is not None and out._scratch is not None:
                out._scratch.close()
            side.unlink(missing_ok=True)
            discard(out._f if out is not None else None, path, exc)

    @classmethod
    def open_existing(cls, path: Path) -> PartialOutput:
        """Reopen a partial file for writing (after a daemon restart), with its window
        scratch if it has one (a finalized file's is removed: it is of no more use).

        Raises IncompleteOutputError if the file cannot be opened or lacks the datasets
        or their shapes disagree; the caller should then start the job's file anew.
        """
        try:
            file = open_h5(path, "r+")
        except OSError as exc:
            raise IncompleteOutputError(f"{path}: cannot reopen partial output: {exc}") from exc
        try:
            _check_datasets(file, path)
        except BaseException:
            file.close()
            raise
        out = cls(path, file)
        if out.finalized:
            WindowScratch.remove(scratch_path(path))  # a crash came before its removal
        else:
            out._scratch = WindowScratch.of(file, path)
        return out

    @property
    def closed(self) -> bool:
        return self._f is None

    @property
    def prefilled(self) -> bool:
        """True if ids, lengths, fields and attributes are in the file (see ``create``)."""
        return "schema_version" in self._file().attrs

    @property
    def finalized(self) -> bool:
        """True once ``finalize`` has marked the file complete (on an open file)."""
        return int(self._file().attrs.get("schema_version", 0)) >= 1

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
        with np.errstate(over="ignore", invalid="ignore"):  # in batch order: one copy
            rows = np.ascontiguousarray(embeddings.astype(self.output_dtype, copy=False))
        if not np.isfinite(rows).all():
            raise ValueError(f"non-finite embedding values (as {self.output_dtype})")
        runs = batch_runs(pos, order, rows)
        if self._rows_at is None:  # not a contiguous, allocated dataset: through HDF5
            dset = self._file()[EMBEDDINGS]
            for lo, data in runs:
                dset[pos[lo]:pos[lo] + data.shape[0]] = data
            return
        # Raw writes at the rows' file offsets: the layout is fixed since create, and an
        # HDF5 point selection costs ~20 us a row (the parent's hottest line at 30k rows/s).
        row_bytes, at = rows[0].nbytes, self._rows_at
        self._pwrite(((memoryview(data).cast("B"), at + int(pos[lo]) * row_bytes)
                      for lo, data in runs), rows.nbytes)

    def write_in_background(self, limit_bytes: int) -> None:
        """From now on, raw row writes return at once and run on a thread
        (:mod:`vnpd.output.background`); ``flush``, ``finalize`` and ``close`` wait for
        them, and a failed one is raised by the next write or flush. The arrays given to
        ``write_rows`` and ``write_residues`` must then not change after the call."""
        self._writer_limit = limit_bytes

    def _pwrite(self, writes: Iterable[tuple[memoryview, int]], nbytes: int) -> None:
        """pwrite (bytes, offset) pairs: here, or on the background writer's thread."""
        if not self._writer_limit:
            pwrite_runs(self._raw_fd(), writes)
            return
        if self._writer is None:
            self._writer = BackgroundWriter(self._raw_fd(), limit_bytes=self._writer_limit)
        self._writer.submit(writes, nbytes)

    def _drain(self) -> None:
        """Wait for the background writes; raise the first that failed."""
        if self._writer is not None:
            self._writer.drain()

    def _raw_fd(self) -> int:
        if self._fd is None:
            self._file()  # raises if closed
            self._fd = os.open(self.path, os.O_WRONLY)
        return self._fd

    def write_residues(self, positions: np.ndarray, rows: np.ndarray,
                       counts: np.ndarray) -> None:
        """Write residue rows: ``counts[i]`` rows for ``positions[i]``, one sequence after
        the other in ``rows`` (cast to the output dtype). Raises ValueError if the file
        has no per-residue datasets or a count disagrees with its offsets."""
        offsets = self._residue_offsets
        if offsets is None:
            raise ValueError(f"{self.path}: no per-residue datasets")
        if self._residues_at is None:  # not a contiguous, allocated dataset: through HDF5
            residue_io.write_residues(self._file(), offsets, positions, rows, counts)
            return
        residue_io.check_residue_rows(self._file(), offsets, positions, rows, counts)
        with np.errstate(over="ignore", invalid="ignore"):
            rows = np.ascontiguousarray(rows, dtype=self.output_dtype)
        row_bytes = int(np.prod(rows.shape[1:])) * rows.itemsize
        at = self._residues_at
        self._pwrite(((memoryview(data).cast("B"), at + start * row_bytes)
                      for start, data in residue_io.residue_runs(offsets, positions, rows,
                                                                 counts)), rows.nbytes)

    @property
    def has_residues(self) -> bool:
        return self._residue_offsets is not None

    @property
    def window_slots_shape(self) -> tuple[int, ...] | None:
        """The shape of the window scratch, or None if the file has none."""
        self._file()
        return self._scratch.shape if self._scratch is not None else None

    @property
    def window_plan(self) -> tuple[int, ...]:
        """The ``window_plan`` given at ``create`` (() without window scratch)."""
        self._file()
        return self._scratch.plan if self._scratch is not None else ()

    def write_window_slots(self, slots: np.ndarray, values: np.ndarray) -> None:
        """Write ``values[i]`` (float32) into scratch slot ``slots[i]`` (unique, any order);
        writing a slot again replaces it."""
        self._file()
        if self._scratch is None:
            raise ValueError(f"{self.path}: no window scratch")
        self._scratch.write(slots, values)

    def read_window_slots(self, start: int, stop: int) -> np.ndarray:
        self._file()
        if self._scratch is None:
            raise ValueError(f"{self.path}: no window scratch")
        return self._scratch.read(start, stop)

    def flush(self) -> None:
        """Make every row (and window slot) written so far durable (HDF5 flush, then
        fsync)."""
        self._file().flush()
        self._drain()
        if self._fd is not None:
            os.fsync(self._fd)
        else:
            fsync_file(self.path)
        if self._scratch is not None:
            self._scratch.flush()

    def finalize(self, meta: OutputMeta, *, quarantined: Sequence[int] = (),
                 ids: Iterable[str] | None = None, lengths: np.ndarray | None = None,
                 row_fields: Mapping[str, np.ndarray] | None = None,
                 attributes: Mapping[str, Any] | None = None) -> None:
        """Make this a complete output: attributes written, ``quarantined`` rows dropped
        (their ids go to ``quarantined_ids``), marked finalized; fsync and close, and
        remove the window scratch.

        A *prefilled* file (``create`` with ``meta``) already holds its ids, lengths, row
        fields and attributes: pass no ids, lengths or fields; ``attributes`` are the
        end-of-job ones (ints stored as int64), rewritten in place where create wrote a
        placeholder of the same type. With nothing to drop and ``meta`` as at create,
        finalize copies nothing (see the module doc).

        Otherwise ``ids`` and ``lengths`` (all N, in row order) are for a file whose ids
        and lengths were not written with ``write_ids_lengths``, ``row_fields`` are more
        per-row datasets (name -> (N,) array, in row order; strings become UTF-8
        strings), and ``attributes`` more root attributes, both from the input kind
        (``SequenceSource.row_fields``, ``.attributes``).

        Dropping rows, new ids, different ``meta`` or scratch inside the file (an earlier
        version's) streams the kept rows, in order, into a new file beside this one
        (bounded memory), which is fsynced and renamed over it; this file is then never
        changed otherwise: after a failure (a full disk raises OSError) it is as it was,
        and a reopened file can be finalized again. Does not check that every row was
        written: call ``verify_output``. Raises ValueError on a bad position, ids that
        do not match the rows in number, data passed for a prefilled file, or
        ``meta.layer`` < 0.
        """
        f = self._file()
        self._drain()  # the rows a rebuild reads, or a mark in place follows
        if meta.layer < 0:
            raise ValueError(f"meta.layer must be resolved to >= 0, not {meta.layer}")
        drop = np.unique(np.asarray(quarantined, dtype=np.int64))
        if drop.size and (drop[0] < 0 or drop[-1] >= self.num_sequences):
            raise ValueError(f"quarantined positions outside 0..{self.num_sequences - 1}")
        extra = dict(attributes or {})
        copy = bool(drop.size) or WINDOW_SLOTS in f
        if self.prefilled:
            if ids is not None or lengths is not None or row_fields:
                raise ValueError(f"{self.path}: prefilled at create; pass no ids or fields")
            if copy or not same_meta(f, meta):
                fields, kept = prefilled_contents(f)
                self._rebuild(meta, drop, None, None, fields, {**kept, **extra})
            else:
                self.flush()  # every row durable before anything says the file is complete
                mark_finalized(f, extra, self.flush)
                self.close()
        else:
            fields = row_fields_of(self.num_sequences, row_fields)
            if copy or ids is not None:
                self._rebuild(meta, drop, ids, lengths, fields, extra)
            else:
                for name, values in fields.items():
                    f.create_dataset(name, data=field_data(values), dtype=field_dtype(values))
                write_attrs(f, meta, self.num_sequences, [], extra)
                self.close()
        WindowScratch.remove(scratch_path(self.path))  # finalized: of no more use
        log.info("output_finalized", path=str(self.path), source=meta.source_name,
                 num_sequences=self.num_sequences, quarantined=int(drop.size))

    def _rebuild(self, meta: OutputMeta, drop: np.ndarray, ids: Iterable[str] | None,
                 lengths: np.ndarray | None, fields: dict[str, np.ndarray],
                 extra: dict[str, Any]) -> None:
        # A fresh name per attempt: a file whose write failed may stay open in HDF5.
        tmp = self.path.with_name(f".{self.path.name}.compact-{os.getpid()}-{next(_attempts)}")
        compact(self._file(), tmp, meta, drop, ids, lengths, fields, extra)
        self.close()
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        self.num_sequences -= int(drop.size)

    def close(self) -> None:
        """Flush, close and fsync the file; calling it again does nothing."""
        if self._f is None:
            return
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None
        self._f.flush()
        self._f.close()
        self._f = None
        writer, self._writer = self._writer, None
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                if writer is not None:
                    writer.drain()  # raises a failed background write
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            fsync_file(self.path)
