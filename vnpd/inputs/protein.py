"""The protein input kind: a protein FASTA file, indexed in place.

Example::

    source = ProteinSource.build(Path("claimed/in.fasta"), Path("jobs/7/index"),
                                 SourceSettings())
    next(source.rows(5))   # FastaRecord(index=5, id=..., sequence=...)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vnpd.inputs.duplicates import key_array, row_key
from vnpd.inputs.fasta import FastaRecord, iter_fasta
from vnpd.inputs.index import (FileIndex, index_fasta, iter_indexed, iter_indexed_ids,
                               read_window_text)
from vnpd.inputs.source import IndexedSource, SourceSettings, first_proteins
from vnpd.inputs.window_text import WindowText


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
    def build_keyed(cls, path: Path, directory: Path, settings: SourceSettings,
                    truncation: int | None) -> tuple["ProteinSource", np.ndarray]:
        """Index and key the rows in one read of the file (keying from :meth:`rows`
        read it all a second time: half of a protein file's indexing)."""
        digests: list[bytes] = []
        index = index_fasta(path, visit=lambda record: digests.append(
            row_key(record.sequence, truncation)))
        return cls(path, index), key_array(digests)  # read-only, as a loaded plan's keys are

    @classmethod
    def peek(cls, path: Path, settings: SourceSettings, max_tokens: int, truncation: int
             ) -> list[tuple[str, str]]:
        return first_proteins(((r.id, r.sequence) for r in iter_fasta(path)), max_tokens,
                              truncation)

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

    def ids(self) -> Iterator[str]:
        return iter_indexed_ids(self.path, self.index)

    def window_text(self, start: int, stop: int) -> WindowText | None:
        return read_window_text(self.path, self.index, start, stop)
