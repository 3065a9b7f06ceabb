"""The one interface between a job and its input: :class:`SequenceSource`.

A job's output has one row per protein sequence. A source says how many rows there are,
their residue counts, and reads their (id, residues) again from any position, in
bounded memory: the scheduler packs from it and completion writes ids from it. It also
gives the per-row fields and the attributes that its input kind adds to the output.

Input kinds live beside this file, one module each, and are registered in
:data:`vnpd.inputs.kinds.SOURCE_KINDS`: ``protein`` (a protein FASTA, indexed in place)
in :mod:`vnpd.inputs.protein`, ``nucleotide`` (proteins derived from DNA) in
:mod:`vnpd.inputs.nucleotide_source`.

Example::

    settings = SourceSettings(kind="protein")
    source = ProteinSource.build(Path("claimed/in.fasta"), Path("jobs/7/index"), settings)
    source.num_rows, source.lengths[:3]          # 1200, array([312, 88, 1043])
    for record in source.rows(start=100):        # FastaRecord(index=100, id=..., sequence=...)
        ...
    source = ProteinSource.open(Path("claimed/in.fasta"), Path("jobs/7/index"), settings)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:  # annotations only: the interface imports no implementation
    from vnpd.inputs.fasta import FastaRecord
    from vnpd.inputs.index import FileIndex
    from vnpd.inputs.window_text import WindowText


@dataclass(frozen=True)
class SourceSettings:
    """How input files are read: ``[input]`` and ``[nucleotide]`` of the configuration."""

    kind: str = "protein"          # protein | nucleotide
    proteins: str = "six_frame"    # nucleotide: six_frame | genes
    chunk_length: int = 300        # nucleotide six_frame: bp per chunk
    gene_workers: int = 0          # nucleotide genes: threads calling genes; 0 = one per core
    six_frame_workers: int = 0     # nucleotide six_frame: processes translating; 0 = one per core


class SequenceSource(ABC):
    """A job's rows and where their residues come from; see the module doc.

    ``path`` is the input file the source reads.
    """

    kind: ClassVar[str]
    path: Path

    @classmethod
    @abstractmethod
    def build(cls, path: Path, directory: Path, settings: SourceSettings) -> "SequenceSource":
        """Validate and index the input ``path``, keeping what it needs in ``directory``.

        Raises :class:`vnpd.inputs.fasta.FastaError` (naming the record and line) for
        bad input, OSError when the file cannot be read.
        """

    @classmethod
    def build_keyed(cls, path: Path, directory: Path, settings: SourceSettings,
                    truncation: int | None) -> tuple["SequenceSource", np.ndarray | None]:
        """:meth:`build`, and the rows' repeat keys ((N, 32) uint8, as
        :func:`vnpd.inputs.duplicates.row_key` makes them for ``truncation``) if this kind
        can key its rows in the same pass; None: the caller keys them from :meth:`rows`."""
        return cls.build(path, directory, settings), None

    @classmethod
    def prepare(cls, settings: SourceSettings) -> None:
        """Load what :meth:`build` will need (in an index process, before its first file).
        Default: nothing beyond this module's imports."""

    @classmethod
    def peek(cls, path: Path, settings: SourceSettings, max_tokens: int, truncation: int
             ) -> list[tuple[str, str]]:
        """The file's first proteins, (record id, residues) in row order, up to about
        ``max_tokens`` tokens (a row costs its residues up to ``truncation``, plus 2), read
        without indexing the file: what :mod:`vnpd.daemon.head_start` computes while it is
        indexed. Advisory: stops quietly at the first problem (indexing reports it).
        Default: none."""
        return []

    @classmethod
    @abstractmethod
    def open(cls, path: Path, directory: Path, settings: SourceSettings) -> "SequenceSource":
        """Reopen what :meth:`build` saved in ``directory`` (after a restart)."""

    @abstractmethod
    def save(self, directory: Path) -> list[Path]:
        """Write what :meth:`open` needs into ``directory``; returns the files to fsync."""

    @property
    @abstractmethod
    def num_rows(self) -> int: ...

    @property
    @abstractmethod
    def lengths(self) -> np.ndarray:
        """(num_rows,) int64 residue counts, before truncation."""

    @property
    @abstractmethod
    def sha256(self) -> str:
        """The input file's SHA-256."""

    @abstractmethod
    def rows(self, start: int = 0) -> Iterator[FastaRecord]:
        """Rows ``start..num_rows-1`` in order; ``record.index`` is the row's position.

        Raises ``FastaError`` if the input no longer reads as it did when built.
        """

    def window_text(self, start: int, stop: int) -> "WindowText | None":
        """Rows ``start..stop-1`` as one array of residue letters
        (:mod:`vnpd.inputs.window_text`), or None: read them with :meth:`rows`. Raises
        ``FastaError`` as :meth:`rows` does. Default: None."""
        return None

    def ids(self) -> Iterator[str]:
        """Every row's id, in order (``record.id`` of :meth:`rows`); kinds read them
        faster. Raises ``FastaError`` as :meth:`rows` does."""
        return (record.id for record in self.rows())

    def row_fields(self) -> dict[str, np.ndarray]:
        """Per-row datasets this kind adds to the output (name -> (num_rows, ...) array)."""
        return {}

    def attributes(self) -> dict[str, Any]:
        """Root attributes this kind adds to the output."""
        return {"input_kind": self.kind}


class IndexedSource(SequenceSource):
    """A source whose rows are the records of one indexed FASTA file, ``self.index``."""

    index: FileIndex

    @property
    def num_rows(self) -> int:
        return self.index.num_records

    @property
    def lengths(self) -> np.ndarray:
        return self.index.lengths


def first_proteins(proteins: Iterator[tuple[str, str]], max_tokens: int, truncation: int
                   ) -> list[tuple[str, str]]:
    """:meth:`SequenceSource.peek` of an input kind's (id, residues) stream: the first up
    to ``max_tokens`` tokens' worth; an error ends the stream where it happens."""
    taken: list[tuple[str, str]] = []
    tokens = 0
    try:
        for record_id, residues in proteins:
            taken.append((record_id, residues))
            tokens += min(len(residues), truncation) + 2
            if tokens >= max_tokens:  # before the next item: it may be a whole contig's work
                break
    except Exception:  # bad input or an unreadable file: the indexing says which and where
        pass
    return taken
