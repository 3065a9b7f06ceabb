"""The daemon's embedding cache: rows of sequences computed before, in any job, served
again instead of recomputed (``[cache]``; the store is :mod:`vnpd.cache.store`).

Lookups run on the event loop, a batch of keys per window of a job (about a microsecond a
key). Writes run in a process of their own (:mod:`vnpd.daemon.cache_writer`), so that
neither a slow disk nor SQLite's per-entry work holds a batch's rows back; the queue in
front of it is bounded, and rows that do not fit are not cached (the cache is an
optimisation, never a place where a result must be). The reader and the writer each have
their own handle on the SQLite store.

The namespace of every entry covers what changes a row (the checkpoint's content hash,
layer, dtypes, truncation, window settings, per-residue output): an entry of another model
or setting is never served (:func:`vnpd.cache.key.cache_namespace`).

Example::

    writer = CacheWriter.spawn(state / "cache")    # early: the process starts meanwhile
    cache = RowCache.open(state / "cache", max_bytes=50 << 30, namespace=ns, writer=writer)
    found = cache.lookup(keys)        # {i: row} for the keys[i] that were cached
    cache.store(keys, rows)           # later, in the writer process
    cache.close()
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import structlog

from vnpd.cache.store import CacheStats, EmbeddingCache
from vnpd.daemon.cache_writer import ROW, CacheWriter
from vnpd.inputs.duplicates import key_list

log = structlog.get_logger()


class RowCache:
    """A reader handle for lookups on the loop, a writer process for stores."""

    def __init__(self, reader: EmbeddingCache, writer: CacheWriter) -> None:
        self.reader, self.writer = reader, writer
        self.dropped = 0  # rows not stored: the writer's queue was full, or it is gone

    @classmethod
    def open(cls, directory: Path, max_bytes: int, namespace: str,
             writer: CacheWriter | None = None) -> "RowCache":
        """Open (or create, or rebuild if corrupt) the store in ``directory``: first in
        the writer (``writer``, spawned for this directory; None: spawned here), then the
        reader's handle. Raises RuntimeError if the writer could not open it."""
        writer = writer if writer is not None else CacheWriter.spawn(directory)
        try:
            writer.open(max_bytes, namespace)
            reader = EmbeddingCache.open(directory, max_bytes, namespace)
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer)

    def lookup(self, keys: np.ndarray) -> dict[int, np.ndarray]:
        """The cached rows of ``keys`` ((k, 32) uint8): ``{i: row}`` for each hit."""
        if not len(keys):
            return {}
        wanted = key_list(keys)
        found = self.reader.get_many(wanted)
        return {i: found[key][ROW] for i, key in enumerate(wanted) if key in found}

    def store(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Queue rows for the store; ``rows[i]`` belongs to ``keys[i]``.

        The arrays are queued as they are, not copied (at dim 2560 the copy was a quarter
        of the parent loop's time): they are made read-only here, so that nobody changes
        them before they are sent."""
        keys, rows = np.asarray(keys), np.asarray(rows)
        keys.setflags(write=False)
        rows.setflags(write=False)
        if not self.writer.submit(keys, rows):
            self.dropped += len(keys)

    def stats(self) -> tuple[CacheStats, CacheStats]:
        """(reader stats: hits and misses; writer stats: evictions and size)."""
        return self.reader.stats(), self.writer.stats()

    def close(self) -> None:
        """Write what is queued, then close both handles."""
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
                   window_stride: int | None = None, writer: CacheWriter | None = None
                   ) -> RowCache:
    """The daemon's cache for the model of content hash ``digest`` and these settings;
    ``window_stride``: window mode with this stride (None: truncate). In window mode only
    rows of one window (no longer than the truncation) are stored and served. ``writer``:
    as for :meth:`RowCache.open`."""
    from vnpd.cache.key import cache_namespace

    namespace = cache_namespace(digest, layers=layers, dtype=dtype, output_dtype=output_dtype,
                                truncation=truncation,
                                long_sequences="truncate" if window_stride is None else "window",
                                window_stride=window_stride or max(1, truncation // 2),
                                per_residue=False)
    log.info("cache_open", path=str(directory), max_gb=max_gb, model_sha256=digest[:16])
    return RowCache.open(directory, int(max_gb * (1 << 30)), namespace, writer)
