"""Read and check output HDF5 files: the datasets and attributes a complete output has.

``verify_output`` is the check before a file is published. It finds rows that were never
written by how ``vnpd.output.hdf5`` leaves them (all-zero embeddings, -1 lengths, "" ids;
see that module for the layout), and reads in blocks, so memory stays bounded.

Example::

    verify_output(path)                  # raises IncompleteOutputError unless complete
    embeddings, ids, lengths, attrs = read_output(path)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vnpd.compute.choices import OUTPUT_DTYPES
from vnpd.output.residues import check_residues
from vnpd.output.schema import rows_per_block

REQUIRED_ATTRS = ("model", "layers", "dtype", "pooling", "truncation", "attention_backend",
                  "vnpd_version", "source_name", "source_sha256", "num_sequences",
                  "created_utc", "quarantined_ids", "schema_version")


class IncompleteOutputError(ValueError):
    """An HDF5 file is unreadable, inconsistent or not completely written."""


def _check_datasets(f: h5py.File, path: Path) -> int:
    """Check the three datasets exist with consistent shapes and types; return N."""
    for name in ("embeddings", "ids", "lengths"):
        if not isinstance(f.get(name), h5py.Dataset):
            raise IncompleteOutputError(f"{path}: dataset {name!r} missing")
    emb, ids, lengths = f["embeddings"], f["ids"], f["lengths"]
    if emb.ndim not in (2, 3) or str(emb.dtype) not in OUTPUT_DTYPES:
        raise IncompleteOutputError(f"{path}: embeddings is {emb.dtype} {emb.shape}")
    n = emb.shape[0]
    if ids.shape != (n,) or h5py.check_string_dtype(ids.dtype) is None:
        raise IncompleteOutputError(f"{path}: ids is {ids.dtype} {ids.shape}, expected ({n},)")
    if lengths.shape != (n,) or lengths.dtype != np.int32:
        raise IncompleteOutputError(f"{path}: lengths is {lengths.dtype} {lengths.shape}")
    return int(n)


def verify_output(path: Path) -> None:
    """Raise IncompleteOutputError (a ValueError) unless ``path`` is a complete output.

    Complete means: the file opens; embeddings/ids/lengths exist with N rows each and the
    documented types (``embeddings`` 3-D exactly when ``layers`` lists several); the
    per-residue datasets, if any, are consistent (``vnpd.output.residues``); every root
    attribute is present, ``schema_version`` >= 1 (finalized) and ``num_sequences`` == N; no
    embedding is NaN, no embedding row is all zeros, no length is negative and no id is
    empty (how unwritten rows read), and every id reads. Reads in blocks, so memory stays bounded.
    """
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise IncompleteOutputError(f"{path}: cannot open: {exc}") from exc
    with f:
        n = _check_datasets(f, path)
        missing = [key for key in REQUIRED_ATTRS if key not in f.attrs]
        if missing:
            raise IncompleteOutputError(f"{path}: attributes missing: {missing}")
        if int(f.attrs["schema_version"]) < 1:  # prefilled at create, not yet finalized
            raise IncompleteOutputError(f"{path}: not finalized (schema_version "
                                        f"{f.attrs['schema_version']})")
        if int(f.attrs["num_sequences"]) != n:
            raise IncompleteOutputError(
                f"{path}: num_sequences={f.attrs['num_sequences']} but {n} rows")
        emb = f["embeddings"]
        layers = np.atleast_1d(f.attrs["layers"])
        if (emb.ndim == 3) != (len(layers) > 1) or (emb.ndim == 3 and emb.shape[1] != len(layers)):
            raise IncompleteOutputError(f"{path}: embeddings {emb.shape} for layers {list(layers)}")
        problem = check_residues(f, path, n, None)
        if problem:
            raise IncompleteOutputError(problem)
        step = rows_per_block(int(np.prod(emb.shape[1:])) * emb.dtype.itemsize)
        # One buffer read into again: a fresh array a block costs its pages' first touch,
        # which made the read 4-6 times slower (a 768 MB output: ~0.4 s more to publish).
        buffer = np.empty((min(step, n), *emb.shape[1:]), dtype=emb.dtype)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            emb.read_direct(buffer, np.s_[lo:hi], np.s_[:hi - lo])
            block = buffer[:hi - lo]
            if np.isnan(block).any():
                raise IncompleteOutputError(f"{path}: NaN rows from row {lo}")
            unwritten = ~block.reshape(block.shape[0], -1).any(axis=1)
            if unwritten.any():  # an embedding is never exactly zero everywhere
                raise IncompleteOutputError(
                    f"{path}: unwritten (all-zero) row {lo + int(np.argmax(unwritten))}")
            if (f["lengths"][lo:lo + step] < 0).any():
                raise IncompleteOutputError(f"{path}: unwritten lengths from row {lo}")
            try:
                ids = f["ids"].asstr()[lo:lo + step]
            except (OSError, UnicodeDecodeError) as exc:  # a dangling heap reference
                raise IncompleteOutputError(f"{path}: ids from row {lo} do not read: "
                                            f"{exc}") from exc
            if any(not i for i in ids):
                raise IncompleteOutputError(f"{path}: unwritten (empty) ids from row {lo}")


def read_output(path: Path) -> tuple[np.ndarray, list[str], np.ndarray, dict[str, Any]]:
    """Read a whole output file: (embeddings, ids, lengths, attrs) with plain Python attrs.

    For tests and tools; loads everything into memory.
    """
    with h5py.File(path, "r") as f:
        embeddings = f["embeddings"][:]
        ids = [str(s) for s in f["ids"].asstr()[:]]
        lengths = f["lengths"][:]
        attrs: dict[str, Any] = {}
        for key, value in f.attrs.items():
            if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
                attrs[key] = [int(v) for v in value]
            elif isinstance(value, np.ndarray):
                attrs[key] = [str(v) for v in value]
            else:
                attrs[key] = value.item() if isinstance(value, np.generic) else value
    return embeddings, ids, lengths, attrs
