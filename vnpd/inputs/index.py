"""A validated, on-disk index of one FASTA file: record offsets and residue lengths.

Indexing is one streaming pass (every validation rule of :mod:`vnpd.inputs.fasta`, duplicate
ids included) that keeps 16 bytes per record; the arrays can be saved beside the job's
state and memory-mapped back, so a file of millions of records costs the parent
process almost no RAM. Sequences are re-read from the file in windows when needed.

The index is only true for the bytes it was built from. A writer that kept the file open
after it was claimed (``cp`` into the inbox, stalled past ``settle_s``) can still change
it, so the file's size, mtime and inode are recorded, and every re-read
(``iter_indexed``) checks them and never reads past the last indexed record.

A file that vnpd writes itself (the proteins of a nucleotide input) is indexed as it is
written, by :class:`IndexingWriter`, with no second read: the index is the one
``index_fasta`` would give.

Example::

    index = index_fasta(Path("in.fasta"))
    for start, records in iter_windows(Path("in.fasta"), index, 10_000):
        ...

    with IndexingWriter(Path("proteins.fasta")) as out:
        out.add("contig7_chunk_1F1", "MKP")
    out.index.num_records   # 1
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from types import TracebackType
from pathlib import Path
from typing import TypeVar

import numpy as np

from vnpd.inputs.fasta import (_UPPER, ALLOWED_RESIDUES, DuplicateIdChecker, FastaError,
                               FastaRecord, iter_fasta, iter_fasta_from)
from vnpd.inputs.fasta_errors import WHITESPACE as _WHITESPACE
from vnpd.inputs.window_text import WindowText, header_ids, parse_window

T = TypeVar("T")
_CHUNK = 65536
_FAST_WINDOW = 4096  # records per read of the fast path
_RESIDUES = "".join(sorted(ALLOWED_RESIDUES)).encode("ascii")
_WRITER_HINT = ("a writer still had it open: write files elsewhere (or under a .part name) "
                "and rename them into the inbox, see docs/INBOX.md")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte pieces: an input's ``source_sha256``."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileIndex:
    """Offsets (byte of each header's '>') and residue lengths, in file order, and the
    identity (size, mtime_ns, inode) of the file they describe."""

    num_records: int
    offsets: np.ndarray  # (N,) int64
    lengths: np.ndarray  # (N,) int64, residues before truncation
    sha256: str
    size: int | None = None  # None: an index saved before these were recorded
    mtime_ns: int | None = None
    inode: int | None = None

    def save(self, directory: Path) -> None:
        """Write ``offsets.npy``, ``lengths.npy`` and ``index.json`` into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "offsets.npy", self.offsets)
        np.save(directory / "lengths.npy", self.lengths)
        (directory / "index.json").write_text(json.dumps(
            {"num_records": self.num_records, "sha256": self.sha256, "size": self.size,
             "mtime_ns": self.mtime_ns, "inode": self.inode}))

    @classmethod
    def load(cls, directory: Path) -> "FileIndex":
        """Memory-map an index written by :meth:`save`."""
        meta = json.loads((directory / "index.json").read_text())
        return cls(meta["num_records"], np.load(directory / "offsets.npy", mmap_mode="r"),
                   np.load(directory / "lengths.npy", mmap_mode="r"), meta["sha256"],
                   meta.get("size"), meta.get("mtime_ns"), meta.get("inode"))

    def check_unchanged(self, path: Path) -> None:
        """Raise ``FastaError`` if ``path`` is no longer the file this index was built from.

        A write changes the size or the mtime; a file renamed over it changes the inode.
        """
        if self.size is None:
            return
        st = os.stat(path)
        if (st.st_size, st.st_mtime_ns, st.st_ino) != (self.size, self.mtime_ns, self.inode):
            raise FastaError(
                f"the file changed after it was indexed (size {self.size} -> {st.st_size} "
                f"bytes); {_WRITER_HINT}")


