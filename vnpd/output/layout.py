"""The output file's layout: the datasets a new file gets, its root attributes, and how a
failed HDF5 write is reported; the parts of :mod:`vnpd.output.hdf5` that say what is in
the file rather than how a job fills it.

Example::

    f = new_file(path, n=3, dim=1280, output_dtype="float32", fill=True)
    write_attrs(f, meta, num_sequences=3, quarantined_ids=[])
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vnpd import __version__
from vnpd.compute.choices import OUTPUT_DTYPES
from vnpd.output.schema import embedding_shape, layer_attributes

SCHEMA_VERSION = 1
_LIBVER = ("v108", "v108")
_STR = h5py.string_dtype("utf-8")


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
    fill_time = "ifset" if fill else "never"
    f = h5py.File(path, "w", libver=_LIBVER)
    try:
        f.create_dataset("embeddings", embedding_shape(n, dim, num_layers), output_dtype,
                         fillvalue=np.nan,
                         dcpl=early_alloc(), fill_time=fill_time)
        f.create_dataset("ids", (n,), _STR, dcpl=early_alloc())
        f.create_dataset("lengths", (n,), np.int32, fillvalue=-1, dcpl=early_alloc(),
                         fill_time=fill_time)
        f.flush()  # the layout is on disk now; later writes only touch raw data
    except BaseException:
        f.close()
        raise
    return f


def field_dtype(values: np.ndarray) -> Any:
    """A row field's HDF5 type: UTF-8 strings for text, else the array's own dtype."""
    return _STR if values.dtype.kind in "OUS" else values.dtype


def field_data(values: np.ndarray) -> Any:
    return values.tolist() if values.dtype.kind in "OUS" else values


def write_attrs(f: h5py.File, meta: OutputMeta, num_sequences: int,
                 quarantined_ids: list[str], extra: Mapping[str, Any] | None = None) -> None:
    attrs = f.attrs
    for key, value in (extra or {}).items():
        is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        attrs[key] = np.int64(value) if is_int else value
    for key in ("model", "dtype", "pooling", "attention_backend", "source_name",
                "source_sha256"):
        attrs[key] = str(getattr(meta, key))
    for key, value in layer_attributes(meta.layers or (meta.layer,)).items():
        attrs[key] = value
    attrs["long_sequences"] = meta.long_sequences
    if meta.long_sequences == "window":
        attrs["window_stride"] = np.int64(meta.window_stride)
    attrs["truncation"] = np.int64(meta.truncation)
    attrs["vnpd_version"] = __version__
    attrs["num_sequences"] = np.int64(num_sequences)
    attrs["created_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    # Created explicitly so that an empty list still has a string type.
    attrs.create("quarantined_ids", data=np.array(quarantined_ids, dtype=object),
                 shape=(len(quarantined_ids),), dtype=_STR)
    attrs["schema_version"] = np.int64(SCHEMA_VERSION)
