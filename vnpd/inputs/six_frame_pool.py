"""six_frame translation of a whole file on several processes, with the rows in input order.

six_frame is pure Python (one GIL), so threads would not help; it runs in a
``ProcessPoolExecutor`` of the ``forkserver`` context (the daemon has threads: it never
forks itself; the server, started once, forks the processes with this module loaded).
The caller's thread reads and checks the records, as it does with one worker, and cuts
each record into pieces of whole chunks (``chunk_spans``: a piece is a run of consecutive
chunks, the text from its first chunk's start to its last chunk's end, and the record
position of that start), at most ``BATCH_BASES`` bases each, so no process gets a whole
long record: a 100 Mbp contig is held once, by the caller, and only its pieces in flight
are copied. Pieces go to the processes in batches of about ``BATCH_BASES`` bases, at most
``2 * workers`` batches in flight. A process translates a batch with six_frame's own code
(:func:`vnpd.inputs.nucleotide.chunk_proteins`) and sends back a :class:`TranslatedBlock`,
the proteins already written as FASTA text with their per-row numbers, so the caller does
no Python work per protein: it writes the blocks, in input order, as they come.

Until the first process is up, and while every process has two batches, the calling
thread translates the next batches itself. A file under ``POOL_MIN_BYTES`` (2 MB) is
translated in the calling thread alone: no processes are started for it. The rows are
those of :func:`vnpd.inputs.nucleotide.six_frame_proteins` run on every record, whatever
``workers`` is.

Example::

    for block in translate_in_processes(checked_records, 300, workers=8, file_bytes=size):
        writer.add_block(block.text, block.line_bytes, block.lengths)   # IndexingWriter
        block.source_index, block.strand, block.nt_start, block.nt_end   # one a row
"""

from __future__ import annotations

import multiprocessing
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import structlog

from vnpd.inputs.fasta import FastaRecord
from vnpd.inputs.nucleotide import chunk_proteins, chunk_spans

log = structlog.get_logger()

BATCH_BASES = 300_000
"""Bases per batch sent to a process (pieces of long records are cut to this size): about
25 ms of translation on one core (docs/BENCHMARKS.md), far above the pool's cost per batch
(pickling 300 kB out and ~80 kB of proteins back), and small enough that a file of a few
Mbp keeps every process busy."""

BATCH_PIECES = 2_000
"""Pieces (records, for short ones) per batch at most, whatever their length."""

POOL_MIN_BYTES = 2_000_000
"""A smaller file is translated in the calling thread: about 0.25 s of work on one core,
as long as the forkserver's first start, and too little to share out."""

AHEAD_BATCHES = 16
"""Batches the calling thread translates itself, at most, while the processes hold the
oldest one (~1 MB of proteins text): it covers the processes' start."""


@dataclass(frozen=True)
class Piece:
    """Consecutive chunks of one record: ``text`` is the record from ``start`` to the end of
    its last chunk, ``spans`` the chunks' (start, end) on the record, the first of them
    chunk ``first_chunk`` (from 1)."""

    record_index: int
    record_id: str
    first_chunk: int
    start: int
    text: str
    spans: list[tuple[int, int]]


@dataclass(frozen=True)
class TranslatedBlock:
    """The proteins of a batch of pieces, in order: ``text`` is their FASTA text (``>id``
    line, sequence line), and each array has one int64 (``strand``: int8) per protein:
    ``line_bytes`` (its bytes in ``text``), ``lengths`` (residues), ``source_index`` (the
    record's index in the file), ``strand``, ``nt_start`` and ``nt_end`` (on the record)."""

    text: bytes
    line_bytes: np.ndarray
    lengths: np.ndarray
    source_index: np.ndarray
    strand: np.ndarray
    nt_start: np.ndarray
    nt_end: np.ndarray


def translate_pieces(pieces: list[Piece]) -> TranslatedBlock:
    """The six_frame proteins of ``pieces``, as one block (run in a pool process).

    Example: ``translate_pieces([Piece(0, "c", 1, 0, "ATGGCC", [(0, 6)])]).text`` is
    ``b">c_chunk_1F1\\nMA\\n..."``.
    """
    lines: list[str] = []
    columns: dict[str, list[int]] = {name: [] for name in
                                     ("lengths", "source_index", "strand", "nt_start", "nt_end")}
    for piece in pieces:
        text = piece.text.upper()
        for number, (start, end) in enumerate(piece.spans, start=piece.first_chunk):
            chunk = text[start - piece.start:end - piece.start]
            for protein in chunk_proteins(piece.record_id, number, chunk, start):
                lines.append(f">{protein.id}\n{protein.sequence}\n")
                columns["lengths"].append(len(protein.sequence))
                columns["source_index"].append(piece.record_index)
                columns["strand"].append(protein.strand)
                columns["nt_start"].append(protein.nt_start)
                columns["nt_end"].append(protein.nt_end)
    data = "".join(lines).encode()
    line_bytes = [len(line) for line in lines]
    if sum(line_bytes) != len(data):  # ids with non-ASCII letters: bytes, not characters
        line_bytes = [len(line.encode()) for line in lines]
    arrays = {name: np.array(values, dtype=np.int8 if name == "strand" else np.int64)
              for name, values in columns.items()}
    return TranslatedBlock(data, np.array(line_bytes, dtype=np.int64), **arrays)


