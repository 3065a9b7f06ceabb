"""Streaming FASTA reader with validation: the first step of indexing an input file.

``iter_fasta`` reads a file in binary, line by line, and yields one ``FastaRecord`` per
record with its 1-based header line and the byte offset of its ``>``. It holds at most
one record in memory, so files of any size can be indexed; ``iter_fasta_from`` re-reads
records from those offsets. ``DuplicateIdChecker`` finds
repeated ids in bounded memory. Every problem is a ``FastaError`` naming the record and
the line; docs/INPUT.md lists the rules, and says why Biopython is not used to parse.

Example::

    checker = DuplicateIdChecker()
    for record in iter_fasta(Path("in.fasta")):
        checker.add(record)          # record.id, record.sequence, record.offset, ...
    checker.finish(Path("in.fasta"))  # raises FastaError on a duplicated id
"""

from __future__ import annotations

import sys
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO, NoReturn

import numpy as np

from vnpd.compute.tokenizer import RESIDUE_LETTERS
from vnpd.inputs.fasta_errors import (_BINARY, WHITESPACE, FastaError, decode_utf8,
                                      raise_first_bad_byte, raise_not_fasta)

__all__ = ["FastaError", "FastaRecord", "DuplicateIdChecker", "iter_fasta", "iter_fasta_from"]

ALLOWED_RESIDUES: frozenset[str] = frozenset(RESIDUE_LETTERS)
"""The 20 standard amino acids plus X B U Z O: the residue letters of fair-esm's ESM-1b alphabet,
taken from the tokenizer so that what the reader accepts is exactly what ``encode`` can encode."""

NUCLEOTIDE_MIN_LENGTH = 30
"""Records at least this long made only of A C G T U N are rejected as nucleotide sequences."""

READ_CHUNK = 1 << 16
"""Bytes per ``readline`` call: a longer line is processed in pieces, never loaded whole."""

MAX_HEADER_BYTES = 1 << 20
"""Longest header line accepted; the only line that is kept whole in memory."""

