"""The daemon's partial file, prefilled at create and finalized in place: the marker.

``ids`` are variable-length strings, kept in HDF5's global heap: writing them changes
file metadata, which a process killed between two flushes can leave dangling (an id
pointing into a heap collection that never reached the disk). So they are never written
while rows are: a prefilled file gets ids, lengths, row fields and every attribute at
``create`` (the job's end-of-job counts as placeholders), which flushes and fsyncs them
(:func:`prefill`), and only then adds the marker ``schema_version`` = 0; during the job
only raw rows are written; finalize (:func:`mark_finalized`) flushes the rows, rewrites
the end-of-job counts with ``attrs.modify`` (fixed-size int64 values rewritten in place:
no allocation), flushes and fsyncs, then sets ``schema_version`` to 1 the same way,
flushes and fsyncs. ``created_utc`` is the time of ``create``.

The marker says how far a file got, whenever the process died:

- no ``schema_version`` (killed during ``create``): the ids may be dangling; the daemon
  treats the file as an earlier version's (``finalize`` takes ids and lengths from the
  input and writes a new file), or starts it anew if it does not open;
- ``schema_version`` 0: prefilled, rows being written, not complete: ``verify_output``
  refuses it, and finalize may run on it again after a restart (the counts it rewrote
  are rewritten);
- ``schema_version`` >= 1: finalized and complete (every row, and the counts, were
  flushed before the marker was set). A restart must not finalize, or compact, it a
  second time.

A kill inside the marker's write leaves 0 or 1, never anything between: the only bytes
it changes are the value and the checksum inside one 1 KiB metadata block (the
attribute's fractal-heap block), written with one pwrite(2); HDF5 rewrites the root's
object header and the superblock too, byte for byte as they were (checked on the parent
branch with strace and a byte diff of the file before and after). A count that create
did not foresee is added as a new attribute (new metadata) before that flush, so the
marker still comes last.

Example::

    prefill(f, ids, lengths, meta, fields, attributes, out.write_ids_lengths, out.flush)
    ...                                   # rows written raw, flushed
    mark_finalized(f, {"cache_hits": 3}, out.flush)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import h5py
import numpy as np

from vnpd.output.layout import (SCHEMA_VERSION, OutputMeta, attr_value, field_data,
                                field_dtype, row_fields_of, same_value, write_attrs)

_ID_BLOCK = 1 << 16  # ids read and written per block when prefilling


def prefill(f: h5py.File, ids: Iterable[str] | None, lengths: np.ndarray | None,
            meta: OutputMeta, row_fields: Mapping[str, np.ndarray] | None,
            attributes: Mapping[str, Any] | None,
            write_ids_lengths: Callable[[int, list[str], np.ndarray], None],
            flush: Callable[[], None]) -> None:
    """Write everything but the embeddings into a new file of N rows, ``flush`` (durable),
    then add the marker ``schema_version`` = 0 and ``flush`` again. Raises ValueError if
    the ids, lengths or fields do not match N."""
    if ids is None or lengths is None:
        raise ValueError("a prefilled partial file needs its ids and lengths")
    n = int(f["embeddings"].shape[0])
    fields = row_fields_of(n, row_fields)
    source = iter(ids)
    for lo in range(0, n, _ID_BLOCK):
        block = list(itertools.islice(source, _ID_BLOCK))
        if len(block) != min(_ID_BLOCK, n - lo):
            raise ValueError(f"{lo + len(block)} ids for {n} rows")
        write_ids_lengths(lo, block, np.asarray(lengths[lo:lo + len(block)]))
    if next(source, None) is not None:
        raise ValueError(f"more ids than the {n} rows")
    for name, values in fields.items():
        f.create_dataset(name, data=field_data(values), dtype=field_dtype(values))
    write_attrs(f, meta, n, [], attributes, marker=None)
    flush()  # all of it durable before the marker says so
    f.attrs["schema_version"] = np.int64(0)
    flush()


def mark_finalized(f: h5py.File, extra: Mapping[str, Any], flush: Callable[[], None]) -> None:
    """Finalize a prefilled file in place, its rows flushed already: the end-of-job
    attributes ``extra``, ``flush`` (durable), then the marker ``schema_version`` = 1."""
    attrs = f.attrs
    for key, value in extra.items():
        value = attr_value(value)
        if key in attrs and same_value(attrs[key], value):
            continue
        old = np.asarray(attrs[key]) if key in attrs else None
        new = np.asarray(value)
        if old is not None and old.shape == new.shape and old.dtype == new.dtype \
                and old.dtype.kind in "iuf":
            attrs.modify(key, value)  # a placeholder of create: rewritten in place
        else:
            attrs[key] = value  # one create did not foresee: new metadata, flushed below
    flush()
    attrs.modify("schema_version", np.int64(SCHEMA_VERSION))
