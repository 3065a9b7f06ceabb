"""six_frame translation of a whole file on several processes, with the rows in input order.

six_frame is pure Python (one GIL), so threads would not help; it runs in a
``ProcessPoolExecutor`` of the ``forkserver`` context (the daemon has threads: it never
forks itself; the server, started once, forks the processes with this module loaded).
The caller's thread reads and checks the records, as it does with one worker, and cuts
each record into pieces of whole chunks (:func:`vnpd.inputs.nucleotide.piece_batches`
over ``chunk_spans``: a piece is a run of consecutive
chunks, the text from its first chunk's start to its last chunk's end, and the record
position of that start), at most ``BATCH_BASES`` bases each, so no process gets a whole
long record: a 100 Mbp contig is held once, by the caller, and only its pieces in flight
are copied. Pieces go to the processes in batches of about ``BATCH_BASES`` bases, at most
``2 * workers`` batches in flight. A process translates a batch with six_frame's own code
(:func:`vnpd.inputs.nucleotide.translate_pieces`, over ``chunk_proteins``), passed in as
gene_calls is passed its gene caller, and sends back a ``TranslatedBlock``, the proteins
already written as FASTA text with their per-row numbers, so the caller does no Python
work per protein: it writes the blocks, in input order, as they come.

Until the first process is up, and while every process has two batches, the calling
thread translates the next batches itself. A file under ``POOL_MIN_BYTES`` (2 MB) is
translated in the calling thread alone: no processes are started for it. The rows are
those of :func:`vnpd.inputs.nucleotide.six_frame_proteins` run on every record, whatever
``workers`` is.

Example::

    batches = piece_batches(checked_records, 300, BATCH_BASES)    # vnpd.inputs.nucleotide
    for block in translate_in_processes(batches, translate_pieces, workers=8, file_bytes=size):
        writer.add_block(block.text, block.line_bytes, block.lengths)   # IndexingWriter
        block.source_index, block.strand, block.nt_start, block.nt_end   # one a row
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TYPE_CHECKING

import structlog

from vnpd.lifeline import exit_with

if TYPE_CHECKING:  # annotations only: the translation is passed in, as gene_calls' genes_of
    from vnpd.inputs.nucleotide import Piece, TranslatedBlock

Translate = Callable[["list[Piece]"], "TranslatedBlock"]
"""Translates one batch of pieces (:func:`vnpd.inputs.nucleotide.translate_pieces`); a
module-level function, so that a process can unpickle it."""

log = structlog.get_logger()

BATCH_BASES = 300_000
"""Bases per batch sent to a process (pieces of long records are cut to this size): about
25 ms of translation on one core (docs/BENCHMARKS.md), far above the pool's cost per batch
(pickling 300 kB out and ~80 kB of proteins back), and small enough that a file of a few
Mbp keeps every process busy."""

POOL_MIN_BYTES = 2_000_000
"""A smaller file is translated in the calling thread: about 0.25 s of work on one core,
as long as the forkserver's first start, and too little to share out."""

AHEAD_BATCHES = 16
"""Batches the calling thread translates itself, at most, while the processes hold the
oldest one (~1 MB of proteins text): it covers the processes' start."""


def translate_in_processes(batches: Iterable[list[Piece]], translate: Translate,
                           workers: int, file_bytes: int) -> Iterator[TranslatedBlock]:
    """Yield ``translate(batch)`` for each of ``batches`` (pieces of ``BATCH_BASES`` bases,
    :func:`vnpd.inputs.nucleotide.piece_batches`), in their order.

    ``workers`` (≥ 2) processes translate, and so does the calling thread, which reads
    ``batches`` (and the records under them), until the first process is up (the forkserver
    starts once per process, ~0.3 s) and whenever every process has two batches: it runs
    at most ``AHEAD_BATCHES`` batches ahead of the oldest one not back. A file of fewer
    than ``POOL_MIN_BYTES`` (``file_bytes``, its size) is translated in the calling thread
    alone. An error of ``batches`` (the
    reader's, the checks') is raised at once: the batches in flight are cancelled or
    waited for, and the pool shut down, as when the generator is closed early. A process
    that dies raises ``BrokenProcessPool``.

    Raises ValueError if ``workers < 2``.
    """
    if workers < 2:
        raise ValueError(f"workers must be at least 2 for a pool, not {workers}")
    if file_bytes < POOL_MIN_BYTES:
        yield from map(translate, batches)
        return
    pending: deque[tuple[Future[TranslatedBlock], bool]] = deque()  # (block, from the pool)
    in_pool = 0
    # exit_with: the processes end with this one, a SIGKILL included (the forkserver,
    # their parent, outlives it).
    pool = ProcessPoolExecutor(workers, mp_context=_forkserver(translate.__module__),
                               initializer=exit_with, initargs=(os.getpid(),))
    started = _start_in_background(pool)
    try:
        for batch in batches:
            while pending and pending[0][0].done():
                block, pooled = pending.popleft()
                in_pool -= pooled
                yield block.result()
            if not started.is_set() or \
                    (in_pool >= 2 * workers and len(pending) < 2 * workers + AHEAD_BATCHES):
                pending.append((_resolved(translate(batch)), False))  # this thread helps
                continue
            if in_pool >= 2 * workers:  # the oldest is the pool's: wait for it
                block, pooled = pending.popleft()
                in_pool -= pooled
                yield block.result()
            pending.append((pool.submit(translate, batch), True))
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
    with ProcessPoolExecutor(1, mp_context=_forkserver("vnpd.inputs.nucleotide")) as pool:
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


def _forkserver(translation: str) -> multiprocessing.context.ForkServerContext:
    """The ``forkserver`` context, its server loading this module and ``translation`` (a
    module name): the server is started
    once per process (by the first pool), single-threaded, so its forks are safe where a
    fork of the daemon, which has threads, is not; and they start in milliseconds with
    numpy and the codon tables loaded, where each ``spawn`` child imports them (~0.3 s)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__, translation])  # none once it runs
    return context  # type: ignore[return-value]


def _resolved(block: TranslatedBlock) -> Future[TranslatedBlock]:
    done: Future[TranslatedBlock] = Future()
    done.set_result(block)
    return done


