"""vnpd/inputs/window_text.py: a window of records read as one array of letters.

Against the records the parser reads (``iter_indexed``): the same ids and residues for
files with every quirk the reader accepts; None (the caller reads records) for what it
must not take; and the batches the daemon cuts from it (``window_batch``) equal those cut
from the records, in truncate and in window mode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import random_sequences
from tests.inputs.test_nucleotide_source import contigs, write_dna
from vnpd.compute.windows import PieceIndex
from vnpd.daemon.jobs import ActiveJob
from vnpd.daemon.piece_batches import pack_pieces, read_window, window_batch
from vnpd.inputs.fasta import FastaError
from vnpd.inputs.index import FileIndex, index_fasta, iter_indexed, read_window_text
from vnpd.inputs.nucleotide_source import NucleotideSource
from vnpd.inputs.protein import ProteinSource
from vnpd.inputs.source import SourceSettings
from vnpd.inputs.window_text import WindowText


def quirky_fasta(path: Path, count: int = 3000, seed: int = 3) -> list[str]:
    """Lengths 1..2000, lower case, CRLF, wrapped and blank lines, descriptions with tabs,
    a final '*': every record as the reader accepts it. Returns the upper-case residues."""
    rng = np.random.default_rng(seed)
    lengths = [int(n) for n in rng.integers(1, 2001, count)]
    lengths[:3] = [1, 1022, 1023]
    seqs = random_sequences(lengths, seed=seed)
    lines = []
    for i, s in enumerate(seqs):
        end = "\r\n" if i % 6 == 0 else "\n"
        header = [f">r{i}", f">r{i} a description", f">r{i}\tx=1 y", f">sp|P{i}|X_{i} OS=a b"][i % 4]
        body = s.lower() if i % 5 == 0 else s
        width = [60, 80, len(body) or 1, 7][i % 4]
        wrapped = end.join(body[j:j + width] for j in range(0, len(body), width))
        star = "*" if i % 9 == 0 else ""
        blank = end if i % 11 == 0 else ""
        lines.append(header + end + wrapped + star + end + blank)
    path.write_text("".join(lines), newline="")
    return seqs


def assert_same(text: WindowText | None, path: Path, index: FileIndex, start: int,
                stop: int) -> None:
    assert text is not None
    records = list(iter_indexed(path, index, start))[:stop - start]
    assert text.start == start
    assert text.ids == [r.id for r in records]
    assert [text.sequence(i) for i in range(stop - start)] == [r.sequence for r in records]
    assert np.array_equal(np.diff(text.offsets), index.lengths[start:stop])


def test_a_window_reads_as_the_parser_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "in.fasta"
    seqs = quirky_fasta(path)
    index = index_fasta(path)
    for start, stop in ((0, 3000), (0, 1), (1, 2), (2999, 3000), (123, 2345)):
        assert_same(read_window_text(path, index, start, stop), path, index, start, stop)
    text = read_window_text(path, index, 0, 3000)
    assert text is not None and [text.sequence(i) for i in range(3000)] == seqs


@pytest.mark.parametrize("text, plain", [
    (">a\nMKV\n; a comment\nLLA\n", False),  # comment lines: the parser's to skip
    (">a\nMKV\n;c\n", False),
    (">a\n\nMKV\n", True),                  # blank lines, CRLF, form feeds, spaces
    (">a\r\nMK\r\nV\r\n", True),
    (">a\nMKV\n\x0c\n", True),
    (">a b\n MK V \n", True),
    (">a\nMKV", True),                      # no newline at the end
])
def test_a_window_reads_as_the_parser_or_goes_to_it(tmp_path: Path, text: str,
                                                    plain: bool) -> None:
    path = tmp_path / "in.fasta"
    path.write_text(">first\nMKVL\n" + text, newline="")
    index = index_fasta(path)
    window = read_window_text(path, index, 0, index.num_records)
    if plain:
        assert_same(window, path, index, 0, index.num_records)
    else:
        assert window is None
    assert_same(read_window_text(path, index, 0, 1), path, index, 0, 1)  # the record before


def test_an_index_of_an_earlier_version_and_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "in.fasta"
    quirky_fasta(path, 50)
    full = index_fasta(path)
    old = FileIndex(full.num_records, full.offsets, full.lengths, full.sha256)  # no size
    assert read_window_text(path, old, 0, 50) is None
    with open(path, "a") as fh:  # a writer went on after the claim
        fh.write(">late\nMKV\n")
    with pytest.raises(FastaError, match="changed after it was indexed"):
        read_window_text(path, full, 0, 50)


def job_of(source: ProteinSource | NucleotideSource, pieces: PieceIndex | None) -> ActiveJob:
    return ActiveJob(1, "in", source, None, 0, 0, pieces=pieces)  # type: ignore[arg-type]


@pytest.mark.parametrize("truncation, stride", [(1022, None), (50, None), (64, 20)])
def test_batches_cut_from_the_text_equal_batches_cut_from_records(
        tmp_path: Path, truncation: int, stride: int | None) -> None:
    path = tmp_path / "in.fasta"
    quirky_fasta(path, 1500)
    source = ProteinSource.build(path, tmp_path / "idx", SourceSettings())
    pieces = PieceIndex.plan(source.lengths, truncation, stride) if stride else None
    job = job_of(source, pieces)
    start, count = 200, 900
    text = read_window(job, start, count)
    assert isinstance(text, WindowText)
    records = list(iter_indexed(path, source.index, start))[:count]
    index = PieceIndex.plan(source.lengths, truncation, stride)
    chosen = np.arange(int(index.offsets[start]) if stride else start,
                       int(index.offsets[start + count]) if stride else start + count)
    plan = pack_pieces(index, chosen, 8192)
    assert len(plan) > 3
    for batch_pieces in plan:
        fast = window_batch(job, batch_pieces, text, start, truncation)
        slow = window_batch(job, batch_pieces, records, start, truncation)
        assert np.array_equal(fast.positions, slow.positions)
        assert np.array_equal(fast.tokens, slow.tokens)
        assert np.array_equal(fast.cu_seqlens, slow.cu_seqlens)
        assert fast.ids == slow.ids and fast.max_len == slow.max_len
        assert fast.residues == slow.residues


def test_translated_proteins_read_fast_and_equal_their_rows(tmp_path: Path) -> None:
    src = write_dna(tmp_path / "in.fna", contigs())
    source = NucleotideSource.build(src, tmp_path / "idx",
                                    SourceSettings(kind="nucleotide", proteins="six_frame"))
    text = source.window_text(0, source.num_rows)
    assert text is not None
    rows = list(source.rows())
    assert text.ids == [r.id for r in rows]
    assert [text.sequence(i) for i in range(len(rows))] == [r.sequence for r in rows]
