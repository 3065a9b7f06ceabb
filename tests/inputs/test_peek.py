"""``SequenceSource.peek`` (vnpd/inputs/source.py, protein.py, nucleotide_source.py): a
file's first proteins read without indexing it, for the daemon's head start. Real files,
real pyrodigal-gv; each kind is compared with its own reader run directly on the file.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import random_sequences, write_fasta
from tests.inputs.test_nucleotide import phage_like
from tests.inputs.test_nucleotide_source import contigs, expected, write_dna
from vnpd.inputs import nucleotide_source
from vnpd.inputs.fasta import FastaRecord, iter_fasta
from vnpd.inputs.nucleotide import Protein
from vnpd.inputs.nucleotide_source import NucleotideSource, record_genes
from vnpd.inputs.protein import ProteinSource
from vnpd.inputs.source import SourceSettings, first_proteins

TRUNCATION = 100
EVERYTHING = 10**9  # a token budget no test file reaches


def within_budget(proteins: list[tuple[str, str]], max_tokens: int) -> list[tuple[str, str]]:
    """The shortest head of ``proteins`` whose tokens (a row costs its residues up to the
    truncation, plus 2) reach ``max_tokens``; all of them if they never do."""
    tokens = 0
    for count, (_, residues) in enumerate(proteins, start=1):
        tokens += min(len(residues), TRUNCATION) + 2
        if tokens >= max_tokens:
            return proteins[:count]
    return proteins


def protein_file(tmp_path: Path) -> Path:
    """Wrapped lines, lengths below, at and above the truncation, a lower-case record and a
    terminal '*' (both read as iter_fasta reads them)."""
    sequences = random_sequences([30, 250, TRUNCATION, 7, 64, 180, 12, 90, 41, 300], seed=3)
    sequences[3] = sequences[3].lower()
    sequences[5] += "*"
    return write_fasta(tmp_path / "in.fasta", sequences, prefix="p", width=50)


def test_protein_peek_returns_the_records_as_iter_fasta_reads_them(tmp_path: Path) -> None:
    path = protein_file(tmp_path)
    want = [(r.id, r.sequence) for r in iter_fasta(path)]
    assert len(want) == 10
    assert ProteinSource.peek(path, SourceSettings(), EVERYTHING, TRUNCATION) == want


def test_protein_peek_stops_once_its_token_budget_is_reached(tmp_path: Path) -> None:
    path = protein_file(tmp_path)
    everything = [(r.id, r.sequence) for r in iter_fasta(path)]
    first_three = sum(min(len(s), TRUNCATION) + 2 for _, s in everything[:3])
    # The second row is past the truncation: it costs TRUNCATION + 2, not its length.
    assert first_three == 32 + 102 + 102
    for budget, count in [(1, 1), (32, 1), (33, 2), (first_three, 3), (first_three + 1, 4)]:
        peeked = ProteinSource.peek(path, SourceSettings(), budget, TRUNCATION)
        assert peeked == everything[:count] == within_budget(everything, budget), budget


def test_protein_peek_returns_the_records_before_a_bad_one(tmp_path: Path) -> None:
    path = tmp_path / "bad.fasta"
    path.write_text(">a first\nMKVL\nAA\n>b\nmkl*\n>bad\nMK1V\n>c\nMKV\n")
    assert ProteinSource.peek(path, SourceSettings(), EVERYTHING, TRUNCATION) == \
        [("a", "MKVLAA"), ("b", "MKL")]


@pytest.mark.parametrize("text", ["", "id,sequence\nP1,MKV\n", ">bad\nMK1V\n>c\nMKV\n",
                                  ">empty\n>c\nMKV\n", "\x00\x01binary"])
def test_protein_peek_of_a_file_bad_from_its_start_is_empty(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.fasta"
    path.write_text(text)
    assert ProteinSource.peek(path, SourceSettings(), EVERYTHING, TRUNCATION) == []


def test_peek_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    missing = tmp_path / "gone.fasta"
    assert ProteinSource.peek(missing, SourceSettings(), EVERYTHING, TRUNCATION) == []
    assert NucleotideSource.peek(missing, SourceSettings("nucleotide"), EVERYTHING,
                                 TRUNCATION) == []


@pytest.mark.parametrize("chunk_length", [300, 157])
def test_six_frame_peek_equals_the_translation_of_the_first_contigs(
        tmp_path: Path, chunk_length: int) -> None:
    records = contigs()
    path = write_dna(tmp_path / "in.fna", records)
    settings = SourceSettings("nucleotide", "six_frame", chunk_length)
    everything = [(p.id, p.sequence) for p in expected(records, settings)]
    assert len(everything) > 20
    assert NucleotideSource.peek(path, settings, EVERYTHING, TRUNCATION) == everything
    # A budget that ends inside the proteins of a contig past the first.
    budget = sum(min(len(s), TRUNCATION) + 2 for _, s in everything[:len(everything) // 2])
    peeked = NucleotideSource.peek(path, settings, budget - 1, TRUNCATION)
    assert peeked == within_budget(everything, budget - 1) == everything[:len(everything) // 2]
    assert len({rid.rsplit("_", 2)[0] for rid, _ in peeked}) > 1  # several contigs read


def test_gene_peek_equals_pyrodigal_gvs_calls_on_the_first_contigs(tmp_path: Path) -> None:
    rng = random.Random(23)
    records = {f"phage{i}": phage_like(rng, 8)[0] for i in range(4)}
    path = write_dna(tmp_path / "in.fna", records)
    settings = SourceSettings("nucleotide", "genes")
    # gene_proteins(record_id, sequence, make_gene_finder()) on each contig, upper case.
    everything = [(p.id, p.sequence) for p in expected(records, settings)]
    assert len(everything) >= 4 * 6  # most planted genes are called
    assert NucleotideSource.peek(path, settings, EVERYTHING, TRUNCATION) == everything
    first = [(rid, s) for rid, s in everything if rid.startswith("phage0_")]
    budget = sum(min(len(s), TRUNCATION) + 2 for _, s in first) + 1  # one row into phage1
    peeked = NucleotideSource.peek(path, settings, budget, TRUNCATION)
    assert peeked == within_budget(everything, budget) == everything[:len(first) + 1]
    assert peeked[-1][0].startswith("phage1_")


def test_nucleotide_peek_returns_the_proteins_of_the_contigs_before_a_bad_one(
        tmp_path: Path) -> None:
    rng = random.Random(29)
    good = {"first": phage_like(rng, 3)[0], "second": phage_like(rng, 3)[0]}
    path = write_dna(tmp_path / "in.fna", good | {"broken": "ACGTACJT" * 20,
                                                  "after": phage_like(rng, 3)[0]})
    settings = SourceSettings("nucleotide", "six_frame", 300)
    want = [(p.id, p.sequence) for p in expected(good, settings)]
    assert want
    assert NucleotideSource.peek(path, settings, EVERYTHING, TRUNCATION) == want


def test_first_proteins_never_reads_an_item_past_the_budget() -> None:
    proteins = [(f"p{i}", "M" * length) for i, length in enumerate([30, 250, 100, 7, 64])]
    costs = [32, 102, 102, 9, 66]  # residues up to the truncation, plus 2
    for budget, count in [(1, 1), (32, 1), (33, 2), (134, 2), (135, 3), (236, 3),
                          (245, 4), (EVERYTHING, 5)]:
        pulled: list[str] = []

        def stream() -> Iterator[tuple[str, str]]:
            for record_id, residues in proteins:
                pulled.append(record_id)  # the item is made (read, translated) here
                yield record_id, residues
        assert first_proteins(stream(), budget, TRUNCATION) == proteins[:count], budget
        assert sum(costs[:count]) >= min(budget, sum(costs))
        # Once the budget is met the stream is not asked for another item.
        assert pulled == [rid for rid, _ in proteins[:count]], budget


def test_gene_peek_does_not_call_the_genes_of_a_contig_past_the_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(31)
    records = {"first": phage_like(rng, 6)[0], "huge": phage_like(rng, 300)[0]}
    path = write_dna(tmp_path / "in.fna", records)
    settings = SourceSettings("nucleotide", "genes")
    first = [(p.id, p.sequence) for p in expected({"first": records["first"]}, settings)]
    assert first
    called: list[str] = []

    def spy(record: FastaRecord, finder: Any) -> list[Protein]:
        called.append(record.id)
        return record_genes(record, finder)
    monkeypatch.setattr(nucleotide_source, "record_genes", spy)
    budget = sum(min(len(s), TRUNCATION) + 2 for _, s in first)  # the first contig's, exactly
    assert NucleotideSource.peek(path, settings, budget, TRUNCATION) == first
    assert called == ["first"]  # the huge contig is never gene-called
    # One token more: the peek needs the next contig's first protein, and calls its genes.
    peeked = NucleotideSource.peek(path, settings, budget + 1, TRUNCATION)
    assert peeked[:-1] == first and peeked[-1][0].startswith("huge_")
    assert called == ["first", "first", "huge"]
