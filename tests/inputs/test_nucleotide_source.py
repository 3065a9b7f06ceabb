"""vnpd/inputs/nucleotide_source.py: real files, real pyrodigal-gv, compared with the
translation functions of vnpd/inputs/nucleotide.py (themselves checked against VirNucPro's
rules and pyrodigal-gv in tests/inputs/test_nucleotide.py) run directly on the records."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from tests.inputs.test_nucleotide import phage_like, random_dna
from vnpd.inputs.fasta import FastaError
from vnpd.inputs.kinds import SOURCE_KINDS
from vnpd.inputs.nucleotide import gene_proteins, make_gene_finder, six_frame_proteins
from vnpd.inputs.nucleotide_source import NucleotideSource
from vnpd.inputs.source import SourceSettings
from tests.inputs.test_index import assert_same_index
from vnpd.inputs.index import FileIndex, index_fasta, sha256_file


def write_dna(path: Path, records: dict[str, str], width: int = 70, newline: str = "\n") -> Path:
    with open(path, "w", newline="") as fh:
        for rid, seq in records.items():
            fh.write(f">{rid} some description{newline}")
            for i in range(0, len(seq), width):
                fh.write(seq[i:i + width] + newline)
    return path


def contigs(seed: int = 5) -> dict[str, str]:
    rng = random.Random(seed)
    records = {f"contig{i}": random_dna(rng, rng.randint(1, 1400)) for i in range(12)}
    records["phage1"] = phage_like(rng, 10)[0]
    records["all_n"] = "N" * 200  # no protein at all
    return records


def expected(records: dict[str, str], settings: SourceSettings) -> list:
    finder = make_gene_finder()
    out = []
    for rid, seq in records.items():
        seq = seq.upper()  # the reader upper-cases, as VirNucPro does
        out += list(six_frame_proteins(rid, seq, settings.chunk_length)
                    if settings.proteins == "six_frame" else gene_proteins(rid, seq, finder))
    return out


def assert_same(source: NucleotideSource, records: dict[str, str], want: list) -> None:
    rows = list(source.rows())
    assert [r.id for r in rows] == [p.id for p in want]
    assert list(source.ids()) == [p.id for p in want]  # from proteins.fasta's headers alone
    assert [r.sequence for r in rows] == [p.sequence for p in want]
    assert [r.index for r in rows] == list(range(len(want)))
    assert source.num_rows == len(want)
    assert source.lengths.tolist() == [len(p.sequence) for p in want]
    fields = source.row_fields()
    assert fields["source_ids"].tolist() == [p.source_id for p in want]
    assert fields["strand"].dtype == np.int8
    assert fields["strand"].tolist() == [p.strand for p in want]
    assert fields["nt_start"].tolist() == [p.nt_start for p in want]
    assert fields["nt_end"].tolist() == [p.nt_end for p in want]
    attrs = source.attributes()
    with_rows = len({p.source_id for p in want})
    assert attrs["records"] == len(records)
    assert attrs["records_with_proteins"] == with_rows
    assert attrs["records_without_proteins"] == len(records) - with_rows
    assert source.sha256 == sha256_file(source.path)
    assert list(source.rows(start=len(want) // 2)) == rows[len(want) // 2:]
    # Indexed while written: the index a second read of proteins.fasta would give.
    assert_same_index(source.index, index_fasta(source.proteins_path, kind="translated"))


@pytest.mark.parametrize("settings", [SourceSettings("nucleotide", "six_frame", 300),
                                      SourceSettings("nucleotide", "six_frame", 157),
                                      SourceSettings("nucleotide", "genes")])
def test_rows_equal_the_translation_run_directly_and_reopen(tmp_path: Path,
                                                            settings: SourceSettings) -> None:
    records = contigs()
    src = write_dna(tmp_path / "in.fna", records)
    want = expected(records, settings)
    assert len(want) > 10
    source = SOURCE_KINDS["nucleotide"].build(src, tmp_path / "index", settings)
    assert isinstance(source, NucleotideSource)
    assert_same(source, records, want)
    assert source.attributes()["records_without_proteins"] >= 1  # all_n
    assert source.attributes()["proteins"] == settings.proteins
    assert source.attributes()["chunk_length"] == \
        (settings.chunk_length if settings.proteins == "six_frame" else 0)
    saved = source.save(tmp_path / "index")
    assert all(p.is_file() for p in saved)
    reopened = NucleotideSource.open(src, tmp_path / "index", settings)
    assert_same(reopened, records, want)
    assert reopened.attributes() == source.attributes()


def test_crlf_and_lower_case_are_accepted(tmp_path: Path) -> None:
    records = {"a": random_dna(random.Random(3), 900).lower(), "b": "acgt" * 100}
    src = write_dna(tmp_path / "in.fna", records, width=61, newline="\r\n")
    settings = SourceSettings("nucleotide", "six_frame", 300)
    source = NucleotideSource.build(src, tmp_path / "index", settings)
    assert_same(source, records, expected(records, settings))


def test_low_complexity_protein_is_not_refused_as_nucleotide(tmp_path: Path) -> None:
    # GGC repeats translate to poly-Gly, which the protein reader alone would take for DNA.
    records = {"gly": "GGC" * 100}
    src = write_dna(tmp_path / "in.fna", records)
    source = NucleotideSource.build(src, tmp_path / "index", SourceSettings("nucleotide"))
    assert "G" * 100 in [r.sequence for r in source.rows()]


def test_no_proteins_gives_zero_rows_with_counts(tmp_path: Path) -> None:
    src = write_dna(tmp_path / "in.fna", {"n1": "N" * 500, "short": "AC"})
    source = NucleotideSource.build(src, tmp_path / "index", SourceSettings("nucleotide"))
    assert source.num_rows == 0 and list(source.rows()) == []
    assert source.attributes()["records"] == 2
    assert source.attributes()["records_without_proteins"] == 2
    st = source.proteins_path.stat()  # index_fasta refuses an empty file: this is its index
    empty = np.empty(0, dtype=np.int64)
    assert_same_index(source.index, FileIndex(0, empty, empty, sha256_file(source.proteins_path),
                                              0, st.st_mtime_ns, st.st_ino))
    assert {k: v.shape for k, v in source.row_fields().items()} == dict.fromkeys(
        ["source_ids", "strand", "nt_start", "nt_end"], (0,))
    source.save(tmp_path / "index")
    assert NucleotideSource.open(src, tmp_path / "index", SourceSettings()).num_rows == 0


@pytest.mark.parametrize("text, line, fragment", [
    (">ok\nACGTACGT\n>bad x\nACGT\nACJT\n", 3, "invalid character 'J' at position 7"),
    (">ok\nACGT\n>empty\n>next\nACGT\n", 3, "empty sequence"),
    (">ok\nACGT\n>rna\nACGUACGU\n", 3, "'U' at position 4"),
    (">ok\nACGT\n>gap\nAC-GT\n", 3, "gap '-' at position 3"),
    (">ok\nACGT\n>prot\n" + "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ\n", 3, "protein"),
    (">ok\nACGT\n>uni\nACG\u00e9T\n", 4, "non-ASCII"),
    (">ok\nACGT\n>ok\nACGT\n", 3, "duplicate id 'ok'"),
])
def test_bad_dna_names_record_and_line(tmp_path: Path, text: str, line: int,
                                       fragment: str) -> None:
    src = tmp_path / "bad.fna"
    src.write_text(text, encoding="utf-8")
    with pytest.raises(FastaError) as caught:
        NucleotideSource.build(src, tmp_path / "index", SourceSettings("nucleotide"))
    err = caught.value
    assert fragment in str(err), str(err)
    assert err.line == line and err.record_id is not None
    assert f"line {line}" in str(err) and repr(err.record_id) in str(err)


def test_protein_file_is_refused_with_a_hint_and_protein_reader_refuses_dna(
        tmp_path: Path) -> None:
    prot = tmp_path / "p.fasta"
    prot.write_text(">p1\nMKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQ\n")
    with pytest.raises(FastaError, match="looks like a protein.*protein file"):
        NucleotideSource.build(prot, tmp_path / "i1", SourceSettings("nucleotide"))
    dna = write_dna(tmp_path / "d.fna", {"c": "ACGT" * 30})
    with pytest.raises(FastaError, match="looks like a nucleotide sequence"):
        SOURCE_KINDS["protein"].build(dna, tmp_path / "i2", SourceSettings("protein"))


def test_long_contig_is_accepted(tmp_path: Path) -> None:
    # Past the protein reader's 1,000,000-residue limit.
    rng = random.Random(9)
    seq = "".join(rng.choices("GCGCAT", k=1_200_003))
    src = write_dna(tmp_path / "big.fna", {"big": seq}, width=80)
    source = NucleotideSource.build(src, tmp_path / "index",
                                    SourceSettings("nucleotide", "six_frame", 500))
    assert source.attributes()["records_with_proteins"] == 1
    assert source.row_fields()["nt_end"].max() <= len(seq)


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    src = write_dna(tmp_path / "in.fna", {"c": "ACGT" * 30})
    with pytest.raises(ValueError, match="chunk_length"):
        NucleotideSource.build(src, tmp_path / "i", SourceSettings("nucleotide", "six_frame", 2))
    with pytest.raises(ValueError, match="proteins"):
        NucleotideSource.build(src, tmp_path / "i", SourceSettings("nucleotide", "orfs", 300))
