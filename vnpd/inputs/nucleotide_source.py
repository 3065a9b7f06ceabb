"""The ``nucleotide`` input kind: a DNA FASTA file whose rows are the proteins vnpd makes from it.

:meth:`NucleotideSource.build` streams the DNA file once, one record in memory at a time
(a 100 Mbp contig is held once, as its text, while it is translated). Each record is
checked (:func:`vnpd.inputs.nucleotide.check_nucleotide`) and turned into proteins, six
frames of VirNucPro's chunks or pyrodigal-gv's genes, as ``[nucleotide] proteins`` says:
six_frame on ``six_frame_workers`` processes (:mod:`vnpd.inputs.six_frame_pool`), genes on
``gene_workers`` threads (:mod:`vnpd.inputs.gene_calls`); with one worker, in this thread.
The proteins go to a derived protein FASTA, ``proteins.fasta``, in the job's directory, and
their per-row facts to fixed-width arrays beside it. ``proteins.fasta`` is indexed as it is
written (:class:`vnpd.inputs.index.IndexingWriter`), with the index ``index_fasta`` would
give, so rows are served exactly as :class:`ProteinSource` serves them.

Files in ``directory``: ``proteins.fasta`` and its index (``offsets.npy``, ``lengths.npy``,
``index.json``), ``records.txt`` (every DNA record id, one a line, in input order),
``source_index.npy`` (row -> line of ``records.txt``), ``strand.npy``, ``nt_start.npy``,
``nt_end.npy`` and ``nucleotide.json`` (the input's SHA-256 and the counts).

Example::

    settings = SourceSettings(kind="nucleotide", proteins="six_frame", chunk_length=300)
    source = NucleotideSource.build(Path("claimed/contigs.fna"), Path("jobs/7/index"), settings)
    source.num_rows, source.attributes()["records_without_proteins"]   # 5310, 2
    source.row_fields()["source_ids"][:2]                              # ["contig1", "contig1"]
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vnpd.inputs.fasta import DuplicateIdChecker, FastaError, FastaRecord, iter_fasta
from vnpd.inputs.index import (FileIndex, IndexingWriter, iter_indexed, iter_indexed_ids,
                               read_window_text, sha256_file)
from vnpd.inputs.gene_calls import call_genes, resolve_workers
from vnpd.inputs import six_frame_pool
from vnpd.inputs.nucleotide import (NucleotideError, Protein, TranslatedBlock, check_nucleotide,
                                    gene_proteins, make_gene_finder, piece_batches,
                                    six_frame_proteins, translate_pieces)
from vnpd.inputs.source import IndexedSource, SourceSettings, first_proteins
from vnpd.inputs.window_text import WindowText

if TYPE_CHECKING:  # imported where a gene finder is made: it costs the parent ~230 MB
    import pyrodigal_gv

MAX_RECORD_BASES = 1_000_000_000
"""Longest nucleotide record accepted (1 Gbp): whole chromosomes pass, a runaway file does not."""

PROTEIN_MODES = ("six_frame", "genes")
"""``[nucleotide] proteins``: VirNucPro's six-frame chunks, or pyrodigal-gv's gene calls."""

_ARRAYS = {"source_index": "q", "strand": "b", "nt_start": "q", "nt_end": "q"}
_DTYPES = {"q": np.int64, "b": np.int8}
_HINT = "; is this a protein file? this daemon reads nucleotide FASTA ([input] kind)"


class NucleotideSource(IndexedSource):
    """A nucleotide FASTA file, served as the protein rows derived from it; see the module doc."""

    kind = "nucleotide"

    def __init__(self, path: Path, directory: Path, index: FileIndex, arrays: dict[str, np.ndarray],
                 meta: dict[str, Any]) -> None:
        self.path = path
        self.directory = directory
        self.index = index
        self.arrays = arrays
        self.meta = meta

    @property
    def proteins_path(self) -> Path:
        return self.directory / "proteins.fasta"

    @classmethod
    def build(cls, path: Path, directory: Path, settings: SourceSettings) -> "NucleotideSource":
        """Check and translate ``path``, writing the proteins and their facts into ``directory``.

        Raises ``FastaError`` naming the DNA record and its header line (bad DNA, protein
        text, a duplicated id), or when the file changed while it was read; OSError when
        it cannot be read or ``directory`` cannot be written.
        """
        make_proteins = _protein_maker(settings)
        directory.mkdir(parents=True, exist_ok=True)
        before = os.stat(path)
        checker = DuplicateIdChecker()
        columns = {name: array(code) for name, code in _ARRAYS.items()}
        pool_workers = _six_frame_processes(settings)
        with IndexingWriter(directory / "proteins.fasta") as out, \
                open(directory / "records.txt", "w", encoding="utf-8") as ids:

            def checked() -> Iterator[FastaRecord]:
                for record in iter_fasta(path, max_residues=MAX_RECORD_BASES, kind="nucleotide"):
                    checker.add(record)
                    _check_record(record)
                    ids.write(record.id + "\n")
                    yield record

            if pool_workers > 1:
                # closing shuts the processes down when an error leaves the loop
                batches = piece_batches(checked(), settings.chunk_length,
                                        six_frame_pool.BATCH_BASES)
                with closing(six_frame_pool.translate_in_processes(
                        batches, translate_pieces, pool_workers, before.st_size)) as blocks:
                    for block in blocks:
                        out.add_block(block.text, block.line_bytes, block.lengths)
                        _append_block(columns, block)
            else:
                with closing(make_proteins(checked())) as made:  # closing stops the gene threads
                    for record, proteins in made:
                        for protein in proteins:
                            out.add(protein.id, protein.sequence)
                            _append(columns, record.index, protein)
        checker.finish(path, kind="nucleotide")
        sha256 = sha256_file(path)
        after = os.stat(path)
        if (after.st_size, after.st_mtime_ns, after.st_ino) != \
                (before.st_size, before.st_mtime_ns, before.st_ino):
            raise FastaError("the file changed while it was being read; write files elsewhere "
                             "and rename them into the inbox, see docs/INBOX.md")
        records = checker.count
        arrays = {name: np.frombuffer(col, dtype=_DTYPES[col.typecode]).copy()
                  for name, col in columns.items()}
        # Rows come in record order, so the records with proteins are the runs of source_index.
        rows_of = arrays["source_index"]
        with_proteins = int(np.count_nonzero(np.diff(rows_of))) + 1 if len(rows_of) else 0
        meta = {"sha256": sha256, "proteins": settings.proteins,
                "chunk_length": settings.chunk_length if settings.proteins == "six_frame" else 0,
                "records": records, "records_with_proteins": with_proteins,
                "records_without_proteins": records - with_proteins}
        return cls(path, directory, out.close(), arrays, meta)

    @classmethod
    def prepare(cls, settings: SourceSettings) -> None:
        """genes: import pyrodigal-gv and load its models (0.5-1 s, ~120 MB)."""
        if settings.proteins == "genes":
            make_gene_finder()

    @classmethod
    def peek(cls, path: Path, settings: SourceSettings, max_tokens: int, truncation: int
             ) -> list[tuple[str, str]]:
        """The first contigs' proteins, made as :meth:`build` makes them, one record at a
        time on this thread (genes with one finder)."""
        def proteins() -> Iterator[tuple[str, str]]:
            finder = make_gene_finder() if settings.proteins == "genes" else None
            for record in iter_fasta(path, max_residues=MAX_RECORD_BASES, kind="nucleotide"):
                _check_record(record)
                made = (record_genes(record, finder) if finder is not None else
                        six_frame_proteins(record.id, record.sequence, settings.chunk_length))
                yield from ((p.id, p.sequence) for p in made)
        return first_proteins(proteins(), max_tokens, truncation)

    @classmethod
    def open(cls, path: Path, directory: Path, settings: SourceSettings) -> "NucleotideSource":
        meta = json.loads((directory / "nucleotide.json").read_text())
        arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
        return cls(path, directory, FileIndex.load(directory), arrays, meta)

    def save(self, directory: Path) -> list[Path]:
        """Write the index, the row arrays and ``nucleotide.json`` (``proteins.fasta`` and
        ``records.txt`` were written by :meth:`build`); returns every file of the directory."""
        self.index.save(directory)
        for name, values in self.arrays.items():
            np.save(directory / f"{name}.npy", values)
        (directory / "nucleotide.json").write_text(json.dumps(self.meta))
        return sorted(p for p in directory.iterdir() if p.is_file())

    @property
    def sha256(self) -> str:
        """The nucleotide input's SHA-256 (not that of the derived ``proteins.fasta``)."""
        return str(self.meta["sha256"])

    def rows(self, start: int = 0) -> Iterator[FastaRecord]:
        return iter_indexed(self.proteins_path, self.index, start, kind="translated")

    def ids(self) -> Iterator[str]:
        return iter_indexed_ids(self.proteins_path, self.index, kind="translated")

    def window_text(self, start: int, stop: int) -> WindowText | None:
        return read_window_text(self.proteins_path, self.index, start, stop)

    def row_fields(self) -> dict[str, np.ndarray]:
        """``source_ids`` (the DNA record of each row, strings), ``strand`` (+1/-1, int8),
        ``nt_start``/``nt_end`` (int64, 0-based half-open on the record's forward strand)."""
        records = (self.directory / "records.txt").read_text(encoding="utf-8").splitlines()
        names = np.array(records, dtype=object)
        # Fancy indexing an object array shares the strings: 8 bytes a row, not a copy each.
        source_ids = names[np.asarray(self.arrays["source_index"])] if len(names) else \
            np.empty(0, dtype=object)
        return {"source_ids": source_ids, "strand": np.asarray(self.arrays["strand"]),
                "nt_start": np.asarray(self.arrays["nt_start"]),
                "nt_end": np.asarray(self.arrays["nt_end"])}

    def attributes(self) -> dict[str, Any]:
        m = self.meta
        return {"input_kind": self.kind, "proteins": m["proteins"],
                "chunk_length": int(m["chunk_length"]), "records": int(m["records"]),
                "records_with_proteins": int(m["records_with_proteins"]),
                "records_without_proteins": int(m["records_without_proteins"])}


