"""The daemon's embedding cache: rows of sequences computed before, in any job, served
again instead of recomputed (``[cache]``; the store is :mod:`vnpd.cache.store`).

Lookups run on the event loop, a batch of keys per window of a job (about a microsecond a
key). Writes run on one background thread, so a slow disk never holds a batch's rows
back; the queue in front of it is bounded, and rows that do not fit are not cached (the
cache is an optimisation, never a place where a result must be). Each thread has its own
handle on the SQLite store.

The namespace of every entry covers what changes a row (the checkpoint's content hash,
layer, dtypes, truncation, window settings, per-residue output): an entry of another model
or setting is never served (:func:`vnpd.cache.key.cache_namespace`).

Example::

    cache = RowCache.open(state / "cache", max_bytes=50 << 30, namespace=ns)
    found = cache.lookup(keys)        # {i: row} for the keys[i] that were cached
    cache.store(keys, rows)           # later, on the writer thread
    cache.close()
"""

from __future__ import annotations

import queue
import shutil
import threading
from pathlib import Path

import numpy as np
import structlog

from vnpd.cache.store import CacheStats, EmbeddingCache

log = structlog.get_logger()

ROW = "mean"            # the name of the pooled row in a cache entry
QUEUE_BATCHES = 16      # batches of rows waiting for the writer thread: bounded memory
RESERVE_FRACTION = 0.05  # the cache never writes into the last 5% of its filesystem...
RESERVE_MAX = 1 << 30    # ...or its last GiB, whichever is less: outputs need it more


class RowCache:
    """A reader handle for lookups on the loop, a writer thread for stores."""

    def __init__(self, reader: EmbeddingCache, writer: EmbeddingCache,
                 directory: Path | None = None) -> None:
        self.reader, self.writer = reader, writer
        self.directory = directory
        self._queue: queue.Queue[tuple[np.ndarray, np.ndarray] | None] = \
            queue.Queue(QUEUE_BATCHES)
        self.dropped = 0
        self._thread = threading.Thread(target=self._write_loop, daemon=True,
                                        name="vnpd-cache-writer")
        self._thread.start()

    @classmethod
    def open(cls, directory: Path, max_bytes: int, namespace: str) -> "RowCache":
        """Open (or create, or rebuild if corrupt) the store in ``directory``."""
        writer = EmbeddingCache.open(directory, max_bytes, namespace)
        reader = EmbeddingCache.open(directory, max_bytes, namespace)
        return cls(reader, writer, directory)

    def lookup(self, keys: np.ndarray) -> dict[int, np.ndarray]:
        """The cached rows of ``keys`` ((k, 32) uint8): ``{i: row}`` for each hit."""
        if not len(keys):
            return {}
        wanted = [bytes(k) for k in np.asarray(keys)]
        found = self.reader.get_many(wanted)
        return {i: found[key][ROW] for i, key in enumerate(wanted) if key in found}

    def store(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Queue rows for the store; ``rows[i]`` belongs to ``keys[i]``.

        The arrays are queued as they are, not copied (at dim 2560 the copy was a quarter
        of the parent loop's time): they are made read-only here, so that nobody changes
        them before the writer thread has read them."""
        keys, rows = np.asarray(keys), np.asarray(rows)
        keys.setflags(write=False)
        rows.setflags(write=False)
        try:
            self._queue.put_nowait((keys, rows))
        except queue.Full:
            self.dropped += len(keys)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            keys, rows = item
            if self._disk_low():
                self.dropped += len(keys)
                continue
            try:
                self.writer.put_many((bytes(k), {ROW: row}) for k, row in zip(keys, rows))
            except Exception as exc:  # a full disk, say: the rows are in the output anyway
                log.warning("cache_write_failed", rows=len(keys), error=str(exc))

    def _disk_low(self) -> bool:
        """The filesystem is nearly full: the space is left to journals and outputs."""
        if self.directory is None:
            return False
        usage = shutil.disk_usage(self.directory)
        return usage.free < min(RESERVE_MAX, RESERVE_FRACTION * usage.total)

    def stats(self) -> tuple[CacheStats, CacheStats]:
        """(reader stats: hits and misses; writer stats: evictions and size)."""
        return self.reader.stats(), self.writer.stats()

    def close(self) -> None:
        """Write what is queued, then close both handles."""
        self._queue.put(None)
        self._thread.join()
        self.writer.close()
        self.reader.close()


def checkpoint_digest(directory: Path, checkpoint: str) -> str:
    """The checkpoint's content hash (SHA-256; remembered beside the cache, so an unchanged
    file is hashed once). Slow the first time for a large model: start it early."""
    from vnpd.cache.key import model_content_hash
    from vnpd.compute.families.esm2_checkpoint import resolve_checkpoint

    return model_content_hash(resolve_checkpoint(checkpoint), memo_dir=directory)


def open_row_cache(directory: Path, max_gb: float, digest: str, layers: list[int],
                   dtype: str, output_dtype: str, truncation: int,
                   window_stride: int | None = None) -> RowCache:
    """The daemon's cache for the model of content hash ``digest`` and these settings;
    ``window_stride``: window mode with this stride (None: truncate). In window mode only
    rows of one window (no longer than the truncation) are stored and served."""
    from vnpd.cache.key import cache_namespace

    namespace = cache_namespace(digest, layers=layers, dtype=dtype, output_dtype=output_dtype,
                                truncation=truncation,
                                long_sequences="truncate" if window_stride is None else "window",
                                window_stride=window_stride or max(1, truncation // 2),
                                per_residue=False)
    log.info("cache_open", path=str(directory), max_gb=max_gb, model_sha256=digest[:16])
    return RowCache.open(directory, int(max_gb * (1 << 30)), namespace)
