"""The embedding cache's writer: a process of its own that stores the rows the daemon
computes, so that SQLite's per-entry work never takes the daemon's GIL.

In a thread of the daemon, the writer cost the parent's event loop a third of its rate
at dim 2560 (16 cores: 28,058 seq/s without the cache, 19,058 with it): two SQLite
statements per row, each releasing and taking back the GIL, and the Python between them.
In a process, the parent's part is one frame per batch (:mod:`vnpd.workers.wire`: the
arrays' bytes go out of band, the GIL released while they are written), sent by a thread.

The parent's end, :class:`CacheWriter`, keeps a bounded queue in front of that thread:
rows that do not fit are not cached (the cache is an optimisation, never a place where a
result must be). The writer answers each batch with its :class:`CacheStats`, which a
second thread keeps for ``stats()``. Spawned, never forked (the daemon has threads), it
ends with the daemon: when its pipe closes, and even after a SIGKILL
(:func:`vnpd.lifeline.exit_with`); a transaction cut off by that is rolled back by
SQLite. A writer that dies is logged (``cache_writer_died``); rows are then not stored,
and lookups go on.

Example::

    writer = CacheWriter.spawn(state / "cache", "json", "info")   # while the model loads
    writer.open(max_bytes=50 << 30, namespace=ns)                 # waits until it is open
    writer.submit(keys, rows)       # False: the queue was full, not stored
    writer.stats()                  # CacheStats after its last batch
    writer.close()
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import shutil
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import structlog

from vnpd.cache.store import CacheStats, EmbeddingCache
from vnpd.lifeline import exit_with
from vnpd.workers.wire import FrameError, recv_message, send_message, widen

log = structlog.get_logger()

ROW = "mean"             # the name of the pooled row in a cache entry
QUEUE_BATCHES = 16       # batches of rows waiting to be sent: bounded memory
RESERVE_FRACTION = 0.05  # the cache never writes into the last 5% of its filesystem...
RESERVE_MAX = 1 << 30    # ...or its last GiB, whichever is less: outputs need it more
OPEN_TIMEOUT_S = 300.0   # opening checks the whole file (quick_check): a large one is slow
CLOSE_TIMEOUT_S = 60.0   # the queue's rows are written before the writer exits


@dataclass(frozen=True)
class OpenStore:
    """Parent -> writer: open the store for this budget and namespace."""

    max_bytes: int
    namespace: str


@dataclass(frozen=True)
class StoreRows:
    """Parent -> writer: store ``rows[i]`` under ``keys[i]`` ((n, 32) uint8)."""

    keys: np.ndarray
    rows: np.ndarray


@dataclass(frozen=True)
class OpenFailed:
    """Writer -> parent: the store could not be opened."""

    reason: str


class CacheWriter:
    """The daemon's end of the writer process; see the module doc."""

    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Connection) -> None:
        self._process, self._conn = process, conn
        self._queue: queue.Queue[StoreRows | None] = queue.Queue(QUEUE_BATCHES)
        self._stats: CacheStats | None = None
        self._failed: str | None = None
        self._closing = False
        self._sender: threading.Thread | None = None
        self._receiver: threading.Thread | None = None

    @classmethod
    def spawn(cls, directory: Path, log_format: str = "auto", log_level: str = "info"
              ) -> CacheWriter:
        """Start the process (its imports take a moment); :meth:`open` then opens the store."""
        ctx = multiprocessing.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        process = ctx.Process(target=writer_main, name="vnpd-cache-writer", daemon=True,
                              args=(child_conn, Path(directory), os.getpid(), log_format,
                                    log_level))
        process.start()
        child_conn.close()
        widen(parent_conn)
        return cls(process, parent_conn)

    def open(self, max_bytes: int, namespace: str) -> None:
        """Open (or create, or rebuild if corrupt) the store in the writer, and wait for
        it. Raises RuntimeError if it could not, or the process died."""
        try:
            send_message(self._conn, OpenStore(max_bytes, namespace))
            reply = recv_message(self._conn) if self._conn.poll(OPEN_TIMEOUT_S) else None
        except (OSError, EOFError, FrameError) as exc:
            reply = OpenFailed(f"the cache writer process died ({exc!r})")
        if not isinstance(reply, CacheStats):
            self._stop_process()
            reason = reply.reason if isinstance(reply, OpenFailed) else "no answer"
            raise RuntimeError(f"the cache writer could not open the store: {reason}")
        self._stats = reply
        self._sender = threading.Thread(target=self._send_loop, daemon=True,
                                        name="vnpd-cache-tx")
        self._receiver = threading.Thread(target=self._receive_loop, daemon=True,
                                          name="vnpd-cache-rx")
        self._sender.start()
        self._receiver.start()

    def submit(self, keys: np.ndarray, rows: np.ndarray) -> bool:
        """Queue rows for the store, as they are (they must not change afterwards).
        Returns False, storing nothing, when the queue is full or the writer is gone."""
        if self._failed is not None or self._closing:
            return False
        try:
            self._queue.put_nowait(StoreRows(keys, rows))
        except queue.Full:
            return False
        return True

    def stats(self) -> CacheStats:
        """The writer's counters after its last batch (evictions, entries, size)."""
        assert self._stats is not None, "open() first"
        return self._stats

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Write what is queued, then stop the process (killed after ``timeout``)."""
        self._closing = True
        if self._sender is not None:
            self._queue.put(None)
            self._sender.join(timeout)
        else:
            self._conn.close()  # never opened: the end of its pipe ends it
        self._process.join(timeout)
        self._stop_process()
        if self._receiver is not None:
            self._receiver.join(5)

    def _send_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._failed is not None:
                continue  # the writer is gone: drain, so that nobody waits on the queue
            try:
                send_message(self._conn, item)
            except OSError as exc:
                self._died(f"sending rows: {exc!r}")
        try:
            send_message(self._conn, None)  # the writer exits after what it has
        except OSError:
            pass

    def _receive_loop(self) -> None:
        while True:
            try:
                reply = recv_message(self._conn)
            except (OSError, EOFError, FrameError) as exc:
                if not self._closing:
                    self._died(f"reading its answers: {exc!r}")
                return
            if isinstance(reply, CacheStats):
                self._stats = reply

    def _died(self, reason: str) -> None:
        if self._failed is None:
            self._failed = reason
            log.error("cache_writer_died", reason=reason,
                      exitcode=self._process.exitcode)

    def _stop_process(self) -> None:
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._conn.close()


def disk_low(directory: Path) -> bool:
    """The filesystem is nearly full: the space is left to journals and outputs."""
    usage = shutil.disk_usage(directory)
    return usage.free < min(RESERVE_MAX, RESERVE_FRACTION * usage.total)


def writer_main(conn: Connection, directory: Path, owner: int, log_format: str,
                log_level: str) -> None:
    """The writer process: open the store when asked, then store each batch of rows
    and answer with the store's stats, until told to stop or the pipe closes."""
    from vnpd.log import configure_logging

    configure_logging(log_format, log_level, stream=sys.stdout, cache_writer=os.getpid())
    exit_with(owner)
    widen(conn)
    try:
        request = recv_message(conn)
        assert isinstance(request, OpenStore), request
        cache = EmbeddingCache.open(directory, request.max_bytes, request.namespace)
    except EOFError:
        return
    except Exception as exc:
        send_message(conn, OpenFailed(str(exc)))
        return
    try:
        send_message(conn, cache.stats())
        while (item := _next(conn)) is not None:
            if not disk_low(directory):
                try:
                    cache.put_many((bytes(k), {ROW: row})
                                   for k, row in zip(item.keys, item.rows))
                except Exception as exc:  # a full disk, say: the rows are in the output anyway
                    log.warning("cache_write_failed", rows=len(item.keys), error=str(exc))
            send_message(conn, cache.stats())
    except OSError:
        pass  # the daemon is gone: what it sent is stored, nothing is owed
    finally:
        cache.close()


def _next(conn: Connection) -> StoreRows | None:
    """The next batch, or None when the daemon said stop or is gone."""
    try:
        return recv_message(conn)
    except (EOFError, OSError, FrameError):
        return None
