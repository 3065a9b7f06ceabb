"""The copy path of finalize: stream a partial file's kept rows into a new file.

:meth:`vnpd.output.hdf5.PartialOutput.finalize` takes it when rows are quarantined, when
the ids come from the input (a file that is not prefilled: ``vnpd embed``, an earlier
version's), when ``meta`` differs from what create wrote, or when the window scratch is
inside the file (an earlier version's). Memory stays bounded: rows go in blocks.

Example::

    compact(src, tmp, meta, drop=np.array([1]), ids=None, lengths=None, fields={}, extra={})
    os.replace(tmp, path)   # after src is closed
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

import h5py
import numpy as np

from vnpd.output import residues as residue_io
from vnpd.output.layout import (BASE_ATTRS, OutputMeta, as_write_error, field_data,
                                field_dtype, new_file, write_attrs)
from vnpd.output.outbox import fsync_file
from vnpd.output.schema import (EMBEDDINGS, IDS, LENGTHS, RESIDUE_OFFSETS, RESIDUES,
                                WINDOW_SLOTS, rows_per_block)

_NOT_FIELDS = (EMBEDDINGS, IDS, LENGTHS, RESIDUES, RESIDUE_OFFSETS, WINDOW_SLOTS)


def prefilled_contents(f: h5py.File) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A prefilled file's row fields (read whole: N values each, strings as str) and the
    root attributes that are not ``meta``'s (its kind's, the job's)."""
    fields = {name: f[name].asstr()[:] if h5py.check_string_dtype(f[name].dtype)
              else f[name][:] for name in f if name not in _NOT_FIELDS}
    return fields, {k: v for k, v in f.attrs.items() if k not in BASE_ATTRS}


def compact(src: h5py.File, tmp: Path, meta: OutputMeta, drop: np.ndarray,
            ids: Iterable[str] | None, lengths: np.ndarray | None,
            fields: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
    """Write ``src`` without the rows ``drop`` (sorted, unique) as a complete output at
    ``tmp``, fsynced: ``ids``/``lengths`` (all N, in row order) if given, else ``src``'s;
    ``fields`` (N rows each) and ``extra`` attributes. On failure ``tmp`` is removed and
    the error raised (a failed write as OSError)."""
    emb = src[EMBEDDINGS]
    n, row_shape, output_dtype = int(emb.shape[0]), tuple(emb.shape[1:]), str(emb.dtype)
    kept = n - drop.size
    dst = None
    try:
        # Every kept row is written below, so the fill pass would be wasted I/O.
        dst = new_file(tmp, kept, int(row_shape[-1]), output_dtype, fill=False,
                       num_layers=1 if len(row_shape) == 1 else int(row_shape[0]))
        for name, values in fields.items():
            dst.create_dataset(name, (kept, *values.shape[1:]), field_dtype(values))
        keep = np.ones(n, dtype=bool)
        keep[drop] = False
        id_source = iter(ids) if ids is not None else None
        dropped_ids: list[str] = []
        row_bytes = int(np.prod(row_shape)) * np.dtype(output_dtype).itemsize
        step = rows_per_block(row_bytes)
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
        discard(dst, tmp, exc)


def discard(file: h5py.File | None, path: Path, exc: BaseException) -> NoReturn:
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