_Made = Iterator[tuple[FastaRecord, Iterable[Protein]]]


def _protein_maker(settings: SourceSettings) -> Callable[[Iterator[FastaRecord]], _Made]:
    """The translation ``settings`` ask for, as checked records -> (record, its proteins)
    in the records' order. six_frame runs in the calling thread, one record at a time
    (its proteins stream, so a long contig's are never all in memory); genes runs on
    ``gene_workers`` threads (:func:`vnpd.inputs.gene_calls.call_genes`). six_frame on
    several processes is :func:`vnpd.inputs.six_frame_pool.translate_in_processes`, which
    ``build`` uses instead when :func:`_six_frame_processes` is more than one."""
    if settings.proteins == "six_frame":
        if settings.chunk_length < 3:
            raise ValueError(f"chunk_length must be at least 3, not {settings.chunk_length}")
        size = settings.chunk_length
        return lambda records: ((r, six_frame_proteins(r.id, r.sequence, size)) for r in records)
    if settings.proteins == "genes":
        # One finder per build, shared by the threads: find_genes is re-entrant.
        genes_of = partial(record_genes, finder=make_gene_finder())
        workers = resolve_workers(settings.gene_workers)
        return lambda records: call_genes(records, genes_of, workers)
    raise ValueError(f"proteins must be one of {PROTEIN_MODES}, not {settings.proteins!r}")


