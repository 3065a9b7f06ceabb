"""A validated, on-disk index of one FASTA file: record offsets and residue lengths.

Indexing is one streaming pass (every validation rule of :mod:`vnpd.fasta`, duplicate
ids included) that keeps 16 bytes per record; the arrays can be saved beside the job's
state and memory-mapped back, so a file of millions of records costs the parent
process almost no RAM. Sequences are re-read from the file in windows when needed.

Example::

    index = index_fasta(Path("in.fasta"))
    for start, records in iter_windows(Path("in.fasta"), index, 10_000):
        ...
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vnpd.fasta import DuplicateIdChecker, FastaRecord, iter_fasta, iter_fasta_from
from vnpd.publish import sha256_file

_CHUNK = 65536


@dataclass(frozen=True)
class FileIndex:
    """Offsets (byte of each header's '>') and residue lengths, in file order."""

    num_records: int
    offsets: np.ndarray  # (N,) int64
    lengths: np.ndarray  # (N,) int64, residues before truncation
    sha256: str

    def save(self, directory: Path) -> None:
        """Write ``offsets.npy``, ``lengths.npy`` and ``index.json`` into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "offsets.npy", self.offsets)
        np.save(directory / "lengths.npy", self.lengths)
        (directory / "index.json").write_text(json.dumps(
            {"num_records": self.num_records, "sha256": self.sha256}))

    @classmethod
    def load(cls, directory: Path) -> "FileIndex":
        """Memory-map an index written by :meth:`save`."""
        meta = json.loads((directory / "index.json").read_text())
        return cls(meta["num_records"], np.load(directory / "offsets.npy", mmap_mode="r"),
                   np.load(directory / "lengths.npy", mmap_mode="r"), meta["sha256"])


def index_fasta(path: Path) -> FileIndex:
    """Validate ``path`` completely and index it. Raises :class:`vnpd.fasta.FastaError`."""
    checker = DuplicateIdChecker()
    offsets: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    off_buf = np.empty(_CHUNK, dtype=np.int64)
    len_buf = np.empty(_CHUNK, dtype=np.int64)
    fill = 0
    for record in iter_fasta(path):
        checker.add(record)
        off_buf[fill] = record.offset
        len_buf[fill] = len(record.sequence)
        fill += 1
        if fill == _CHUNK:
            offsets.append(off_buf.copy())
            lengths.append(len_buf.copy())
            fill = 0
    offsets.append(off_buf[:fill].copy())
    lengths.append(len_buf[:fill].copy())
    checker.finish(path)
    off, lens = np.concatenate(offsets), np.concatenate(lengths)
    return FileIndex(int(off.shape[0]), off, lens, sha256_file(path))


def iter_windows(path: Path, index: FileIndex, window: int, start: int = 0
                 ) -> Iterator[tuple[int, list[FastaRecord]]]:
    """Records ``start..N`` in consecutive lists of at most ``window``: (first position, records)."""
    if start >= index.num_records:
        return
    records: list[FastaRecord] = []
    first = start
    for record in iter_fasta_from(path, int(index.offsets[start]), start):
        records.append(record)
        if len(records) == window:
            yield first, records
            first += len(records)
            records = []
    if records:
        yield first, records
    if first + len(records) != index.num_records:
        raise RuntimeError(f"{path} changed after indexing: expected {index.num_records} "
                           f"records, read {first + len(records)}")
