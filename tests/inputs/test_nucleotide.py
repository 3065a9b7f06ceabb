"""vnpd/inputs/nucleotide.py against independent references.

six_frame is checked against ``ref_six_frame``, a literal, slow re-statement of VirNucPro's
prediction path (units.py ``split_fasta_chunk``, ``translate_dna``, prediction.py's
upper-casing and its filter on empty proteins) that shares no code with the module: the
genetic code comes from ``Bio.Seq.translate`` codon by codon. genes is checked against
pyrodigal-gv run directly, and its coordinates against Biopython translations.
"""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import pyrodigal_gv
import pytest
from Bio.Seq import Seq
from hypothesis import given, settings
from hypothesis import strategies as st

from vnpd.inputs.fasta import FastaError, FastaRecord, iter_fasta
from vnpd.inputs.nucleotide import (
    FORWARD_CODONS, NucleotideError, Protein, check_nucleotide, chunk_spans, cut_pieces, gene_proteins,
    looks_like_nucleotide, looks_like_protein, make_gene_finder, six_frame_proteins)

# --- the reference: VirNucPro's rules, written out plainly ------------------------------

REF_CODE = {a + b + c: str(Seq(a + b + c).translate(table=1))
            for a in "ACGT" for b in "ACGT" for c in "ACGT"}