def _six_frame_processes(settings: SourceSettings) -> int:
    """Processes six_frame translates on: ``six_frame_workers`` resolved (0 = one per core);
    1 (no pool) for genes, and when one worker is configured or one core is usable."""
    if settings.proteins != "six_frame":
        return 1
    return resolve_workers(settings.six_frame_workers, key="six_frame_workers")


def record_genes(record: FastaRecord, finder: pyrodigal_gv.ViralGeneFinder) -> list[Protein]:
    """:func:`vnpd.inputs.nucleotide.gene_proteins` of one record, as a list; a failure of
    pyrodigal-gv itself as a ``FastaError`` that names the record and its header line.

    Example: ``record_genes(record, make_gene_finder())[0].id`` is ``"phage1_1"``.
    """
    try:
        return list(gene_proteins(record.id, record.sequence, finder))
    except Exception as exc:  # MemoryError too: a giant contig fails its file, not the daemon
        raise FastaError(f"pyrodigal-gv could not call genes: {type(exc).__name__}: {exc}",
                         record_id=record.id, record_index=record.index,
                         line=record.line) from exc


def _check_record(record: FastaRecord) -> None:
    """``check_nucleotide`` as a ``FastaError`` that names the record and its header line."""
    try:
        check_nucleotide(record.sequence)
    except NucleotideError as exc:
        reason = exc.reason + (_HINT if "protein" in exc.reason else "")
        raise FastaError(reason, record_id=record.id, record_index=record.index,
                         line=record.line) from None


def _append(columns: dict[str, array], record_index: int, protein: Protein) -> None:
    columns["source_index"].append(record_index)
    columns["strand"].append(protein.strand)
    columns["nt_start"].append(protein.nt_start)
    columns["nt_end"].append(protein.nt_end)


def _append_block(columns: dict[str, array], block: TranslatedBlock) -> None:
    for name in _ARRAYS:
        columns[name].frombytes(getattr(block, name).tobytes())
