"""Tests for vnpd/inputs/fasta.py: one or more per rule of docs/INPUT.md, on real files."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import pickle
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from Bio.SeqIO.FastaIO import SimpleFastaParser
from hypothesis import given, settings
from hypothesis import strategies as st

from vnpd.inputs import fasta
from vnpd.inputs.fasta import (
    ALLOWED_RESIDUES,
    READ_CHUNK,
    DuplicateIdChecker,
    FastaError,
    FastaRecord,
    iter_fasta,
    iter_fasta_from,
)

PROTEIN = "MKVLAAGIVGLLLAACSSEKPAQTQEQAVSQDSTSGNAVQRLTDAAVKAAKEGKVDAVIA"


def write(tmp_path: Path, content: str | bytes, name: str = "in.fasta") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def parse(path: Path, **kwargs: int) -> list[FastaRecord]:
    return list(iter_fasta(path, **kwargs))


def check_ids(path: Path) -> int:
    """Validate ``path`` with duplicate ids, as vnpd.inputs.index does; return the count."""
    checker = DuplicateIdChecker()
    for record in iter_fasta(path):
        checker.add(record)
    checker.finish(path)
    return checker.count


def record_at(path: Path, offset: int) -> FastaRecord:
    """The one record whose ``>`` is at ``offset``, re-read as index windows re-read it."""
    return next(iter_fasta_from(path, offset, 0))


def parse_error(path: Path, **kwargs: int) -> FastaError:
    with pytest.raises(FastaError) as info:
        parse(path, **kwargs)
    return info.value


# --- accepted input -----------------------------------------------------------------

def test_records_have_index_id_sequence_line_and_offset(tmp_path: Path) -> None:
    text = ">sp|P1|A desc here\nMKV\nLAA\n>p2\nGIV\n"
    records = parse(write(tmp_path, text))
    assert records == [
        FastaRecord(0, "sp|P1|A", "MKVLAA", 1, 0),
        FastaRecord(1, "p2", "GIV", 4, text.index(">p2")),
    ]


def test_lowercase_is_upper_cased_and_whitespace_inside_lines_ignored(tmp_path: Path) -> None:
    records = parse(write(tmp_path, ">a\nmk v\tla a \nGi  v\n"))
    assert records[0].sequence == "MKVLAAGIV"


def test_crlf_file_gives_same_records_with_crlf_offsets(tmp_path: Path) -> None:
    text = ">a x\r\nMKV\r\nLAA\r\n\r\n>b\r\nGIV\r\n"
    records = parse(write(tmp_path, text))
    assert [(r.id, r.sequence, r.line, r.offset) for r in records] == [
        ("a", "MKVLAA", 1, 0), ("b", "GIV", 5, text.index(">b"))]


def test_blank_lines_between_and_inside_records_are_allowed(tmp_path: Path) -> None:
    records = parse(write(tmp_path, "\n\n>a\nMKV\n\n  \nLAA\n\n\n>b\nGIV\n\n"))
    assert [(r.id, r.sequence, r.line) for r in records] == [("a", "MKVLAA", 3), ("b", "GIV", 10)]


def test_semicolon_comment_lines_are_ignored_anywhere(tmp_path: Path) -> None:
    text = ";old-style comment\n;another\n>a\n;inside a record\nMKV\nLAA\n;between\n>b\nGIV\n"
    records = parse(write(tmp_path, text))
    assert [(r.id, r.sequence, r.line) for r in records] == [("a", "MKVLAA", 3), ("b", "GIV", 8)]


def test_terminal_star_is_stripped(tmp_path: Path) -> None:
    records = parse(write(tmp_path, ">a\nMKV*\n>b\nMKV\nLAA\n*\n\n>c\nmkv*  \n"))
    assert [r.sequence for r in records] == ["MKV", "MKVLAA", "MKV"]


def test_all_allowed_residues_are_accepted(tmp_path: Path) -> None:
    alphabet = "".join(sorted(ALLOWED_RESIDUES))
    assert len(alphabet) == 25 and set("XBUZO") <= ALLOWED_RESIDUES
    records = parse(write(tmp_path, f">a\n{alphabet}\n>b\n{alphabet.lower()}\n"))
    assert [r.sequence for r in records] == [alphabet, alphabet]


def test_utf8_header_is_accepted(tmp_path: Path) -> None:
    records = parse(write(tmp_path, ">séquence_α protéine\nMKV\n"))
    assert records[0].id == "séquence_α"


def test_utf8_bom_is_skipped(tmp_path: Path) -> None:
    records = parse(write(tmp_path, b"\xef\xbb\xbf>a\nMKV\n"))
    assert records == [FastaRecord(0, "a", "MKV", 1, 3)]
    assert record_at(tmp_path / "in.fasta", 3).sequence == "MKV"


def test_utf8_bom_at_a_line_start_is_skipped_for_concatenated_files(tmp_path: Path) -> None:
    bom = b"\xef\xbb\xbf"
    content = bom + b">a\nMKV\n" + bom + b">b\nLAA\n" + bom + b"GIV\n" + bom + b"\n"  # `cat` of BOM files
    records = parse(write(tmp_path, content))
    assert [(r.id, r.sequence, r.line) for r in records] == [("a", "MKV", 1), ("b", "LAAGIV", 3)]
    assert [content[r.offset:r.offset + 1] for r in records] == [b">", b">"]
    assert record_at(tmp_path / "in.fasta", records[1].offset).sequence == "LAAGIV"


def test_utf8_bom_inside_a_line_is_an_error(tmp_path: Path) -> None:
    err = parse_error(write(tmp_path, ">a\nMK\ufeffV\n"))
    assert err.reason.startswith("non-ASCII character '\\ufeff' (U+FEFF) at position 3")


def test_last_line_without_newline(tmp_path: Path) -> None:
    assert parse(write(tmp_path, ">a\nMKV\n>b\nLAA"))[1].sequence == "LAA"


def test_line_longer_than_read_chunk_is_parsed_in_pieces(tmp_path: Path) -> None:
    long_seq = (PROTEIN * (3 * READ_CHUNK // len(PROTEIN) + 1))
    text = f">a\n{long_seq}\n>b\nMKV\n"
    records = parse(write(tmp_path, text))
    assert records[0].sequence == long_seq
    assert (records[1].line, records[1].offset) == (3, text.index(">b"))


def test_records_before_an_error_are_yielded(tmp_path: Path) -> None:
    records = iter_fasta(write(tmp_path, ">a\nMKV\n>b\nMKJ\n"))
    assert next(records).id == "a"
    with pytest.raises(FastaError):
        next(records)


# --- rejected input, one rule at a time ----------------------------------------------

def test_invalid_residue_names_character_position_record_and_its_own_line(tmp_path: Path) -> None:
    err = parse_error(write(tmp_path, ">ok\nMKV\n>bad desc\nMKVLAAGIVG\nLLJAA\n"))
    assert err.reason == "invalid residue 'J' at position 13"
    assert (err.record_id, err.record_index, err.line) == ("bad", 1, 5)
    assert str(err) == "line 5, record 'bad' (#2): invalid residue 'J' at position 13"


def test_invalid_residue_is_named_as_written(tmp_path: Path) -> None:
    err = parse_error(write(tmp_path, ">a\nmk j\n"))
    assert (err.reason, err.line) == ("invalid residue 'j' at position 3", 2)


@pytest.mark.parametrize("gap", ["-", "."])
def test_alignment_gaps_are_errors(tmp_path: Path, gap: str) -> None:
    err = parse_error(write(tmp_path, f">a\nMKV{gap}LAA\n"))
    assert err.reason.startswith(f"invalid residue {gap!r} at position 4 (alignment gap")
    assert (err.record_id, err.line) == ("a", 2)


@pytest.mark.parametrize("char", ["1", "#", "@", "?"])
def test_digits_and_symbols_are_errors(tmp_path: Path, char: str) -> None:
    err = parse_error(write(tmp_path, f">a\nMK\nV{char}\n"))
    assert (err.reason, err.record_id, err.line) == (f"invalid residue {char!r} at position 4", "a", 3)


def test_star_inside_a_line_is_an_error(tmp_path: Path) -> None:
    err = parse_error(write(tmp_path, ">a\nMK*VL\n"))
    assert err.reason.startswith("'*' at position 3 is not at the end of the sequence")
    assert (err.record_id, err.line) == ("a", 2)


def test_star_at_end_of_a_line_followed_by_residues_is_an_error(tmp_path: Path) -> None:
    err = parse_error(write(tmp_path, ">a\nMKV*\n\nLAA\n>b\nMKV\n"))
    assert err.reason.startswith("'*' at position 4 is not at the end")
    assert (err.record_id, err.line) == ("a", 2)


def test_double_terminal_star_is_an_error(tmp_path: Path) -> None:
    err = parse_error(write(tmp_path, ">a\nMKV**\n"))
    assert err.reason.startswith("'*' at position 4 is not at the end")


@pytest.mark.parametrize(("text", "line", "what"), [
    (">a\n>b\nMKV\n", 1, "no residues"),
    (">a\nMKV\n>b\n\n\n", 3, "no residues"),
    (">only_header\n", 1, "no residues"),
    (">a\n*\n", 1, "only a '*'"),
])
def test_empty_sequence_names_record_and_header_line(tmp_path: Path, text: str, line: int,
                                                      what: str) -> None:
    err = parse_error(write(tmp_path, text))
    assert err.reason == f"empty sequence ({what})"
    assert err.line == line and err.record_id is not None


@pytest.mark.parametrize("text", ["", "\n\n", "  \t\r\n \n", ";just a comment\n"])
def test_empty_or_blank_file_has_no_records(tmp_path: Path, text: str) -> None:
    err = parse_error(write(tmp_path, text))
    assert err.reason.startswith("no FASTA records")
    assert (err.record_id, err.line) == (None, None)


def test_text_that_is_not_fasta_is_reported_at_its_first_line(tmp_path: Path) -> None:
    err = parse_error(write(tmp_path, "\n\nid,sequence\nP1,MKV\n"))
    assert err.reason == "not FASTA: expected a '>' header line, found 'id,sequence'"
    assert (err.record_id, err.line) == (None, 3)


def test_sequence_before_first_header_is_not_fasta(tmp_path: Path) -> None:
    err = parse_error(write(tmp_path, "MKVLAA\n>a\nMKV\n"))
    assert err.reason.startswith("not FASTA") and err.line == 1


@pytest.mark.parametrize(("text", "hint"), [
    ("@read1\nACGT\n+\nIIII\n", "this looks like FASTQ"),
    ("LOCUS       NC_001 5386 bp DNA\n", "this looks like GenBank"),
    ("ID   HBA_HUMAN Reviewed; 142 AA.\n", "this looks like EMBL or UniProt text"),
])
def test_formats_mistaken_for_fasta_are_named(tmp_path: Path, text: str, hint: str) -> None:
    err = parse_error(write(tmp_path, text))
    assert err.reason.startswith("not FASTA: expected a '>' header line, found ")
    assert f"({hint}" in err.reason and err.line == 1


@pytest.mark.parametrize(("content", "line"), [
    (b">a\nMK\x00V\n", 2),
    (b">a\x00b\nMKV\n", 1),
    (b"\x7fELF\x02\x01\x01\x00", 1),
    (b">a\nMKV\n" * 2000 + b">b\nM\x00\n", 4002),  # past the first 8 KiB: found line by line
    (b">a\nMKV\n" * 2000 + b">b\x00\nM\n", 4001),
    (b"\n" * 9000 + b"\x00bc\n", 9001),
])
def test_nul_byte_means_binary(tmp_path: Path, content: bytes, line: int) -> None:
    err = parse_error(write(tmp_path, content))
    assert err.reason.startswith("NUL byte: this is a binary file") and err.line == line


@pytest.mark.parametrize(("compress", "name"), [
    (gzip.compress, "gzip"), (bz2.compress, "bzip2"), (lzma.compress, "xz"),
    (lambda data: b"\x28\xb5\x2f\xfd" + data, "zstd"),
])
def test_compressed_file_is_rejected_with_how_to_decompress(tmp_path: Path,
                                                             compress: Callable[[bytes], bytes],
                                                             name: str) -> None:
    err = parse_error(write(tmp_path, compress(b">a\nMKV\n")))
    assert err.reason.startswith(f"the file is {name}-compressed; decompress it first")
    assert err.line == 1


@pytest.mark.parametrize(("content", "reason"), [
    (b"PK\x03\x04\x14\x00\x00\x00", "the file is a zip archive; extract it first (unzip FILE)"),
    (b"\x89HDF\r\n\x1a\n\x00\x00\x00", "the file is HDF5 (an embeddings output?), not FASTA"),
])
def test_archives_and_hdf5_are_named(tmp_path: Path, content: bytes, reason: str) -> None:
    err = parse_error(write(tmp_path, content))
    assert (err.reason, err.line) == (reason, 1)


@pytest.mark.parametrize(("encoding", "bom", "name"), [
    ("utf-16-le", b"\xff\xfe", "UTF-16-LE"), ("utf-16-be", b"\xfe\xff", "UTF-16-BE"),
    ("utf-32-le", b"\xff\xfe\x00\x00", "UTF-32-LE"), ("utf-32-be", b"\x00\x00\xfe\xff", "UTF-32-BE"),
])
def test_utf16_and_utf32_files_are_rejected_naming_the_encoding(tmp_path: Path, encoding: str,
                                                                 bom: bytes, name: str) -> None:
    err = parse_error(write(tmp_path, bom + ">a\nMKV\n".encode(encoding)))
    assert err.reason.startswith(f"the file is {name} encoded") and err.line == 1


def test_utf16_without_bom_is_reported_as_binary(tmp_path: Path) -> None:
    err = parse_error(write(tmp_path, ">a\nMKV\n".encode("utf-16-le")))
    assert "UTF-16/UTF-32" in err.reason and err.line == 1


def test_non_utf8_header_names_encoding_and_line(tmp_path: Path) -> None:
    err = parse_error(write(tmp_path, ">a\nMKV\n>caf\xe9 prot\nMKV\n".encode("latin-1")))
    assert err.reason.startswith("header is not valid UTF-8 (byte 0xe9 at column 5)")
    assert "Latin-1" in err.reason
    assert (err.record_index, err.line) == (1, 3)


def test_non_ascii_character_in_sequence(tmp_path: Path) -> None:
    err = parse_error(write(tmp_path, ">a\nMKV\nLÄA\n"))
    assert err.reason == "non-ASCII character 'Ä' (U+00C4) at position 5; sequences must be ASCII"
    assert (err.record_id, err.line) == ("a", 3)


def test_non_utf8_byte_in_sequence(tmp_path: Path) -> None:
    err = parse_error(write(tmp_path, b">a\nMK\xe9V\n"))
    assert err.reason.startswith("sequence is not valid UTF-8 (byte 0xe9 at column 3)")
    assert (err.record_index, err.line) == (0, 2)


def test_non_utf8_text_before_first_header(tmp_path: Path) -> None:
    err = parse_error(write(tmp_path, b"\xe9t\xe9\n>a\nMKV\n"))
    assert err.reason.startswith("text is not valid UTF-8") and err.line == 1


@pytest.mark.parametrize("seq", ["ACGT" * 8, "acgtn" * 6, "ACGU" * 8, "ACGTACGTACGTACGTAC\nGTACGTACGTACGTAC"])
def test_nucleotide_looking_record_is_rejected(tmp_path: Path, seq: str) -> None:
    err = parse_error(write(tmp_path, f">ok\nMKV\n>dna x\n{seq}\n"))
    assert err.reason.startswith("looks like a nucleotide sequence")
    assert (err.record_id, err.record_index, err.line) == ("dna", 1, 3)


def test_short_or_protein_acgt_records_are_accepted(tmp_path: Path) -> None:
    # 29 ACGT residues, and 30 with one non-nucleotide letter, are plausible peptides.
    records = parse(write(tmp_path, f">a\n{'ACGT' * 7}A\n>b\n{'ACGT' * 7}AM\n"))
    assert [len(r.sequence) for r in records] == [29, 30]


@pytest.mark.parametrize("header", [">", "> description only", ">\tdesc", ">\r"])
def test_empty_header_id_is_an_error(tmp_path: Path, header: str) -> None:
    err = parse_error(write(tmp_path, f">a\nMKV\n{header}\nMKV\n"))
    assert err.reason.startswith("empty record id")
    assert (err.record_index, err.line) == (1, 3)


def test_record_longer_than_max_residues(tmp_path: Path) -> None:
    path = write(tmp_path, ">a\nMKVLA\n>b\nMKVLA\nA\n")
    err = parse_error(path, max_residues=5)
    assert err.reason == "sequence longer than max_residues=5"
    assert (err.record_id, err.record_index, err.line) == ("b", 1, 3)


def test_record_at_max_residues_is_accepted(tmp_path: Path) -> None:
    assert [r.sequence for r in parse(write(tmp_path, ">a\nMKVLA\n"), max_residues=5)] == ["MKVLA"]


def test_header_longer_than_limit(tmp_path: Path) -> None:
    err = parse_error(write(tmp_path, ">a " + "x" * fasta.MAX_HEADER_BYTES + "\nMKV\n"))
    assert err.reason.startswith("header line longer than") and err.line == 1


def test_bare_carriage_return_line_endings(tmp_path: Path) -> None:
    err = parse_error(write(tmp_path, ">a\rMKV\r>b\rMKV\r"))
    assert err.reason.startswith("bare carriage-return") and err.line == 1


def test_error_position_and_line_in_a_line_longer_than_read_chunk(tmp_path: Path) -> None:
    bad_at = READ_CHUNK * 2 + 17
    seq = "A" * (bad_at - 1) + "J" + "M" * 100
    err = parse_error(write(tmp_path, f">a\nMKV\n{seq}\n"))
    assert (err.reason, err.line) == (f"invalid residue 'J' at position {bad_at + 3}", 3)


# --- duplicate ids --------------------------------------------------------------------

def test_duplicate_id_names_id_second_line_and_first_line(tmp_path: Path) -> None:
    path = write(tmp_path, ">a\nMKV\n>dup x\nMKV\n>b\nMKV\n>dup y\nLAA\n")
    assert len(parse(path)) == 4  # iter_fasta alone does not check ids
    with pytest.raises(FastaError) as info:
        check_ids(path)
    err = info.value
    assert err.reason == "duplicate id 'dup' (first at line 3)"
    assert (err.record_id, err.record_index, err.line) == ("dup", 3, 7)


def test_duplicate_found_after_many_records(tmp_path: Path) -> None:
    n = 3 * DuplicateIdChecker._BLOCK + 5  # several flushes and array growths
    lines = [f">r{i}\nMKV\n" for i in range(n)] + [">r70000\nMKV\n"]
    path = write(tmp_path, "".join(lines))
    with pytest.raises(FastaError) as info:
        check_ids(path)
    assert (info.value.record_id, info.value.line, info.value.record_index) == ("r70000", 2 * n + 1, n)
    assert "first at line 140001" in info.value.reason


def test_unique_ids_pass_and_count_is_returned(tmp_path: Path) -> None:
    n = DuplicateIdChecker._BLOCK + 3
    assert check_ids(write(tmp_path, "".join(f">r{i}\nMKV\n" for i in range(n)))) == n


def test_hash_collision_without_equal_ids_is_not_a_duplicate(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fasta, "hash", lambda _: 42, raising=False)
    assert check_ids(write(tmp_path, ">a\nMKV\n>b\nMKV\n>c\nMKV\n")) == 3
    with pytest.raises(FastaError) as info:
        content = b"\xef\xbb\xbf;c\r\n>a\r\nMKV\r\n>b\r\nMKV\r\n>a x\r\nMKV"
        check_ids(write(tmp_path, content, "dup.fasta"))
    assert (info.value.record_id, info.value.record_index, info.value.line) == ("a", 2, 6)
    assert info.value.reason == "duplicate id 'a' (first at line 2)"


def test_duplicate_checker_cannot_be_pickled() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(DuplicateIdChecker())


# --- error object, iter_fasta_from -----------------------------------------------------

def test_fasta_error_to_dict_and_pickle() -> None:
    err = FastaError("invalid residue 'J' at position 17", record_id="p1", record_index=3, line=9)
    assert isinstance(err, ValueError)
    assert err.to_dict() == {"reason": "invalid residue 'J' at position 17", "record": "p1",
                             "record_index": 3, "line": 9}
    copy = pickle.loads(pickle.dumps(err))
    assert (str(copy), copy.to_dict()) == (str(err), err.to_dict())
    assert str(FastaError("no FASTA records")) == "no FASTA records"
    assert str(FastaError("empty record id", record_index=1, line=3)) == "line 3, record #2: empty record id"


def test_iter_fasta_from_every_offset(tmp_path: Path) -> None:
    path = write(tmp_path, ";c\n>a d\nmkv\nLAA*\n\n>b\r\nGIV\r\n>c\nM")
    for record in parse(path):
        assert record_at(path, record.offset) == FastaRecord(0, record.id, record.sequence, -1,
                                                             record.offset)


def test_iter_fasta_from_streams_the_rest_numbered_from_first_index(tmp_path: Path) -> None:
    path = write(tmp_path, ">a\nMKV\n>b x\nlaa\n\n>c\nGIV*\n")
    records = parse(path)
    tail = list(iter_fasta_from(path, records[1].offset, 1))
    assert tail == [FastaRecord(r.index, r.id, r.sequence, -1, r.offset) for r in records[1:]]
    assert [r.index for r in iter_fasta_from(path, records[1].offset, 500)] == [500, 501]


def test_iter_fasta_from_validates_with_record_index_but_unknown_line(tmp_path: Path) -> None:
    path = write(tmp_path, ">a\nMKV\n>b\nMKV\n>c\nMK-V\n")
    with pytest.raises(FastaError) as info:
        list(iter_fasta_from(path, 7, 1))
    assert info.value.to_dict() == {"reason": "invalid residue '-' at position 3 (alignment gap; remove "
                                    "gaps before embedding)", "record": "c", "record_index": 2, "line": None}
    with pytest.raises(FastaError, match="no FASTA header"):
        list(iter_fasta_from(path, 8, 1))




# --- cross-check with Biopython, and round-trip properties -----------------------------

def random_fasta(rng: random.Random, n: int, newline: str, lower: bool) -> str:
    out = io.StringIO()
    letters = "".join(sorted(ALLOWED_RESIDUES))
    for i in range(n):
        seq = "M" + "".join(rng.choices(letters, k=rng.randint(0, 400)))
        seq = seq.lower() if lower and rng.random() < 0.5 else seq
        seq += "*" if rng.random() < 0.2 else ""
        width = rng.choice([60, 80, 7, len(seq)])
        body = newline.join(seq[j:j + width] for j in range(0, len(seq), width))
        out.write(f">id{i}_{rng.randint(0, 10**6)} desc {i}{newline}{body}{newline}")
        out.write(newline if rng.random() < 0.1 else "")
    return out.getvalue()


@pytest.mark.parametrize(("newline", "lower"), [("\n", False), ("\n", True), ("\r\n", False), ("\r\n", True)])
def test_same_ids_and_sequences_as_biopython(tmp_path: Path, newline: str, lower: bool) -> None:
    path = write(tmp_path, random_fasta(random.Random(7), 500, newline, lower))
    with open(path, encoding="utf-8") as handle:
        expected = [(title.split(None, 1)[0], seq.upper().removesuffix("*"))
                    for title, seq in SimpleFastaParser(handle)]  # type: ignore[no-untyped-call]
    assert [(r.id, r.sequence) for r in iter_fasta(path)] == expected


_id_chars = st.characters(categories=("L", "N")) | st.sampled_from("|_.-:>;*")
_desc_chars = st.characters(blacklist_categories=("Cc", "Cs"))
_residues = st.sampled_from(sorted(ALLOWED_RESIDUES) + sorted(r.lower() for r in ALLOWED_RESIDUES))
_records = st.lists(
    st.tuples(
        st.text(_id_chars, min_size=1, max_size=12),              # id
        st.text(_desc_chars, max_size=20),                        # description
        st.text(_residues, min_size=1, max_size=200).filter(
            lambda s: len(s) < 30 or set(s.upper()) - set("ACGTUN")),
        st.booleans(),                                            # terminal '*'
        st.integers(min_value=1, max_value=90),                   # line width
        st.sampled_from(["", "\n", " \n", "\n;comment\n"]),       # between records
    ),
    min_size=1, max_size=12, unique_by=lambda r: r[0],
)


@settings(max_examples=300, deadline=None)
@given(records=_records, newline=st.sampled_from(["\n", "\r\n"]), data=st.data())
def test_round_trip_random_valid_files(tmp_path_factory: pytest.TempPathFactory,
                                       records: list[tuple[str, str, str, bool, int, str]],
                                       newline: str, data: st.DataObject) -> None:
    """Random ids, descriptions, case, wrapping, CRLF, blank and comment lines round-trip exactly."""
    out = bytearray()
    expected = []
    line = 1
    for index, (rec_id, desc, seq, star, width, gap) in enumerate(records):
        header = f">{rec_id} {desc}"
        text = seq + ("*" if star else "")
        chunks = [text[j:j + width] for j in range(0, len(text), width)]
        expected.append(FastaRecord(index, rec_id, seq.upper(), line, len(out)))
        block = newline.join([header, *chunks]) + newline + gap.replace("\n", newline)
        out += block.encode("utf-8")
        line += block.count("\n")
    if data.draw(st.booleans(), label="drop final newline"):
        out = out.rstrip(b"\r\n")
    path = write(tmp_path_factory.mktemp("prop"), bytes(out))
    assert parse(path) == expected
    assert check_ids(path) == len(expected)
    for record in expected:
        assert record_at(path, record.offset) == FastaRecord(0, record.id, record.sequence, -1,
                                                             record.offset)
    start = data.draw(st.integers(0, len(expected) - 1), label="iter_fasta_from start")
    assert list(iter_fasta_from(path, expected[start].offset, start)) == [
        FastaRecord(r.index, r.id, r.sequence, -1, r.offset) for r in expected[start:]]