class IndexingWriter:
    """Writes a FASTA file, one ``>id`` line and one sequence line a record, and builds its
    :class:`FileIndex` (offsets, lengths, SHA-256, size, mtime, inode) from the bytes as
    they are written, so the file is never read back.

    The index equals ``index_fasta(path, kind="translated")`` of the file when the records
    are valid for that reader: ids unique, without whitespace, and sequences of upper-case
    residues without ``*`` (the proteins of a nucleotide input are). It is not checked
    here: the writer trusts its caller. A file with no records gets an index of none.
    Closing (the ``with`` block's end) sets :attr:`index`; an error inside the block
    closes the file and leaves no index.

    Example: ``with IndexingWriter(p) as out: out.add("a", "MK")`` then ``out.index.lengths``
    is ``[2]``.
    """

    FLUSH_BYTES = 1 << 20
    """Bytes gathered before one write and one hash update: small records cost no call each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.index: FileIndex | None = None
        self._file = open(path, "wb")
        self._digest = hashlib.sha256()
        self._offsets = array("q")
        self._lengths = array("q")
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._position = 0  # bytes written or pending

    def add(self, record_id: str, sequence: str) -> None:
        """Append one record."""
        text = f">{record_id}\n{sequence}\n".encode()
        self._offsets.append(self._position)
        self._lengths.append(len(sequence))
        self._append(text)

    def add_block(self, text: bytes, line_bytes: np.ndarray, lengths: np.ndarray) -> None:
        """Append records already formatted as ``add`` formats them: ``text`` is their
        concatenation, ``line_bytes`` the bytes of each record in it and ``lengths`` its
        residues (both int64, one per record). Raises ValueError if they disagree."""
        line_bytes = np.asarray(line_bytes, dtype=np.int64)
        if int(line_bytes.sum()) != len(text) or len(line_bytes) != len(lengths):
            raise ValueError(f"a block of {len(text)} bytes does not hold {len(lengths)} "
                             f"records of {int(line_bytes.sum())} bytes")
        starts = np.cumsum(line_bytes) - line_bytes + self._position
        self._offsets.frombytes(starts.astype(np.int64).tobytes())
        self._lengths.frombytes(np.asarray(lengths, dtype=np.int64).tobytes())
        self._append(text)

    def _append(self, text: bytes) -> None:
        self._pending.append(text)
        self._pending_bytes += len(text)
        self._position += len(text)
        if self._pending_bytes >= self.FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        data = b"".join(self._pending)
        self._file.write(data)
        self._digest.update(data)
        self._pending, self._pending_bytes = [], 0

    def close(self) -> FileIndex:
        """Write what is pending, close the file and return (and keep) its index."""
        if self.index is None:
            self._flush()
            self._file.close()
            st = os.stat(self.path)
            offsets = np.frombuffer(self._offsets, dtype=np.int64).copy()
            lengths = np.frombuffer(self._lengths, dtype=np.int64).copy()
            self.index = FileIndex(len(offsets), offsets, lengths, self._digest.hexdigest(),
                                   st.st_size, st.st_mtime_ns, st.st_ino)
        return self.index

    def __enter__(self) -> "IndexingWriter":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self._file.close()


def index_fasta(path: Path, *, kind: str = "protein",
                visit: Callable[[FastaRecord], None] | None = None) -> FileIndex:
    """Validate ``path`` completely and index it; ``kind`` as for
    :func:`vnpd.inputs.fasta.iter_fasta` (``protein`` or ``translated``). ``visit`` is
    called with every record in file order, in the same pass (to key the rows, say).

    Raises :class:`vnpd.inputs.fasta.FastaError` for invalid input, and also when the file
    changed while it was read (its size, mtime or inode differ from before): the index
    would describe bytes that are not there any more.
    """
    before = os.stat(path)
    checker = DuplicateIdChecker()
    offsets: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    off_buf = np.empty(_CHUNK, dtype=np.int64)
    len_buf = np.empty(_CHUNK, dtype=np.int64)
    fill = 0
    for record in iter_fasta(path, kind=kind):
        checker.add(record)
        if visit is not None:
            visit(record)
        off_buf[fill] = record.offset
        len_buf[fill] = len(record.sequence)
        fill += 1
        if fill == _CHUNK:
            offsets.append(off_buf.copy())
            lengths.append(len_buf.copy())
            fill = 0
    offsets.append(off_buf[:fill].copy())
    lengths.append(len_buf[:fill].copy())
    checker.finish(path)
    off, lens = np.concatenate(offsets), np.concatenate(lengths)
    index = FileIndex(int(off.shape[0]), off, lens, sha256_file(path), before.st_size,
                      before.st_mtime_ns, before.st_ino)
    try:
        index.check_unchanged(path)
    except FastaError:
        raise FastaError(f"the file changed while it was being indexed; {_WRITER_HINT}") \
            from None
    return index


def iter_indexed(path: Path, index: FileIndex, start: int = 0, *,
                 kind: str = "protein") -> Iterator[FastaRecord]:
    """Re-read records ``start..N-1`` of an indexed file, never one past the last indexed;
    ``kind`` is the one it was indexed with.

    Raises ``FastaError`` if the file changed since it was indexed (checked before
    reading), or if a record can no longer be read as it was.
    """
    if start >= index.num_records:
        return
    index.check_unchanged(path)
    if kind == "protein" and index.size is not None:
        # Windows read as bytes, each checked against the index; a window that does not
        # match (a comment line, say) is read by the validating parser below.
        start = yield from _read_fast(path, index, start, _read_window_fast)
        if start >= index.num_records:
            return
    last = index.num_records - 1
    try:
        for record in iter_fasta_from(path, int(index.offsets[start]), start, kind=kind):
            yield record
            if record.index == last:
                return
    except FastaError as exc:
        raise FastaError(f"the file changed after it was indexed ({exc}); {_WRITER_HINT}",
                         record_id=exc.record_id, record_index=exc.record_index) from None
    raise FastaError(f"the file changed after it was indexed: it ends before record "
                     f"#{index.num_records}; {_WRITER_HINT}")


def _read_window_fast(path: Path, index: FileIndex, start: int, stop: int
                      ) -> list[FastaRecord] | None:
    """Records ``start..stop-1`` of a validated, unchanged file, split at the indexed
    offsets with a few bytes operations each (the validating parser costs several times
    more a record). None unless every record reads plainly (a header, then residue
    lines) with its indexed length: the caller then uses the parser."""
    window = window_bytes(path, index, start, stop)
    if window is None:
        return None
    data, bounds = window
    lo = int(index.offsets[start])
    lengths = index.lengths[start:stop].tolist()
    records = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        newline = data.find(b"\n", a, b)
        if newline < 0 or data[a] != 62:  # '>'
            return None
        token = data[a + 1:newline].split(None, 1)
        body = data[newline + 1:b].translate(_UPPER, _WHITESPACE)
        if body.endswith(b"*"):
            body = body[:-1]
        if not token or data[a + 1] in _WHITESPACE or len(body) != lengths[i] \
                or body.translate(None, _RESIDUES):
            return None
        records.append(FastaRecord(start + i, token[0].decode("utf-8"), body.decode("ascii"),
                                   -1, lo + a))
    return records


def iter_indexed_ids(path: Path, index: FileIndex, *, kind: str = "protein") -> Iterator[str]:
    """The id of every indexed record, in order: ``record.id`` of :func:`iter_indexed`,
    read from the header lines alone (a partial file's ids need no residues: this is
    several times faster). A window whose headers do not read plainly is read by
    :func:`iter_indexed` from there on.

    Raises ``FastaError`` as :func:`iter_indexed` does.
    """
    if index.num_records == 0:
        return
    index.check_unchanged(path)
    start = (yield from _read_fast(path, index, 0, _read_ids_fast)) if index.size is not None \
        else 0
    if start < index.num_records:
        yield from (record.id for record in iter_indexed(path, index, start, kind=kind))


def _read_ids_fast(path: Path, index: FileIndex, start: int, stop: int) -> list[str] | None:
    """The ids of records ``start..stop-1``, as :func:`_read_window_fast` reads them;
    None unless every header reads plainly."""
    window = window_bytes(path, index, start, stop)
    headers = header_ids(*window) if window is not None else None
    return headers[0] if headers is not None else None


def _read_fast(path: Path, index: FileIndex, start: int,
               read: Callable[[Path, FileIndex, int, int], list[T] | None]
               ) -> Generator[T, None, int]:
    """What ``read`` gives for consecutive windows of records from ``start``, until a
    window it cannot read plainly (None) or the end; returns where it stopped."""
    while start < index.num_records:
        stop = min(start + _FAST_WINDOW, index.num_records)
        items = read(path, index, start, stop)
        if items is None:
            return start
        yield from items
        start = stop
    return start


def window_bytes(path: Path, index: FileIndex, start: int, stop: int
                  ) -> tuple[bytes, list[int]] | None:
    """The bytes of records ``start..stop-1`` and where each begins in them (and where
    the last ends); None if the file is shorter than the index says."""
    lo = int(index.offsets[start])
    hi = int(index.offsets[stop]) if stop < index.num_records else int(index.size or 0)
    with open(path, "rb") as fh:
        fh.seek(lo)
        data = fh.read(hi - lo)
    if len(data) != hi - lo:
        return None
    return data, (index.offsets[start:stop] - lo).tolist() + [hi - lo]


def read_window_text(path: Path, index: FileIndex, start: int, stop: int
                     ) -> WindowText | None:
    """Records ``start..stop-1`` of an indexed file as one array of residue letters
    (:mod:`vnpd.inputs.window_text`); None if they do not read plainly, or the index
    is of an earlier version (no size): read them with :func:`iter_indexed`.

    Raises ``FastaError`` if the file changed since it was indexed.
    """
    index.check_unchanged(path)
    window = window_bytes(path, index, start, stop) if index.size is not None else None
    if window is None:
        return None
    return parse_window(*window, index.lengths[start:stop], start)


def iter_windows(path: Path, index: FileIndex, window: int, start: int = 0
                 ) -> Iterator[tuple[int, list[FastaRecord]]]:
    """Records ``start..N`` in consecutive lists of at most ``window``: (first position, records).

    Raises ``FastaError`` as :func:`iter_indexed` does.
    """
    records: list[FastaRecord] = []
    first = start
    for record in iter_indexed(path, index, start):
        records.append(record)
        if len(records) == window:
            yield first, records
            first += len(records)
            records = []
    if records:
        yield first, records
