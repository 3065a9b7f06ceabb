"""How invalid FASTA is reported: :class:`FastaError`, which names the record and the line,
and the messages for bytes that do not belong in a FASTA file.

Example::

    raise FastaError("invalid residue 'J' at position 17", record_id="sp|P1",
                     record_index=3, line=17)
    # FastaError: line 17, record 'sp|P1' (#4): invalid residue 'J' at position 17
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NoReturn

_BINARY = "NUL byte: this is a binary file (or UTF-16/UTF-32 text without a byte-order mark), not FASTA"
WHITESPACE = b" \t\r\n\v\f"
OTHER_FORMATS = (("@", "this looks like FASTQ: vnpd embeds protein FASTA"),
                  ("LOCUS ", "this looks like GenBank: convert it to FASTA"),
                  ("ID   ", "this looks like EMBL or UniProt text: convert it to FASTA"))


class FastaError(ValueError):
    """Invalid FASTA input.

    ``str(e)`` is the full message, e.g.
    ``"line 17, record 'sp|P1' (#4): invalid residue 'J' at position 17"``; ``#4`` counts
    records from 1 for people, while ``record_index`` counts from 0 like ``FastaRecord.index``.
    ``reason`` is the message without the location. Fields that do not apply are None.
    """

    def __init__(self, reason: str, *, record_id: str | None = None,
                 record_index: int | None = None, line: int | None = None) -> None:
        self.reason = reason
        self.record_id = record_id
        self.record_index = record_index
        self.line = line
        where = []
        if line is not None:
            where.append(f"line {line}")
        number = f"#{record_index + 1}" if record_index is not None else ""
        if record_id is not None:
            where.append(f"record {record_id!r} ({number})" if number else f"record {record_id!r}")
        elif number:
            where.append(f"record {number}")
        super().__init__(f"{', '.join(where)}: {reason}" if where else reason)

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only fields would be lost by the default exception pickling.
        return (partial(FastaError, record_id=self.record_id, record_index=self.record_index,
                        line=self.line), (self.reason,))

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields: ``{"reason", "record", "record_index", "line"}``."""
        return {"reason": self.reason, "record": self.record_id,
                "record_index": self.record_index, "line": self.line}


def decode_utf8(data: bytes, what: str, index: int | None, lineno: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FastaError(
            f"{what} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {exc.start + 1}); "
            "the file looks like Latin-1 or another legacy encoding: save it as UTF-8 or ASCII",
            record_index=index, line=lineno) from None


def raise_not_fasta(line: bytes, lineno: int) -> NoReturn:
    """Text before the first header: say why the file is not FASTA, binary and encoding first."""
    if b"\0" in line:
        raise FastaError(_BINARY, line=lineno)
    text = decode_utf8(line, "text", None, lineno).strip()
    shown = text if len(text) <= 40 else text[:40] + "..."
    hint = next((f" ({what})" for prefix, what in OTHER_FORMATS if text.startswith(prefix)), "")
    raise FastaError(f"not FASTA: expected a '>' header line, found {shown!r}{hint}", line=lineno)


def raise_first_bad_byte(line: bytes, count: int, ok: Callable[[int], bool],
                         error: Callable[..., FastaError], index: int, lineno: int,
                         on_char: Callable[[str, int], None] | None = None) -> NoReturn:
    """Raise for the first byte of ``line`` that ``ok`` refuses, naming it and its 1-based
    position in the record (``count`` residues precede this line). NUL, non-ASCII and
    control bytes get their own messages; ``on_char`` may raise first for a printable one."""
    position = count
    for i, byte in enumerate(line):
        if byte in WHITESPACE:
            continue
        position += 1
        if ok(byte):
            continue
        if byte == 0:
            raise error(_BINARY)
        if byte >= 0x80:
            text = line[i:i + 4].decode("utf-8", errors="replace")
            if text[0] == "\ufffd":
                decode_utf8(line, "sequence", index, lineno)  # raises, naming the byte
            raise error(f"non-ASCII character {text[0]!r} (U+{ord(text[0]):04X}) at position "
                        f"{position}; sequences must be ASCII")
        if on_char is not None and 0x21 <= byte < 0x7F:
            on_char(chr(byte), position)
        raise error(f"control character 0x{byte:02x} at position {position}")
    raise AssertionError("a line with a disallowed byte has an offending character")