_ALLOWED = "".join(sorted(ALLOWED_RESIDUES)).encode("ascii")
_PRINTABLE = bytes(range(0x21, 0x7F))  # nucleotide text: letters are checked per record
_NUCLEOTIDES = b"ACGTUN"
_UPPER = bytes.maketrans(b"abcdefghijklmnopqrstuvwxyz", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_VALID = bytes(int(bytes([c]).translate(_UPPER) in _ALLOWED) for c in range(256))  # either case

_COMPRESSED = "the file is {}-compressed; decompress it first ({} FILE)"
_ENCODED = "the file is {} encoded (byte-order mark); save it as ASCII or UTF-8"
# (magic, why the file is refused); longest first: the UTF-32-LE BOM starts with the UTF-16-LE one.
_MAGIC = ((b"\x1f\x8b", _COMPRESSED.format("gzip", "gunzip")),
          (b"BZh", _COMPRESSED.format("bzip2", "bunzip2")),
          (b"\xfd7zXZ\x00", _COMPRESSED.format("xz", "unxz")),
          (b"\x28\xb5\x2f\xfd", _COMPRESSED.format("zstd", "unzstd")),
          (b"PK\x03\x04", "the file is a zip archive; extract it first (unzip FILE)"),
          (b"\x89HDF\r\n\x1a\n", "the file is HDF5 (an embeddings output?), not FASTA"),
          (b"\xff\xfe\x00\x00", _ENCODED.format("UTF-32-LE")),
          (b"\x00\x00\xfe\xff", _ENCODED.format("UTF-32-BE")),
          (b"\xff\xfe", _ENCODED.format("UTF-16-LE")), (b"\xfe\xff", _ENCODED.format("UTF-16-BE")))
_UTF8_BOM = b"\xef\xbb\xbf"
# First-line prefixes of formats that users mistake for FASTA: named in the error.
KINDS = ("protein", "translated", "nucleotide")
"""What a file holds, for the reader's ``kind``: ``protein`` (the rules of docs/INPUT.md),
``translated`` (proteins vnpd derived from DNA: the same letters, but a low-complexity
protein such as poly-Gly is not refused as nucleotide text), ``nucleotide`` (any printable
ASCII letters, upper-cased, ``*`` kept: :func:`vnpd.inputs.nucleotide.check_nucleotide`
judges the whole record)."""
_HEAD_BYTES = 8192  # how much of the file start is checked for magic numbers and NULs


@dataclass(frozen=True, slots=True)
class FastaRecord:
    """One validated record.

    ``id`` is the header text after ``>`` up to the first whitespace. ``sequence`` holds
    only letters of ``ALLOWED_RESIDUES``: upper-cased, whitespace removed, terminal ``*``
    stripped. ``index`` is 0-based, ``line`` (of the header) 1-based; ``line`` is -1 from
    ``iter_fasta_from``. ``offset`` is the byte offset of the ``>``.
    """

    index: int
    id: str
    sequence: str
    line: int
    offset: int


def iter_fasta(path: Path, *, max_residues: int = 1_000_000,
               kind: str = "protein") -> Iterator[FastaRecord]:
    """Stream and validate the records of ``path``, in file order, read as ``kind`` (:data:`KINDS`).

    Raises ``FastaError`` at the first problem (records before it have been yielded):
    see docs/INPUT.md for the rules. Duplicate ids are not checked here; use
    ``DuplicateIdChecker``. Raises ``OSError`` if the file cannot be read.
    """
    with open(path, "rb") as fh:
        start = _check_file_start(fh.read(_HEAD_BYTES))
        fh.seek(start)
        yield from _parse(fh, offset=start, max_residues=max_residues, kind=kind)


def iter_fasta_from(path: Path, offset: int, first_index: int, *, max_residues: int = 1_000_000,
                    kind: str = "protein") -> Generator[FastaRecord, None, None]:
    """Stream validated records from the header at byte ``offset`` to the end of the file.

    For re-reading windows of an indexed file: ``offset`` must be a ``FastaRecord.offset``
    reported for this file, and records are numbered from ``first_index``. Their ``line``
    is -1 (unknown without reading from the start), and a ``FastaError`` has ``line``
    None. Raises ``FastaError`` if there is no ``>`` at ``offset``.
    """
    with open(path, "rb") as fh:
        fh.seek(offset)
        if fh.read(1) != b">":
            raise FastaError(f"no FASTA header ('>') at byte offset {offset}")
        fh.seek(offset)
        try:
            yield from _parse(fh, offset=offset, max_residues=max_residues,
                              first_index=first_index, known_lines=False, kind=kind)
        except FastaError as exc:
            raise FastaError(exc.reason, record_id=exc.record_id,
                             record_index=exc.record_index) from None


class DuplicateIdChecker:
    """Duplicate-id detection in bounded memory, for files with millions of records.

    Call ``add`` for every record of one file, in order, then ``finish(path)`` once.
    Only an 8-byte hash per id is kept (a growable numpy uint64 array). ``finish`` sorts
    the hashes; only if two are equal does it re-read the file, to tell a real
    duplicate from a hash collision and to find the lines. The hash is Python's salted
    ``hash(str)``, valid within one process only, so a checker refuses to be pickled.
    """

    _BLOCK = 1 << 16

    def __init__(self) -> None:
        self._hashes = np.empty(self._BLOCK, dtype=np.uint64)
        self._count = 0
        # numpy item assignment costs ~10x a list append; hashes go over in blocks.
        self._pending: list[int] = []

    @property
    def count(self) -> int:
        """Records added so far."""
        return self._count + len(self._pending)

    def add(self, record: FastaRecord) -> None:
        """Remember ``record.id``."""
        self._pending.append(hash(record.id))
        if len(self._pending) >= self._BLOCK:
            self._flush()

    def finish(self, path: Path, *, kind: str = "protein") -> None:
        """Raise ``FastaError`` if an id was added twice; ``path`` is the file the records
        came from, read as ``kind`` (see :data:`KINDS`).

        The error names the id and the line of its second occurrence (``line``,
        ``record_index``); its reason gives the first occurrence's line.
        """
        self._flush()
        hashes = np.sort(self._hashes[: self._count])
        repeated = hashes[1:][hashes[1:] == hashes[:-1]]
        if repeated.size == 0:
            return
        suspects = set(np.unique(repeated).view(np.int64).tolist())
        first_line: dict[str, int] = {}
        # The file already passed iter_fasta, so no limit on length is needed the second time.
        for record in iter_fasta(path, max_residues=sys.maxsize, kind=kind):
            if hash(record.id) in suspects:
                if record.id in first_line:
                    raise FastaError(
                        f"duplicate id {record.id!r} (first at line {first_line[record.id]})",
                        record_id=record.id, record_index=record.index, line=record.line)
                first_line[record.id] = record.line

    def __getstate__(self) -> NoReturn:
        raise TypeError("DuplicateIdChecker holds process-local hashes and cannot be pickled")

    def _flush(self) -> None:
        if not self._pending:
            return
        block = np.array(self._pending, dtype=np.int64).view(np.uint64)
        end = self._count + block.size
        if end > self._hashes.size:
            grown = np.empty(max(end, 2 * self._hashes.size), dtype=np.uint64)
            grown[: self._count] = self._hashes[: self._count]
            self._hashes = grown
        self._hashes[self._count:end] = block
        self._count = end
        self._pending.clear()


def _check_file_start(head: bytes) -> int:
    """Reject compressed, UTF-16/32 and binary files by their first bytes; return where FASTA text starts."""
    for magic, why in _MAGIC:
        if head.startswith(magic):
            raise FastaError(why, line=1)
    # Binary formats often start with a text-like line; their NULs come soon after.
    if (nul := head.find(b"\0")) >= 0:
        raise FastaError(_BINARY, line=head.count(b"\n", 0, nul) + 1)
    # Windows editors add a UTF-8 BOM; it is harmless, so it is skipped rather than refused.
    return len(_UTF8_BOM) if head.startswith(_UTF8_BOM) else 0


def _parse(fh: BinaryIO, *, offset: int, max_residues: int, first_index: int = 0,
           known_lines: bool = True, kind: str = "protein") -> Iterator[FastaRecord]:
    """Yield records from ``fh``, positioned at byte ``offset`` at the start of a line.

    Records are numbered from ``first_index``; without ``known_lines`` (a start mid-file)
    their ``line`` is -1. This loop runs once per line of multi-GB files, so its common
    path is a few C-level bytes operations; rare cases (errors, '*') are in helpers.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    allowed = _PRINTABLE if kind == "nucleotide" else _ALLOWED
    refuse_nucleotide = kind == "protein"
    readline = fh.readline
    lineno = 0
    at_line_start = True
    in_comment = False
    rec_id: str | None = None  # None until the first header
    rec_index = first_index - 1
    rec_line = rec_offset = 0
    parts: list[bytes] = []
    count = 0
    star_line = star_pos = 0  # a pending terminal '*'; 0 when none
    while chunk := readline(READ_CHUNK):
        start = offset
        offset += len(chunk)
        line_start = at_line_start
        at_line_start = chunk[-1] == 10
        if line_start:
            lineno += 1
            lead = chunk[0]
            if lead == 0xEF and chunk.startswith(_UTF8_BOM):
                # `cat a.fasta b.fasta` of files saved with a BOM puts one at a line start.
                chunk, start = chunk[len(_UTF8_BOM):], start + len(_UTF8_BOM)
                if not chunk:
                    continue
                lead = chunk[0]
            if lead == 62:  # '>'
                if rec_id is not None:
                    yield _build_record(rec_index, rec_id, parts, count, rec_line, rec_offset,
                                        star_line, refuse_nucleotide)
                rec_index += 1
                rec_line, rec_offset = (lineno if known_lines else -1), start
                while not at_line_start:
                    more = readline(READ_CHUNK)
                    if not more:
                        break
                    offset += len(more)
                    chunk += more
                    at_line_start = chunk[-1] == 10
                    if len(chunk) > MAX_HEADER_BYTES:
                        raise FastaError(f"header line longer than {MAX_HEADER_BYTES} bytes",
                                         record_index=rec_index, line=lineno)
                rec_id = _header_id(chunk, rec_index, lineno)
                parts = []
                count = star_line = star_pos = 0
                continue
            in_comment = lead == 59  # ';': old-style comment line, ignored
        if in_comment:
            continue
        residues = chunk.translate(_UPPER, WHITESPACE)
        if not residues:
            continue
        if rec_id is None:
            raise_not_fasta(chunk, lineno)
        if residues.translate(None, allowed):
            if allowed is _PRINTABLE:
                _raise_not_text(chunk, count, rec_id, rec_index, lineno)
            stripped = _strip_terminal_star(chunk, residues, count, rec_id, rec_index, lineno)
            if star_line:
                _raise_inner_star(star_pos, rec_id, rec_index, star_line)
            star_line, star_pos = lineno, count + len(residues)
            residues = stripped
        elif star_line:
            _raise_inner_star(star_pos, rec_id, rec_index, star_line)
        count += len(residues)
        if count > max_residues:
            raise FastaError(f"sequence longer than max_residues={max_residues}",
                             record_id=rec_id, record_index=rec_index, line=rec_line)
        parts.append(residues)
    if rec_id is None:
        raise FastaError("no FASTA records (the file is empty, blank or only comments)")
    yield _build_record(rec_index, rec_id, parts, count, rec_line, rec_offset, star_line,
                        refuse_nucleotide)


def _build_record(index: int, rec_id: str, parts: list[bytes], count: int, line: int,
                  offset: int, star_line: int, refuse_nucleotide: bool = True) -> FastaRecord:
    """Apply the whole-record rules (empty, nucleotide) and build the record.

    ``parts`` is emptied: a 100 Mbp contig is then held once (as the record's text) while
    the caller works on it, and twice only for the moment it is decoded."""
    if count == 0:
        what = "only a '*'" if star_line else "no residues"
        raise FastaError(f"empty sequence ({what})", record_id=rec_id, record_index=index, line=line)
    sequence = parts[0] if len(parts) == 1 else b"".join(parts)
    parts.clear()
    if refuse_nucleotide and count >= NUCLEOTIDE_MIN_LENGTH and \
            not sequence.translate(None, _NUCLEOTIDES):
        raise FastaError(
            f"looks like a nucleotide sequence ({count} residues, all A/C/G/T/U/N); "
            "translate it to protein first",
            record_id=rec_id, record_index=index, line=line)
    return FastaRecord(index, rec_id, sequence.decode("ascii"), line, offset)


def _header_id(header: bytes, index: int, lineno: int) -> str:
    """Check a header line and return its id (text after '>' up to the first whitespace)."""
    if b"\0" in header:
        raise FastaError(_BINARY, record_index=index, line=lineno)
    if not header.isascii():
        decode_utf8(header, "header", index, lineno)
    if b"\r" in header and b"\r" in header.rstrip(b"\r\n"):
        # A lone CR is the classic Mac OS line end: the whole file would read as one header.
        raise FastaError("bare carriage-return (\\r) line endings; convert the file to \\n or \\r\\n",
                         record_index=index, line=lineno)
    token = header.split(None, 1)[0]  # '>' and the id, or '>' alone when whitespace follows it
    if len(token) == 1:
        raise FastaError("empty record id: the header must have text right after '>'",
                         record_index=index, line=lineno)
    return token[1:].decode("utf-8")


def _raise_not_text(line: bytes, count: int, rec_id: str, index: int, lineno: int) -> NoReturn:
    """Nucleotide text with a byte that is not printable ASCII: name it and its position."""
    raise_first_bad_byte(line, count, lambda byte: 0x21 <= byte < 0x7F,
                         partial(FastaError, record_id=rec_id, record_index=index, line=lineno),
                         index, lineno)


def _raise_inner_star(position: int, rec_id: str, index: int, lineno: int) -> NoReturn:
    raise FastaError(f"'*' at position {position} is not at the end of the sequence "
                     "(only one terminal stop '*' is allowed)",
                     record_id=rec_id, record_index=index, line=lineno)


def _strip_terminal_star(line: bytes, residues: bytes, count: int, rec_id: str, index: int,
                         lineno: int) -> bytes:
    """Slow path for a line with a byte outside the alphabet.

    If the only such byte is a '*' at the end of the line, return ``residues`` without
    it: a stop that may end the record (the caller checks that no residue follows).
    Otherwise raise, naming the first offending character and its 1-based position in
    the record (``count`` residues precede this line).
    """
    if residues.endswith(b"*") and not residues[:-1].translate(None, _ALLOWED):
        return residues[:-1]
    error = partial(FastaError, record_id=rec_id, record_index=index, line=lineno)

    def refuse(char: str, position: int) -> None:
        if char == "*":
            _raise_inner_star(position, rec_id, index, lineno)
        hint = " (alignment gap; remove gaps before embedding)" if char in "-." else ""
        raise error(f"invalid residue {char!r} at position {position}{hint}")
    raise_first_bad_byte(line, count, lambda byte: bool(_VALID[byte]), error, index, lineno,
                         refuse)
