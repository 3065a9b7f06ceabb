"""Where a new job's input is indexed: in worker processes, or in a thread of the daemon.

Indexing (read and check every record, find repeats, for nucleotide input translate) is
per-record Python and holds the GIL. Files indexed in threads take turns on one core,
and the event loop waits behind them too: four files dropped together all started their
first batch after the four were indexed. In processes (``[jobs] index_processes``) they
index side by side, and the loop keeps feeding the workers meanwhile.

A process returns the built source and its repeats (pickled: about 60 bytes a row); the
daemon then saves them durably as before. A process that dies (the kernel's OOM killer
on a giant file, say) breaks the pool: it is replaced and the file tried once more in a
fresh process; a second death fails the job (:class:`IndexProcessDied`). Processes are
spawned, never forked (the daemon has threads), and each exits when the daemon does,
even after a SIGKILL (it watches its parent).

Example::

    indexer = Indexer(processes=4, log_format="json", log_level="info")
    indexer.start(ProteinSource)          # one process spawned ahead of the first file
    source, repeats = await indexer.build(ProteinSource, path, directory, settings, 1022)
    indexer.close()
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import structlog

from vnpd.lifeline import exit_with
from vnpd.inputs.duplicates import DuplicatePlan, plan_duplicates, plan_from_keys
from vnpd.inputs.source import SequenceSource, SourceSettings

log = structlog.get_logger()


class IndexProcessDied(RuntimeError):
    """The process indexing a file died twice (killed, or out of memory)."""


def build_source(source_type: type[SequenceSource], path: Path, directory: Path,
                 settings: SourceSettings, truncation: int | None
                 ) -> tuple[SequenceSource, DuplicatePlan]:
    """Validate and index ``path`` into ``directory`` and find its repeated rows
    (``truncation``: keys cover the first that many residues; None: all of them).

    Raises ``FastaError`` for bad input and OSError when the file cannot be read.
    """
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

    async def build(self, source_type: type[SequenceSource], path: Path, directory: Path,
                    settings: SourceSettings, truncation: int | None
                    ) -> tuple[SequenceSource, DuplicatePlan]:
        """:func:`build_source`, off the event loop; raises what it raises, or
        :class:`IndexProcessDied`."""
        args = (source_type, path, directory, settings, truncation)
        if self.processes == 0:
            return await asyncio.to_thread(build_source, *args)
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

    def start(self, source_type: type[SequenceSource]) -> Future[str] | None:
        """Spawn one process now and import ``source_type``'s modules there, so that the
        first file does not wait for them; the others are spawned when files arrive
        together. Returns the warm-up's future (None in thread mode)."""
        if self.processes == 0:
            return None
        return self._require_pool().submit(_warm_up, source_type)

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


def _warm_up(source_type: type[SequenceSource]) -> str:
    """Nothing: receiving ``source_type`` imported its input kind's modules."""
    return source_type.kind


def _start_process(parent: int, log_format: str, log_level: str) -> None:
    """In each index process: log as the daemon does (to its stdout), and exit when the
    daemon is gone, even if it was SIGKILLed (:func:`vnpd.lifeline.exit_with`)."""
    from vnpd.log import configure_logging

    configure_logging(log_format, log_level, stream=sys.stdout, index_process=os.getpid())
    exit_with(parent)
