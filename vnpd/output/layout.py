"""The output file's layout: how it is opened and created, its root attributes, raw
writes of rows at their offsets, and how a failed HDF5 write is reported; the parts of
:mod:`vnpd.output.hdf5` that say what is in the file rather than how a job fills it (see
its module doc for why the layout is what it is).

Example::

    f = new_file(path, n=3, dim=1280, output_dtype="float32", fill=True)
    write_attrs(f, meta, num_sequences=3, quarantined_ids=[])
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vnpd import __version__
from vnpd.compute.choices import OUTPUT_DTYPES
from vnpd.output.schema import (EMBEDDINGS, IDS, LENGTHS, RESIDUE_OFFSETS, RESIDUES,
                                WINDOW_SLOTS, embedding_shape, layer_attributes)

SCHEMA_VERSION = 1
_LIBVER_IDS = (h5py.h5f.LIBVER_V18, h5py.h5f.LIBVER_V18)  # ("v108", "v108"): see hdf5.py
_STR = h5py.string_dtype("utf-8")
# Datasets of our own: never a row field (the rest of a prefilled file's datasets are).
_TAKEN = frozenset({EMBEDDINGS, IDS, LENGTHS, RESIDUES, RESIDUE_OFFSETS, WINDOW_SLOTS})
# The root attributes ``write_attrs`` writes itself (the rest are a kind's or a job's).
BASE_ATTRS = frozenset({"model", "dtype", "pooling", "attention_backend", "source_name",
                        "source_sha256", "layer", "layers", "long_sequences", "window_stride",
                        "truncation", "vnpd_version", "num_sequences", "created_utc",
                        "quarantined_ids", "schema_version"})


@dataclass(frozen=True)
class OutputMeta:
    """What produced an output file; written as root attributes by ``finalize``."""

    model: str              # model name or checkpoint path as given
    layer: int              # resolved non-negative layer index
    dtype: str              # compute dtype, e.g. "bfloat16"
    truncation: int
    attention_backend: str  # "flash_attn", "cudnn", "torch_varlen" or "exact"
    source_name: str        # input file's name
    source_sha256: str
    pooling: str = "mean"
    layers: tuple[int, ...] = ()    # resolved layers in the embeddings' order; () = (layer,)
    long_sequences: str = "truncate"  # "truncate" | "window"
    window_stride: int = 0          # window mode: residues between window starts


def early_alloc() -> h5py.h5p.PropDCID:
    # A fresh list per dataset: h5py stores each dataset's fill value into the list.
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


def open_h5(path: Path, mode: str) -> h5py.File:
    """Open ("r+") or create ("w") with the format bounds and no sieve buffer: rows are
    written past HDF5 (``pwrite_runs``), so HDF5 must keep no raw data of its own."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(*_LIBVER_IDS)
    fapl.set_sieve_buf_size(0)
    name = os.fsencode(path)
    if mode == "w":
        return h5py.File(h5py.h5f.create(name, h5py.h5f.ACC_TRUNC, fapl=fapl))
    return h5py.File(h5py.h5f.open(name, h5py.h5f.ACC_RDWR, fapl=fapl))


def raw_offset(dset: h5py.Dataset) -> int | None:
    """Where a dataset's values start in its file, if they may be written there with
    pwrite(2): contiguous, allocated, unfiltered. None otherwise (write through HDF5)."""
    if dset.chunks is not None or dset.compression is not None:
        return None
    offset = dset.id.get_offset()
    return None if offset is None else int(offset)


def pwrite_runs(fd: int, writes: Iterable[tuple[memoryview, int]]) -> None:
    """Write each (bytes, file offset) with pwrite(2), whole."""
    for data, offset in writes:
        while data:
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written


def as_write_error(exc: Exception, path: Path) -> OSError | None:
    """``exc`` as the OSError that callers retry, if it is a failed write, else None.

    h5py reports the file driver's failure (a full disk, say) as OSError, RuntimeError
    or ValueError depending on the call; HDF5's message carries the errno.
    """
    if isinstance(exc, OSError):
        return exc
    found = re.search(r"errno = (\d+)", str(exc))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, f"{os.strerror(code)}: cannot write {path}: {exc}")