def translate_in_processes(records: Iterable[FastaRecord], chunk_length: int, workers: int,
                           file_bytes: int) -> Iterator[TranslatedBlock]:
    """Yield the six_frame proteins of ``records`` as blocks, in the order of ``records``.

    ``workers`` (≥ 2) processes translate batches of ``BATCH_BASES`` bases, and so does the
    calling thread, which reads ``records``, until the first process is up (the forkserver
    starts once per process, ~0.3 s) and whenever every process has two batches: it runs
    at most ``AHEAD_BATCHES`` batches ahead of the oldest one not back. A file of fewer
    than ``POOL_MIN_BYTES`` (``file_bytes``, its size) is translated in the calling thread
    alone. An error of ``records`` (the
    reader's, the checks') is raised at once: the batches in flight are cancelled or
    waited for, and the pool shut down, as when the generator is closed early. A process
    that dies raises ``BrokenProcessPool``.

    Raises ValueError if ``workers < 2`` or ``chunk_length < 1``.
    """
    if workers < 2:
        raise ValueError(f"workers must be at least 2 for a pool, not {workers}")
    if chunk_length < 1:
        raise ValueError(f"chunk_length must be at least 1, not {chunk_length}")
    batches = _batches(records, chunk_length, BATCH_BASES)
    if file_bytes < POOL_MIN_BYTES:
        yield from map(translate_pieces, batches)
        return
    pending: deque[tuple[Future[TranslatedBlock], bool]] = deque()  # (block, from the pool)
    in_pool = 0
    pool = ProcessPoolExecutor(workers, mp_context=_forkserver())
    started = _start_in_background(pool)
    try:
        for batch in batches:
            while pending and pending[0][0].done():
                block, pooled = pending.popleft()
                in_pool -= pooled
                yield block.result()
            if not started.is_set() or \
                    (in_pool >= 2 * workers and len(pending) < 2 * workers + AHEAD_BATCHES):
                pending.append((_resolved(translate_pieces(batch)), False))  # this thread helps
                continue
            if in_pool >= 2 * workers:  # the oldest is the pool's: wait for it
                block, pooled = pending.popleft()
                in_pool -= pooled
                yield block.result()
            pending.append((pool.submit(translate_pieces, batch), True))
            in_pool += 1
        while pending:
            yield pending.popleft()[0].result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def start_forkserver() -> None:
    """Start the forkserver the pools fork from, if it is not running (~0.3 s, once per
    process; the first pool otherwise starts it). Benchmarks call it before the clock.

    Example: ``start_forkserver()`` then ``translate_in_processes(...)``.
    """
    with ProcessPoolExecutor(1, mp_context=_forkserver()) as pool:
        pool.submit(_started).result()  # the server answers once it has loaded this module


def _start_in_background(pool: ProcessPoolExecutor) -> threading.Event:
    """Start ``pool``'s first process from a thread, and set the event returned when it
    runs: the first process of a daemon starts the forkserver (~0.3 s, as a spawned child
    imports this module), a submit waits for it, and this thread has batches to translate
    meanwhile. Errors are left to the submits that follow."""
    started = threading.Event()

    def start() -> None:
        try:
            pool.submit(_started).result()
        except Exception as exc:  # noqa: BLE001 -- the real submits raise it, in order
            log.debug("six_frame_pool_start_failed", error=repr(exc))
        finally:
            started.set()

    threading.Thread(target=start, name="vnpd-six-frame-start", daemon=True).start()
    return started


def _started() -> None:
    """Run in a pool process: nothing, to show it is up."""


def _forkserver() -> multiprocessing.context.ForkServerContext:
    """The ``forkserver`` context, its server loading this module: the server is started
    once per process (by the first pool), single-threaded, so its forks are safe where a
    fork of the daemon, which has threads, is not; and they start in milliseconds with
    numpy and the codon tables loaded, where each ``spawn`` child imports them (~0.3 s)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__])  # no effect once it runs
    return context  # type: ignore[return-value]


def _resolved(block: TranslatedBlock) -> Future[TranslatedBlock]:
    done: Future[TranslatedBlock] = Future()
    done.set_result(block)
    return done


def _batches(records: Iterable[FastaRecord], chunk_length: int,
             batch_bases: int) -> Iterator[list[Piece]]:
    """Consecutive pieces of ``records``, about ``batch_bases`` bases and at most
    ``BATCH_PIECES`` pieces a batch."""
    batch: list[Piece] = []
    bases = 0
    for record in records:
        for piece in cut_pieces(record, chunk_length, batch_bases):
            batch.append(piece)
            bases += len(piece.text)
            if bases >= batch_bases or len(batch) >= BATCH_PIECES:
                yield batch
                batch, bases = [], 0
    if batch:
        yield batch


def cut_pieces(record: FastaRecord, chunk_length: int, max_bases: int) -> Iterator[Piece]:
    """``record`` as consecutive pieces of whole chunks (``chunk_spans``), each at most
    ``max_bases`` bases, or one chunk if a chunk is longer; one piece's text at a time.

    Example: ``[p.spans for p in cut_pieces(record_of_700_bp, 300, 450)]`` is
    ``[[(0, 300)], [(233, 533)], [(466, 700)]]``.
    """
    spans: list[tuple[int, int]] = []
    first = 1
    sequence = record.sequence
    for number, (start, end) in enumerate(chunk_spans(len(sequence), chunk_length), start=1):
        if spans and end - spans[0][0] > max_bases:
            yield Piece(record.index, record.id, first, spans[0][0],
                        sequence[spans[0][0]:spans[-1][1]], spans)
            spans, first = [], number
        spans.append((start, end))
    if spans:
        yield Piece(record.index, record.id, first, spans[0][0],
                    sequence[spans[0][0]:spans[-1][1]], spans)
