"""The protein input kind: a protein FASTA file, indexed in place.

Example::

    source = ProteinSource.build(Path("claimed/in.fasta"), Path("jobs/7/index"),
                                 SourceSettings())
    next(source.rows(5))   # FastaRecord(index=5, id=..., sequence=...)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


from vnpd.inputs.fasta import FastaRecord
from vnpd.inputs.index import FileIndex, index_fasta, iter_indexed
from vnpd.inputs.source import IndexedSource, SourceSettings


class ProteinSource(IndexedSource):
    """A protein FASTA file: row i is record i, read in place through its index."""

    kind = "protein"

    def __init__(self, path: Path, index: FileIndex) -> None:
        self.path = path
        self.index = index

    @classmethod
    def build(cls, path: Path, directory: Path, settings: SourceSettings) -> "ProteinSource":
        return cls(path, index_fasta(path))

    @classmethod
    def open(cls, path: Path, directory: Path, settings: SourceSettings) -> "ProteinSource":
        return cls(path, FileIndex.load(directory))

    def save(self, directory: Path) -> list[Path]:
        self.index.save(directory)
        return sorted(directory.iterdir())

    @property
    def sha256(self) -> str:
        return self.index.sha256

    def rows(self, start: int = 0) -> Iterator[FastaRecord]:
        return iter_indexed(self.path, self.index, start)
