"""A window of an indexed FASTA file's records as one array of residue letters.

The daemon reads a job's input in windows of thousands of records and cuts its batches
from them. Read as :class:`~vnpd.inputs.fasta.FastaRecord` objects, a window costs a
Python step, two decodes and an object per record, and tokenising joins the residues
back into bytes: together about 7 us a record, a fifth of the parent's loop at 25,000
ORF-length records/s. :func:`parse_window` reads the same window with whole-array
numpy and bytes operations: the residues of every record upper-cased and concatenated,
where each starts, and the ids (a bytes slice per record is all the Python a record
costs). Batches are then cut from it by :func:`vnpd.compute.tokenizer.encode_spans`.

It checks what the records' fast path checks (:func:`vnpd.inputs.index.iter_indexed`):
each record is a header line, then residue lines, with its indexed length, and only
residue letters (a final ``*`` dropped). A window that reads otherwise gives None, and
the caller reads its records as objects: the validating parser then says what changed.

Example::

    text = read_window_text(path, index, 0, 4096)   # vnpd.inputs.index; None: read records
    text.ids[5], text.sequence(5)                    # record 5: ("seq5", "MKV...")
"""

from __future__ import annotations

from dataclasses import dataclass
from string import ascii_lowercase, ascii_uppercase

import numpy as np

from vnpd.compute.tokenizer import RESIDUE_LETTERS
from vnpd.inputs.fasta_errors import WHITESPACE

_IS_SPACE = np.zeros(256, dtype=bool)
_IS_SPACE[list(WHITESPACE)] = True
_OTHER_SPACES = bytes(c for c in WHITESPACE if c != ord("\n"))
_IS_OTHER_SPACE = np.zeros(256, dtype=bool)
_IS_OTHER_SPACE[list(_OTHER_SPACES)] = True
_RESIDUES = RESIDUE_LETTERS.encode("ascii")  # the reader's letters (fasta.ALLOWED_RESIDUES)
_UPPER = bytes.maketrans(ascii_lowercase.encode(), ascii_uppercase.encode())
_STAR, _NEWLINE, _HEADER = ord("*"), ord("\n"), ord(">")


@dataclass(frozen=True)
class WindowText:
    """Records ``start..start + len(ids) - 1`` of an indexed file."""

    start: int
    letters: np.ndarray  # uint8: every record's residues, upper case, one after another
    offsets: np.ndarray  # (n + 1,) int64: record start + i is letters[offsets[i]:offsets[i + 1]]
    ids: list[str]

    def sequence(self, i: int) -> str:
        """The residues of the window's record ``i`` (position ``start + i``)."""
        return self.letters[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("ascii")


def parse_window(data: bytes, bounds: list[int], lengths: np.ndarray, start: int
                 ) -> WindowText | None:
    """The records whose bytes are ``data``, record i from ``bounds[i]`` to
    ``bounds[i + 1]``, as one :class:`WindowText` (the first at position ``start``); None
    unless every record reads plainly with its indexed length ``lengths[i]`` (then read
    them with the parser). See :func:`vnpd.inputs.index.read_window_text`."""
    text = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(text == _NEWLINE)
    headers = header_ids(data, bounds, newlines)
    if headers is None:
        return None
    ids, header_ends = headers
    ends = np.asarray(bounds[1:], dtype=np.int64)
    nth = np.searchsorted(newlines, header_ends)
    # Each record's residues: after its header line, up to the next record, less the
    # whitespace in between (its newlines, and any other whitespace: rare, found apart).
    first = header_ends + 1
    counts = ends - first - (np.searchsorted(newlines, ends) - nth - 1)
    if len(data.translate(None, _OTHER_SPACES)) != len(data):
        others = np.flatnonzero(_IS_OTHER_SPACE[text])
        counts -= np.searchsorted(others, ends) - np.searchsorted(others, first)
    letters = np.frombuffer(b"".join([data[a:b] for a, b in zip(first.tolist(), bounds[1:])])
                            .translate(_UPPER, WHITESPACE), dtype=np.uint8)
    offsets = np.concatenate(([0], np.cumsum(counts)))
    starred = (counts > 0) & (letters[np.maximum(offsets[1:] - 1, 0)] == _STAR)
    if starred.any():  # a final '*' (a stop) is dropped, as the parser drops it
        drop = np.ones(letters.size, dtype=bool)
        drop[offsets[1:][starred] - 1] = False
        letters, counts = letters[drop], counts - starred
        offsets = np.concatenate(([0], np.cumsum(counts)))
    if letters.tobytes().translate(None, _RESIDUES) \
            or not np.array_equal(counts, lengths):
        return None
    return WindowText(start, letters, offsets, ids)


def header_ids(data: bytes, bounds: list[int], newlines: np.ndarray | None = None
               ) -> tuple[list[str], np.ndarray] | None:
    """The id (first word of the header) of each record of ``data`` (record i from
    ``bounds[i]`` to ``bounds[i + 1]``) and where its header line ends; None unless every
    header reads plainly: '>', the id right after it, a newline inside the record.
    ``newlines``: the positions of ``data``'s newlines, if the caller has them."""
    if len(bounds) < 2:
        return None
    text = np.frombuffer(data, dtype=np.uint8)
    begins, ends = np.asarray(bounds[:-1], dtype=np.int64), np.asarray(bounds[1:], dtype=np.int64)
    if newlines is None:
        newlines = np.flatnonzero(text == _NEWLINE)
    nth = np.searchsorted(newlines, begins)
    if nth[-1] >= newlines.size:
        return None
    header_ends = newlines[nth]
    if (header_ends >= ends).any() or (text[begins] != _HEADER).any() \
            or (header_ends == begins + 1).any() or _IS_SPACE[text[begins + 1]].any():
        return None  # a header without its newline, or no id right after the '>'
    headers = b"\n".join([data[a + 1:e] for a, e in zip(bounds, header_ends.tolist())])
    ids = headers.decode("utf-8").split("\n")
    if len(headers.translate(None, _OTHER_SPACES)) != len(headers):  # descriptions
        ids = [line.split(None, 1)[0] for line in ids]
    return ids, header_ends