def ref_chunks(sequence: str, size: int) -> list[tuple[int, str]]:
    """VirNucPro's split_fasta_chunk: (start, chunk text) for each chunk, in order."""
    length = len(sequence)
    n = -(-length // size)
    if n == 0:
        return []  # VirNucPro itself divides by zero here
    repeat = n * size - length
    low = int(repeat / n)
    high = low + 1
    n_high = repeat - low * (n - 1)
    steps = [high] * n_high + [low] * (n - 1 - n_high) + [0]
    chunks = []
    moved = 0
    for a, step in zip(range(0, length, size), steps):
        begin = a - moved if a > 1 else a
        chunks.append((begin, sequence[begin:begin + size]))
        moved += step
    return chunks


def ref_frame(dna: str, offset: int) -> str:
    """translate_dna's one frame: codons outside the 64 ACGT ones give nothing."""
    return "".join(REF_CODE.get(dna[i:i + 3], "") for i in range(offset, len(dna) - 2, 3))


def ref_revcomp(dna: str) -> str:
    return str(Seq(dna).reverse_complement())


def ref_six_frame(record_id: str, sequence: str, size: int) -> list[tuple[str, str]]:
    """(id, protein) in VirNucPro's order: chunks, then F1 F2 F3 R1 R2 R3."""
    out = []
    for k, (_, chunk) in enumerate(ref_chunks(sequence, size), start=1):
        chunk = chunk.upper()
        frames = [("F1", ref_frame(chunk, 0)), ("F2", ref_frame(chunk, 1)), ("F3", ref_frame(chunk, 2)),
                  ("R1", ref_frame(ref_revcomp(chunk), 0)), ("R2", ref_frame(ref_revcomp(chunk), 1)),
                  ("R3", ref_frame(ref_revcomp(chunk), 2))]
        for name, protein in frames:
            if "*" not in protein and protein != "":
                out.append((f"{record_id}_chunk_{k}{name}", protein))
    return out


def random_dna(rng: random.Random, length: int) -> str:
    """DNA with GC 40-85% (high GC gives stop-free frames), and sometimes an N run,
    IUPAC codes and a lower-case stretch."""
    gc = rng.uniform(0.40, 0.85)
    bases = rng.choices("GCAT", weights=[gc, gc, 1 - gc, 1 - gc], k=length)
    if length > 10 and rng.random() < 0.3:
        at = rng.randrange(length)
        bases[at:at + rng.randint(1, 40)] = "N" * len(bases[at:at + 40])
    if rng.random() < 0.2:
        for _ in range(rng.randint(1, 5)):
            bases[rng.randrange(length)] = rng.choice("RYKMSWBDHVN")
    text = "".join(bases)[:length]
    if length > 10 and rng.random() < 0.3:
        a, b = sorted(rng.sample(range(length), 2))
        text = text[:a] + text[a:b].lower() + text[b:]
    return text


def check_coordinates(protein: Protein, sequence: str, spans: list[tuple[int, int]]) -> None:
    """The region a protein reports re-translates to it, sits in its chunk, in its frame,
    and starts and ends on a translated (all-ACGT) codon."""
    chunk_k = int(protein.id.rsplit("_chunk_", 1)[1][:-2])
    frame = int(protein.id[-1]) - 1
    start, end = spans[chunk_k - 1]
    assert start <= protein.nt_start < protein.nt_end <= end
    assert (protein.nt_end - protein.nt_start) % 3 == 0
    region = sequence[protein.nt_start:protein.nt_end].upper()
    if protein.id[-2] == "F":
        assert protein.strand == 1 and (protein.nt_start - start) % 3 == frame
    else:
        assert protein.strand == -1 and (end - protein.nt_end) % 3 == frame
        region = ref_revcomp(region)
    assert region[:3] in REF_CODE and region[-3:] in REF_CODE
    assert ref_frame(region, 0) == protein.sequence


def assert_matches_reference(record_id: str, sequence: str, size: int) -> int:
    got = list(six_frame_proteins(record_id, sequence, size))
    assert [(p.id, p.sequence) for p in got] == ref_six_frame(record_id, sequence, size)
    spans = list(chunk_spans(len(sequence), size))
    assert [start for start, _ in spans] == [start for start, _ in ref_chunks(sequence, size)]
    for protein in got:
        assert protein.source_id == record_id
        check_coordinates(protein, sequence, spans)
    return len(got)


# --- six_frame ------------------------------------------------------------------------

def test_codon_table_is_biopythons_standard_code() -> None:
    assert FORWARD_CODONS == REF_CODE


@pytest.mark.parametrize("size", [1, 2, 3, 7, 300, 333, 500])
def test_chunk_spans_equal_virnucpro_for_every_length(size: int) -> None:
    text = "".join(random.Random(size).choices("ACGT", k=2000))
    for length in range(0, 2001):
        sequence = text[:length]
        spans = list(chunk_spans(length, size))
        ref = ref_chunks(sequence, size)
        assert [sequence[a:b] for a, b in spans] == [chunk for _, chunk in ref], length
        assert len(spans) == -(-length // size)
        if spans:  # the chunks cover the record, first to last
            assert spans[0][0] == 0 and spans[-1][1] == length


@pytest.mark.parametrize("size", [300, 500, 333])
def test_six_frame_equals_reference_for_lengths_1_to_2000(size: int) -> None:
    rng = random.Random(1000 + size)
    produced = 0
    for length in range(1, 2001):
        produced += assert_matches_reference(f"contig{length}", random_dna(rng, length), size)
    assert produced > 2000  # the sweep exercised stop-free frames, not only empty output


def test_two_chunk_contig_has_a_shorter_last_chunk() -> None:
    rng = random.Random(7)
    sequence = random_dna(rng, 301)
    spans = list(chunk_spans(301, 300))
    assert len(spans) == 2 and spans[1][1] - spans[1][0] < 300
    assert spans == [(s, s + len(c)) for s, c in ref_chunks(sequence, 300)]
    assert_matches_reference("two", sequence, 300)


def test_n_runs_drop_codons_and_coordinates_span_the_kept_ones() -> None:
    sequence = "ATGGCC" + "N" * 7 + "GCCAAA" + "NN"  # 21 bp, F1 codons: ATG GCC NNN NGC CAA ANN NN
    proteins = list(six_frame_proteins("n", sequence, 300))
    assert [(p.id, p.sequence) for p in proteins] == ref_six_frame("n", sequence, 300)
    f1 = next(p for p in proteins if p.id == "n_chunk_1F1")
    assert f1.sequence == "MAQ" and (f1.nt_start, f1.nt_end) == (0, 18)
    for protein in proteins:
        check_coordinates(protein, sequence, list(chunk_spans(len(sequence), 300)))


def test_all_n_gives_no_proteins() -> None:
    assert list(six_frame_proteins("n", "N" * 900, 300)) == []


def test_lower_case_gives_the_upper_case_proteins() -> None:
    sequence = random_dna(random.Random(3), 1500).upper()
    upper = list(six_frame_proteins("c", sequence, 300))
    assert upper  # the comparison below must compare something
    assert list(six_frame_proteins("c", sequence.lower(), 300)) == upper


def test_contig_without_stop_free_frame_gives_nothing() -> None:
    sequence = "TTAA" * 250  # a stop within 12 bp in every frame of both strands
    assert ref_six_frame("s", sequence, 300) == []
    assert list(six_frame_proteins("s", sequence, 300)) == []


def test_ids_and_order_follow_chunks_then_frames() -> None:
    # GC-only DNA has no stop at all: every frame of every chunk is kept.
    sequence = "".join(random.Random(5).choices("GC", k=700))
    proteins = list(six_frame_proteins("contig7", sequence, 300))
    expected = [f"contig7_chunk_{k}{f}" for k in (1, 2, 3) for f in ("F1", "F2", "F3", "R1", "R2", "R3")]
    assert [p.id for p in proteins] == expected
    assert [p.strand for p in proteins] == [1, 1, 1, -1, -1, -1] * 3
    assert all(p.sequence == p.sequence.upper() for p in proteins)


@settings(max_examples=300, deadline=None)
@given(sequence=st.text(alphabet="ACGTNRYacgtnKM", min_size=0, max_size=1200),
       size=st.integers(min_value=1, max_value=700))
def test_six_frame_equals_reference_on_arbitrary_text(sequence: str, size: int) -> None:
    assert_matches_reference("h", sequence, size)


def test_chunk_length_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_length"):
        list(six_frame_proteins("c", "ACGT", 0))


def test_long_contig_is_streamed_not_materialised() -> None:
    sequence = "GC" * 5_000_000  # 10 Mbp, 33,334 chunks of 300
    tracemalloc.start()
    try:
        proteins = six_frame_proteins("big", sequence, 300)
        first = [next(proteins) for _ in range(60)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first[-1].id == "big_chunk_10R3"
    assert peak < 1_000_000  # a list of every chunk or protein would take tens of MB


def test_pieces_are_runs_of_whole_chunks_and_never_a_whole_long_record() -> None:
    sequence = random_dna(random.Random(4), 20_011)
    record = FastaRecord(3, "c", sequence, 1, 0)
    for chunk_length, max_bases in [(300, 1_000), (300, 299), (157, 5_000), (500, 20_011)]:
        pieces = list(cut_pieces(record, chunk_length, max_bases))
        assert [s for p in pieces for s in p.spans] == list(chunk_spans(len(sequence), chunk_length))
        assert [p.first_chunk for p in pieces] == \
            [1 + sum(len(q.spans) for q in pieces[:i]) for i in range(len(pieces))]
        for p in pieces:
            assert p.text == sequence[p.spans[0][0]:p.spans[-1][1]] and p.start == p.spans[0][0]
            assert len(p.text) <= max_bases or len(p.spans) == 1
            assert (p.record_index, p.record_id) == (3, "c")
        assert (len(pieces) == 1) == (max_bases >= len(sequence))


# --- genes ----------------------------------------------------------------------------

def phage_like(rng: random.Random, genes: int) -> tuple[str, list[tuple[int, int]]]:
    """A phage-like contig: genes (RBS, ATG, 80-400 sense codons, stop) on both strands with
    short AT-rich spacers. Returns the text and each planted gene's (strand, stop end)."""
    sense = [c for c, aa in REF_CODE.items() if aa != "*"]
    parts, planted, at = [], [], 0
    for _ in range(genes):
        spacer = "".join(rng.choices("AATTGC", k=rng.randint(20, 120)))
        gene = ("AGGAGG" + "".join(rng.choices("AT", k=7)) + "ATG"
                + "".join(rng.choices(sense, k=rng.randint(80, 400))) + rng.choice(["TAA", "TAG", "TGA"]))
        if rng.random() < 0.5:
            parts += [spacer, gene]
            planted.append((1, at + len(spacer) + len(gene)))
        else:
            parts += [spacer, ref_revcomp(gene)]
            planted.append((-1, at + len(spacer)))
        at += len(spacer) + len(gene)
    return "".join(parts), planted


def ref_genes(record_id: str, sequence: str) -> list[Protein]:
    """The reference for genes: pyrodigal-gv called directly, its genes written as Proteins
    by hand (ids from 1, Prodigal's 1-based inclusive coordinates made half-open)."""
    genes = pyrodigal_gv.ViralGeneFinder(meta=True).find_genes(sequence)
    return [Protein(f"{record_id}_{n}", gene.translate(include_stop=False), record_id,
                    gene.strand, gene.begin - 1, gene.end) for n, gene in enumerate(genes, start=1)]


def test_gene_proteins_equal_pyrodigal_gv() -> None:
    sequence, planted = phage_like(random.Random(11), 12)
    proteins = list(gene_proteins("phage1", sequence, make_gene_finder()))
    assert len(proteins) >= 8
    assert proteins == ref_genes("phage1", sequence)
    assert all(p.id.startswith("phage1_") and p.source_id == "phage1" for p in proteins)
    # the calls found the planted genes: most stops match, so the input is realistic
    stops = {(p.strand, p.nt_end if p.strand == 1 else p.nt_start) for p in proteins}
    assert len(stops & set(planted)) >= len(planted) * 2 // 3


def test_gene_coordinates_retranslate_to_the_protein_with_the_genes_table() -> None:
    sequence, _ = phage_like(random.Random(12), 10)
    genes = make_gene_finder().find_genes(sequence)
    proteins = list(gene_proteins("p", sequence, make_gene_finder()))
    assert proteins
    for protein, gene in zip(proteins, genes):
        region = sequence[protein.nt_start:protein.nt_end]
        if protein.strand == -1:
            region = ref_revcomp(region)
        translated = str(Seq(region).translate(table=gene.translation_table))
        assert not protein.sequence.endswith("*")
        if not gene.partial_end:
            assert translated.endswith("*") and len(translated) == len(protein.sequence) + 1
        # Prodigal writes M for any start codon (GTG, TTG); Biopython writes V, L.
        assert translated[1:len(protein.sequence)] == protein.sequence[1:]


def test_gene_proteins_accept_lower_case() -> None:
    sequence, _ = phage_like(random.Random(13), 6)
    finder = make_gene_finder()
    upper = list(gene_proteins("p", sequence, finder))
    assert upper
    assert list(gene_proteins("p", sequence.lower(), finder)) == upper


# --- validation -----------------------------------------------------------------------

PROTEIN = "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"  # ubiquitin


@pytest.mark.parametrize("sequence, position, words", [
    ("", None, ["empty sequence"]),
    ("ACGUACGT", 4, ["'U' at position 4", "RNA"]),
    ("acgu", 4, ["'u' at position 4", "RNA"]),
    ("ACGT-ACGT", 5, ["gap '-' at position 5"]),
    ("ACGT.ACGT", 5, ["gap '.' at position 5"]),
    ("ACGTJ", 5, ["invalid character 'J' at position 5", "IUPAC"]),
    ("ACG*", 4, ["invalid character '*' at position 4"]),
    ("ACG T", 4, ["invalid character ' ' at position 4"]),
    ("ACGTé", 5, ["non-ASCII character 'é'", "U+00E9", "position 5"]),
    (PROTEIN, 2, ["invalid character 'Q' at position 2", "looks like a protein"]),
    ("MKTAYK" * 6, None, ["looks like a protein", "36 characters"]),  # only IUPAC letters
])
def test_check_nucleotide_names_what_is_wrong(sequence: str, position: int | None,
                                              words: list[str]) -> None:
    with pytest.raises(NucleotideError) as caught:
        check_nucleotide(sequence)
    assert isinstance(caught.value, ValueError)
    assert caught.value.position == position
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize("sequence", [
    "A", "acgt", "ACGTRYKMSWBDHVN", "acgtrykmswbdhvn", "N" * 500,
    "ATG" * 100 + "RYKMSWBDHV"])  # a few ambiguity codes in a long contig are fine
def test_check_nucleotide_accepts_dna(sequence: str) -> None:
    assert check_nucleotide(sequence) is None


def test_invalid_dna_typo_is_not_called_protein() -> None:
    with pytest.raises(NucleotideError) as caught:
        check_nucleotide("ACGT" * 20 + "E")
    assert "invalid character 'E' at position 81" in str(caught.value)
    assert "protein" not in str(caught.value)


def test_looks_like_protein_threshold() -> None:
    assert looks_like_protein(PROTEIN) and looks_like_protein(PROTEIN.lower())
    assert not looks_like_protein(PROTEIN[:29])  # too short to tell
    dna = "ACGT" * 30  # 120 characters
    assert not looks_like_protein(dna[:-29] + "R" * 29)  # 24% ambiguity codes
    assert looks_like_protein(dna[:-30] + "R" * 30)  # 25%
    assert not looks_like_protein("ACGT-" * 30)  # gaps do not count


def test_looks_like_nucleotide_matches_the_protein_readers_rule(tmp_path: Path) -> None:
    cases = ["ACGT" * 7 + "A", "ACGT" * 7 + "AC", "acgu" * 10, "ACGN" * 10, "ACGT" * 9 + "E",
             PROTEIN, "ACGTR" * 10]
    for n, sequence in enumerate(cases):
        path = tmp_path / f"{n}.fasta"
        path.write_text(f">r\n{sequence}\n")
        try:
            list(iter_fasta(path))
            refused = False
        except FastaError as error:
            refused = "looks like a nucleotide" in str(error)
        assert looks_like_nucleotide(sequence) == refused, sequence
    assert looks_like_nucleotide("ACGT" * 10) and not looks_like_nucleotide(PROTEIN)