def new_file(path: Path, n: int, dim: int, output_dtype: str, *, fill: bool,
              num_layers: int = 1) -> h5py.File:
    if output_dtype not in OUTPUT_DTYPES:
        raise ValueError(f"output_dtype must be one of {OUTPUT_DTYPES}, not {output_dtype!r}")
    if n < 0 or dim < 1:
        raise ValueError(f"need num_sequences >= 0 and dim >= 1, got {n} and {dim}")
    if num_layers < 1:
        raise ValueError(f"need num_layers >= 1, got {num_layers}")
    f = open_h5(path, "w")
    try:
        # Never filled: unwritten rows read as zeros (verify_output refuses an all-zero
        # row), and the space is reserved below instead of written: a NaN fill cost a
        # write of the whole output before a job's first batch (9 s a 768 MB job on the
        # GPU host).
        emb = f.create_dataset("embeddings", embedding_shape(n, dim, num_layers),
                               output_dtype, dcpl=early_alloc(), fill_time="never")
        f.create_dataset("ids", (n,), _STR, dcpl=early_alloc())
        f.create_dataset("lengths", (n,), np.int32, fillvalue=-1, dcpl=early_alloc(),
                         fill_time="ifset" if fill else "never")
        f.flush()  # the layout is on disk now; later writes only touch raw data
        if fill and emb.nbytes:
            reserve(path, emb.id.get_offset(), emb.id.get_storage_size())
    except BaseException:
        f.close()
        raise
    return f


def reserve(path: Path, offset: int, length: int) -> None:
    """Allocate ``length`` bytes of ``path`` at ``offset`` without writing them (they read
    as zeros): a disk too small for the output raises OSError (ENOSPC) now, not mid-job."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, offset, length)
    finally:
        os.close(fd)


def field_dtype(values: np.ndarray) -> Any:
    """A row field's HDF5 type: UTF-8 strings for text, else the array's own dtype."""
    return _STR if values.dtype.kind in "OUS" else values.dtype


def field_data(values: np.ndarray) -> Any:
    return values.tolist() if values.dtype.kind in "OUS" else values


def row_fields_of(n: int, row_fields: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """``row_fields`` as arrays; raises ValueError unless each has ``n`` rows and a name
    no dataset of the file has."""
    fields = {name: np.asarray(values) for name, values in (row_fields or {}).items()}
    for name, values in fields.items():
        if name in _TAKEN or values.shape[:1] != (n,):
            raise ValueError(f"row field {name!r} of shape {values.shape} for {n} rows "
                             "(or a name already taken)")
    return fields


def attr_value(value: Any) -> Any:
    """How an attribute value is stored: ints as int64, anything else as given."""
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    return np.int64(value) if is_int else value


def meta_attributes(meta: OutputMeta) -> dict[str, Any]:
    """The root attributes that ``meta`` says (as stored)."""
    attrs: dict[str, Any] = {key: str(getattr(meta, key)) for key in (
        "model", "dtype", "pooling", "attention_backend", "source_name", "source_sha256")}
    attrs.update(layer_attributes(meta.layers or (meta.layer,)))
    attrs["long_sequences"] = meta.long_sequences
    if meta.long_sequences == "window":
        attrs["window_stride"] = np.int64(meta.window_stride)
    attrs["truncation"] = np.int64(meta.truncation)
    return attrs


def same_meta(f: h5py.File, meta: OutputMeta) -> bool:
    """Whether the attributes written at create describe ``meta``."""
    return all(key in f.attrs and same_value(f.attrs[key], value)
               for key, value in meta_attributes(meta).items())


def same_value(stored: Any, value: Any) -> bool:
    if isinstance(stored, bytes):
        stored = stored.decode()
    try:
        return bool(np.array_equal(np.asarray(stored), np.asarray(value)))
    except (TypeError, ValueError):
        return False


def write_attrs(f: h5py.File, meta: OutputMeta, num_sequences: int,
                 quarantined_ids: list[str], extra: Mapping[str, Any] | None = None,
                 marker: int | None = SCHEMA_VERSION) -> None:
    """Every root attribute: ``extra`` (a kind's, a job's), ``meta``'s, the counts; and
    ``schema_version`` = ``marker`` unless None (a prefilled file sets it later)."""
    attrs = f.attrs
    for key, value in (extra or {}).items():
        attrs[key] = attr_value(value)
    for key, value in meta_attributes(meta).items():
        attrs[key] = value
    attrs["vnpd_version"] = __version__
    attrs["num_sequences"] = np.int64(num_sequences)
    attrs["created_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    # Created explicitly so that an empty list still has a string type.
    attrs.create("quarantined_ids", data=np.array(quarantined_ids, dtype=object),
                 shape=(len(quarantined_ids),), dtype=_STR)
    if marker is not None:
        attrs["schema_version"] = np.int64(marker)

