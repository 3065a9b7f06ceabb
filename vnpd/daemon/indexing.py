"""Where a new job's input is indexed: in worker processes, or in a thread of the daemon.

Indexing (read and check every record, find repeats, for nucleotide input translate) is
per-record Python and holds the GIL. Files indexed in threads take turns on one core,
and the event loop waits behind them too: four files dropped together all started their
first batch after the four were indexed. In processes (``[jobs] index_processes``) they
index side by side, and the loop keeps feeding the workers meanwhile.

Files are indexed in the order they were claimed, by CPU priority: a build that starts
while others are running runs its threads at a lower priority (``nice``, :data:`NICE_STEP`
per build ahead of it). A build is work-conserving either way, but four genes files
dropped together no longer share the cores evenly and all finish at the end: the first
gets most of them, so its job (and the devices) start after its own indexing, not after
all four.

Every process is spawned at start and loads what its input kind's builds need
(:meth:`SequenceSource.prepare`: pyrodigal-gv's models for genes, about 0.5-1 s and
120 MB each), so files dropped together do not wait for interpreters to start.

A process returns the built source and its repeats (pickled: about 60 bytes a row); the
daemon then saves them durably as before. A process that dies (the kernel's OOM killer
on a giant file, say) breaks the pool: it is replaced and the file tried once more in a
fresh process; a second death fails the job (:class:`IndexProcessDied`). Processes are
spawned, never forked (the daemon has threads), and each exits when the daemon does,
even after a SIGKILL (it watches its parent).

Example::

    indexer = Indexer(processes=4, log_format="json", log_level="info")
    indexer.start(ProteinSource, settings)  # the processes spawned ahead of the first file
    source, repeats = await indexer.build(ProteinSource, path, directory, settings, 1022)
    indexer.close()
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TypeVar

import structlog

from vnpd.lifeline import exit_with
from vnpd.inputs.duplicates import DuplicatePlan, plan_duplicates, plan_from_keys
from vnpd.inputs.source import SequenceSource, SourceSettings

log = structlog.get_logger()
T = TypeVar("T")

NICE_STEP = 10
"""Niceness added per build already running when a build starts (at most 19, Linux's
lowest priority). CFS weighs nice 0 against 10 about 9 to 1: the oldest build gets ~90%
of the cores the builds contend for, and a later one still gets what it leaves idle."""


class IndexProcessDied(RuntimeError):
    """The process indexing a file died twice (killed, or out of memory)."""


def build_source(source_type: type[SequenceSource], path: Path, directory: Path,
                 settings: SourceSettings, truncation: int | None, nice: int = 0
                 ) -> tuple[SequenceSource, DuplicatePlan]:
    """Validate and index ``path`` into ``directory`` and find its repeated rows
    (``truncation``: keys cover the first that many residues; None: all of them), on a
    thread ``nice`` steps below the caller's CPU priority (0: on the calling thread).

    Raises ``FastaError`` for bad input and OSError when the file cannot be read.
    """
    args = (source_type, path, directory, settings, truncation)
    if nice <= 0:
        return _build_source(*args)
    with ThreadPoolExecutor(1, thread_name_prefix="vnpd-index") as thread:
        return thread.submit(run_niced, nice, _build_source, *args).result()


def run_niced(nice: int, function: Callable[..., T], *args: object) -> T:
    """``function(*args)`` with the calling thread's niceness raised by ``nice`` (Linux
    keeps niceness per thread, and a thread or process starts with its creator's, so the
    gene-calling threads and six_frame processes of the build inherit it). Call it on a
    thread of its own: an unprivileged thread cannot lower its niceness again."""
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread,
                       min(19, os.getpriority(os.PRIO_PROCESS, thread) + nice))
    except (OSError, AttributeError) as exc:  # not Linux, or not allowed: same work, no order
        log.warning("index_priority_unset", nice=nice, error=str(exc))
    return function(*args)


def _build_source(source_type: type[SequenceSource], path: Path, directory: Path,
                  settings: SourceSettings, truncation: int | None
                  ) -> tuple[SequenceSource, DuplicatePlan]:
    delay = float(os.environ.get("VNPD_TEST_INDEX_DELAY_S") or 0)  # tests only: vnpd/faults.py
    if delay > 0:
        log.warning("test_index_delay", file=str(path), seconds=delay)
        time.sleep(delay)
    source, keys = source_type.build_keyed(path, directory, settings, truncation)
    if keys is None:
        return source, plan_duplicates(source, truncation)
    return source, plan_from_keys(keys)


class Indexer:
    """Runs :func:`build_source` in ``processes`` worker processes, or in a thread (0)."""

    def __init__(self, processes: int, log_format: str = "auto", log_level: str = "info") -> None:
        self.processes = processes
        self._logging = (log_format, log_level)
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False
        self._building = 0  # builds submitted and not finished: the next one's rank

    async def build(self, source_type: type[SequenceSource], path: Path, directory: Path,
                    settings: SourceSettings, truncation: int | None
                    ) -> tuple[SequenceSource, DuplicatePlan]:
        """:func:`build_source`, off the event loop, :data:`NICE_STEP` lower in CPU priority
        per build still running; raises what it raises, or :class:`IndexProcessDied`."""
        nice = min(19, NICE_STEP * self._building)
        self._building += 1
        try:
            return await self._build((source_type, path, directory, settings, truncation, nice))
        finally:
            self._building -= 1

    async def _build(self, args: tuple) -> tuple[SequenceSource, DuplicatePlan]:
        if self.processes == 0:
            return await asyncio.to_thread(build_source, *args)
        path = args[1]
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            pool = self._require_pool()
            try:
                return await loop.run_in_executor(pool, build_source, *args)
            except BrokenProcessPool:
                if self._closed:
                    raise RuntimeError("the indexer was closed while indexing") from None
                log.error("index_process_died", file=str(path), attempt=attempt)
                if self._pool is pool:
                    self._pool = None
                    pool.shutdown(wait=False, cancel_futures=True)
        raise IndexProcessDied("the process indexing the file died twice (out of memory?)")

    async def peek(self, source_type: type[SequenceSource], path: Path,
                   settings: SourceSettings, max_tokens: int, truncation: int
                   ) -> list[tuple[str, str]]:
        """``source_type.peek`` off the event loop: in a process (gene calling would load
        pyrodigal-gv into the daemon), or in a thread. Advisory: [] if it fails."""
        args = (path, settings, max_tokens, truncation)
        try:
            if self.processes == 0:
                return await asyncio.to_thread(source_type.peek, *args)
            return await asyncio.get_running_loop().run_in_executor(
                self._require_pool(), source_type.peek, *args)
        except (BrokenProcessPool, RuntimeError) as exc:  # the build reports a dead process
            log.warning("peek_failed", file=str(path), error=str(exc))
            return []

    def start(self, source_type: type[SequenceSource], settings: SourceSettings
              ) -> list[Future[tuple[str, int]]]:
        """Spawn every process now, and load there what ``source_type``'s builds need
        (:meth:`SequenceSource.prepare`), so that files dropped together do not wait for
        them. Returns the warm-ups' futures, each (kind, process id); [] in thread mode."""
        if self.processes == 0:
            return []
        pool = self._require_pool()
        # Each submit finds no idle process (the ones before are still starting): one each.
        return [pool.submit(_warm_up, source_type, settings) for _ in range(self.processes)]

    def _require_pool(self) -> ProcessPoolExecutor:
        if self._closed:
            raise RuntimeError("the indexer is closed")
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_process, initargs=(os.getpid(), *self._logging))
        return self._pool

    def close(self) -> None:
        """Stop the processes now; an index in progress is abandoned (its job is
        indexed again at the next start, as after a crash)."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list((getattr(pool, "_processes", None) or {}).values())  # no public handle
        for process in processes:
            process.kill()
        for process in processes:
            process.join(5)
        pool.shutdown(wait=True, cancel_futures=True)


def _warm_up(source_type: type[SequenceSource], settings: SourceSettings) -> tuple[str, int]:
    """Receiving ``source_type`` imported its input kind's modules; load the rest."""
    source_type.prepare(settings)
    return source_type.kind, os.getpid()


def _start_process(parent: int, log_format: str, log_level: str) -> None:
    """In each index process: log as the daemon does (to its stdout), and exit when the
    daemon is gone, even if it was SIGKILLed (:func:`vnpd.lifeline.exit_with`)."""
    from vnpd.log import configure_logging

    configure_logging(log_format, log_level, stream=sys.stdout, index_process=os.getpid())
    exit_with(parent)
