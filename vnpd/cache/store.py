"""The embedding cache store: one SQLite (WAL) file of named float arrays per sequence key.

Why SQLite in WAL mode:
- concurrent readers with one writer, across threads and processes, out of the box;
- a transaction is all or nothing, so a SIGKILL mid-``put_many`` leaves no torn entry
  (the WAL frames of an uncommitted transaction are ignored on the next open);
- stdlib ``sqlite3``: no new dependency; blobs of a few MB (per-residue rows) are fine.
Why not LMDB: its map size must be fixed up front (a full map fails writes) and it is one
more compiled dependency. Why not a content-addressed file tree: crash safety needs an
fsync per file and a directory fsync, and millions of 5 KB files cost an inode each.

Schema (``vnpd.cache.db``): small ``entries`` rows (key, layout, checksum, ``last_used``)
apart from ``payloads``, and running totals kept by triggers in ``meta``.

Values (``vnpd.cache.entry``): a dict of named float32/float16 arrays, bit-exact, with a
CRC-32 per entry. A mismatch on read deletes the entry (``cache_entry_corrupt``): a miss.

LRU: ``last_used`` is a logical clock. Hits are remembered in memory and written in one
UPDATE when many are pending, before each ``put_many`` and at ``close``. Eviction runs
before inserting, on SQLite's own page accounting (``page_count - freelist_count``), so the
db file never grows past ``0.85 * max_bytes``; freed pages are reused, the WAL is
checkpointed and truncated once it passes ``max_bytes / 20`` (capped at 64 MiB), and a
cache opened with a smaller ``max_bytes`` shrinks its file with ``incremental_vacuum``.

Corruption (``vnpd.cache.integrity``): a header check and ``PRAGMA quick_check`` at
open, SQLITE_CORRUPT / SQLITE_NOTADB at any time: logged as ``cache_corrupt_rebuilt``, the
files are removed and an empty cache is created. Nothing of a corrupt cache is served.

Example::

    cache = EmbeddingCache.open(state / "cache", max_bytes=50 << 30, namespace=ns)
    found = cache.get_many([sequence_key(s) for s in seqs])   # {key: {"mean": array}}
    cache.put_many([(sequence_key(s), {"mean": row}) for s, row in computed])
    cache.close()
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from vnpd.cache.entry import Arrays, decode_arrays, encode_arrays, entry_checksum
from vnpd.cache.db import connect, pragma_int, transaction, used_bytes
from vnpd.cache.integrity import CacheCorruptError, header_problem, is_corrupt, quick_check
from vnpd.cache.known import KnownKeys

log = structlog.get_logger(__name__)

DB_NAME = "embeddings.sqlite3"
FILL = 0.85                   # db pages kept under FILL * max_bytes; the rest is WAL and slack
LOOKUP_CHUNK = 900            # keys per SELECT, under SQLite's oldest variable limit (999)
TOUCH_FLUSH = 8192            # pending hits written in one UPDATE

@dataclass(frozen=True)
class CacheStats:
    """Counters for metrics. hits/misses/evictions/corrupt_entries count since open
    (this handle); entries/payload_bytes/file_bytes describe the store now."""
    hits: int
    misses: int
    evictions: int
    corrupt_entries: int
    rebuilds: int
    entries: int
    payload_bytes: int
    file_bytes: int


class EmbeddingCache:
    """A handle on one cache file, for one namespace. Thread-safe (one lock per handle);
    open one handle per thread or process for parallel reads."""

    def __init__(self, path: Path, max_bytes: int, namespace: str, readonly: bool) -> None:
        self.path, self.max_bytes = path, max_bytes
        self.namespace, self.readonly = namespace, readonly
        self._lock = threading.RLock()
        self._pending: set[int] = set()
        self._hits = self._misses = self._evictions = self._corrupt = self._rebuilds = 0
        self._target = int(max_bytes * FILL)
        self._wal_max = max(256 << 10, min(64 << 20, max_bytes // 20))
        self._db: sqlite3.Connection | None = None
        self._ns: int | None = None
        self._known = KnownKeys()  # the namespace's keys, for lookups (vnpd.cache.known)
        self._clock = 0

    @classmethod
    def open(cls, path: Path, max_bytes: int, namespace: str, *,
             readonly: bool = False) -> EmbeddingCache:
        """Open (or create) the cache in directory ``path`` for ``namespace``.

        A damaged file is removed and rebuilt empty (``cache_corrupt_rebuilt``); with
        ``readonly=True`` it raises ``CacheCorruptError`` instead, and a missing file raises
        ``sqlite3.OperationalError``. Raises ``ValueError`` if ``max_bytes`` is too small
        to hold anything (< 1 MiB).
        """
        if max_bytes < (1 << 20):
            raise ValueError(f"max_bytes must be at least 1 MiB, not {max_bytes}")
        cache = cls(Path(path), int(max_bytes), namespace, readonly)
        cache._open_checked()
        return cache

    # Opening, checking, rebuilding ----------------------------------------------------
    @property
    def db_path(self) -> Path:
        return self.path / DB_NAME

    def _open_checked(self) -> None:
        if not self.readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        problem = None
        try:
            # While a WAL holds frames, the db file may legitimately be shorter than its
            # header says (a checkpoint killed half way): check its length only after
            # SQLite has replayed the WAL into it.
            if self.db_path.exists():
                problem = header_problem(self.db_path, check_size=self._wal_bytes() == 0)
            if problem is None:
                self._connect()
                db = self._require_db()
                if not self.readonly:
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                problem = (header_problem(self.db_path, check_size=self._wal_bytes() == 0)
                           or quick_check(db, self.db_path.stat().st_size))
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise
            problem = str(exc)
        if problem is not None:
            self._rebuild(problem)
        elif not self.readonly:
            self._shrink_to_budget()

    def _connect(self) -> None:
        db = connect(self.db_path, readonly=self.readonly, wal_max=self._wal_max)
        self._db = db
        if not self.readonly:
            db.execute("INSERT OR IGNORE INTO namespaces (name) VALUES (?)", (self.namespace,))
        row = db.execute("SELECT id FROM namespaces WHERE name=?", (self.namespace,)).fetchone()
        self._ns = None if row is None else int(row[0])
        self._clock = self._meta("clock")
        self._known = KnownKeys()
        if self._ns is not None:  # read now, at open, not at the first lookup
            self._known.refresh(db, self._ns)

    def _rebuild(self, reason: str) -> None:
        log.error("cache_corrupt_rebuilt", path=str(self.db_path), reason=reason)
        if self._db is not None:
            self._db.close()
            self._db = None
        if self.readonly:
            raise CacheCorruptError(f"{self.db_path}: {reason}")
        # Removed, not moved aside: a cache holds nothing worth keeping, and a 50 GB
        # corpse beside the new file would break the disk budget.
        for suffix in ("", "-wal", "-shm"):
            self.db_path.with_name(self.db_path.name + suffix).unlink(missing_ok=True)
        self._pending.clear()
        self._rebuilds += 1
        self._connect()

    def _require_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the cache is closed")
        return self._db

    def _meta(self, name: str) -> int:
        row = self._require_db().execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return int(row[0]) if row else 0

    # Lookups ------------------------------------------------------------------------
    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, Arrays]:
        """The cached arrays for each key found, ``{key: {name: array}}``; misses are absent.

        One SELECT per chunk of ``LOOKUP_CHUNK`` distinct keys. Hits and misses are counted
        per distinct key. Returned arrays are read-only. An entry whose checksum fails is
        deleted and counted as a miss; a corrupt database is rebuilt and everything misses.
        """
        with self._lock:
            try:
                return self._get_many(keys)
            except sqlite3.DatabaseError as exc:
                if not is_corrupt(exc):
                    raise
                self._rebuild(str(exc))
                self._misses += len(set(keys))
                return {}

    def _get_many(self, keys: Sequence[bytes]) -> dict[bytes, Arrays]:
        db = self._require_db()
        wanted = list(dict.fromkeys(keys))
        found: dict[bytes, Arrays] = {}
        if self._ns is None:  # read-only handle on a cache that never saw this namespace
            self._misses += len(wanted)
            return found
        bad: list[int] = []
        self._known.refresh(db, self._ns)  # keys that cannot be present skip SQLite
        candidates = [key for key, maybe in zip(wanted, self._known.maybe(wanted).tolist())
                      if maybe]
        for start in range(0, len(candidates), LOOKUP_CHUNK):
            chunk = candidates[start:start + LOOKUP_CHUNK]
            sql = ("SELECT e.id, e.key, e.layout, e.checksum, p.data FROM entries e "
                   "JOIN payloads p ON p.id = e.id WHERE e.ns = ? AND e.key IN ("
                   + ",".join("?" * len(chunk)) + ")")
            for rowid, key, layout, checksum, payload in db.execute(sql, (self._ns, *chunk)):
                try:
                    if entry_checksum(self._ns, key, layout, payload) != checksum:
                        raise ValueError("checksum mismatch")
                    found[bytes(key)] = decode_arrays(layout, payload)
                    self._pending.add(rowid)
                except ValueError as exc:
                    log.error("cache_entry_corrupt", path=str(self.db_path), key=bytes(key).hex(),
                              reason=str(exc))
                    bad.append(rowid)
        self._hits += len(found)
        self._misses += len(wanted) - len(found)
        self._corrupt += len(bad)
        if bad and not self.readonly:
            self._pending.difference_update(bad)
            with transaction(db):
                db.executemany("DELETE FROM entries WHERE id=?", [(i,) for i in bad])
        if self.readonly:
            self._pending.clear()
        elif len(self._pending) >= TOUCH_FLUSH:
            with transaction(db):
                self._flush_touches(db)
        return found

    # Writes -------------------------------------------------------------------------
    def put_many(self, items: Iterable[tuple[bytes, Arrays]]) -> None:
        """Store entries; a key already present in this namespace is left as it is.

        Entries are committed in transactions of at most ``max_bytes / 20`` of payload, each
        all or nothing. Least recently used entries (any namespace) are evicted first so
        that the db file stays under the budget. An entry larger than that chunk is not
        stored (logged). Raises TypeError for non-float arrays, RuntimeError if read-only.
        """
        if self.readonly:
            raise RuntimeError("put_many on a read-only cache handle")
        with self._lock:
            try:
                self._put_many(items)
            except sqlite3.DatabaseError as exc:
                if not is_corrupt(exc):
                    raise
                self._rebuild(str(exc))

    def _put_many(self, items: Iterable[tuple[bytes, Arrays]]) -> None:
        chunk: list[tuple[bytes, str, bytes]] = []
        chunk_bytes = 0
        for key, arrays in items:
            layout, payload = encode_arrays(arrays)
            if len(payload) > self._wal_max:
                log.warning("cache_entry_too_large", key=bytes(key).hex(), nbytes=len(payload),
                            limit=self._wal_max)
                continue
            if chunk and chunk_bytes + len(payload) > self._wal_max:
                self._commit_chunk(chunk)
                chunk, chunk_bytes = [], 0
            chunk.append((bytes(key), layout, payload))
            chunk_bytes += len(payload)
        if chunk:
            self._commit_chunk(chunk)

    def _commit_chunk(self, chunk: list[tuple[bytes, str, bytes]]) -> None:
        db = self._require_db()
        assert self._ns is not None
        page = pragma_int(db, "page_size")
        # Pages the chunk will take: whole overflow pages per blob, plus its entry row.
        incoming = sum((len(p) // (page - 4) + 2) * page for _, _, p in chunk)
        with transaction(db):
            self._flush_touches(db)
            self._evict_until(db, self._target - incoming)
            self._clock += 1
            for key, layout, payload in chunk:
                cur = db.execute(
                    "INSERT INTO entries (ns, key, layout, checksum, nbytes, last_used) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (ns, key) DO NOTHING",
                    (self._ns, key, layout, entry_checksum(self._ns, key, layout, payload),
                     len(payload), self._clock))
                if cur.rowcount == 1:
                    db.execute("INSERT INTO payloads (id, data) VALUES (?, ?)",
                               (cur.lastrowid, payload))
            db.execute("UPDATE meta SET value=? WHERE name='clock'", (self._clock,))
        self._checkpoint_if_large(db)

    def _flush_touches(self, db: sqlite3.Connection) -> None:
        """Write pending hits as used now (inside the caller's transaction)."""
        if not self._pending:
            return
        self._clock += 1
        ids = list(self._pending)
        for start in range(0, len(ids), LOOKUP_CHUNK):
            part = ids[start:start + LOOKUP_CHUNK]
            db.execute(f"UPDATE entries SET last_used=? WHERE id IN ({','.join('?' * len(part))})",
                       (self._clock, *part))
        db.execute("UPDATE meta SET value=? WHERE name='clock'", (self._clock,))
        self._pending.clear()

    def _evict_until(self, db: sqlite3.Connection, limit: int) -> None:
        """Delete least recently used entries until the used pages fit in ``limit`` bytes."""
        excess = used_bytes(db) - max(limit, 0)
        while excess > 0:
            victims, freed = [], 0
            # fetchall: a half-read cursor would keep a statement open, and with it the
            # snapshot that stops incremental_vacuum and checkpoints from doing their job.
            oldest = db.execute(
                "SELECT id, nbytes FROM entries ORDER BY last_used, id LIMIT 1024").fetchall()
            for rowid, nbytes in oldest:
                victims.append((rowid,))
                freed += nbytes
                if freed >= excess:
                    break
            if not victims:
                return  # only structure left; nothing more to give
            db.executemany("DELETE FROM entries WHERE id=?", victims)
            self._pending.difference_update(v[0] for v in victims)
            self._evictions += len(victims)
            excess = used_bytes(db) - max(limit, 0)

    def _wal_bytes(self) -> int:
        try:
            return self.db_path.with_name(self.db_path.name + "-wal").stat().st_size
        except FileNotFoundError:
            return 0

    def _checkpoint_if_large(self, db: sqlite3.Connection) -> None:
        if self._wal_bytes() <= self._wal_max:
            return
        # No busy wait: if a reader still uses the WAL, try again after the next put
        # rather than stall the caller; journal_size_limit trims it later anyway.
        db.execute("PRAGMA busy_timeout=0")
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            db.execute("PRAGMA busy_timeout=5000")

    def _shrink_to_budget(self) -> None:
        """At open: evict down to the budget and give free pages back to the filesystem."""
        db = self._require_db()
        pages = int(db.execute("PRAGMA page_count").fetchone()[0])
        if pages * pragma_int(db, "page_size") <= self._target:
            return
        with transaction(db):
            self._evict_until(db, self._target)
        # executescript, not execute: the pragma frees one page per step, and sqlite3's
        # execute() steps a row-less statement only once.
        db.executescript("PRAGMA incremental_vacuum;")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        log.info("cache_shrunk", path=str(self.db_path), file_bytes=self.file_bytes())

    # Introspection and shutdown ----------------------------------------------------------
    def file_bytes(self) -> int:
        """Bytes on disk: the db file plus its WAL."""
        try:
            return self.db_path.stat().st_size + self._wal_bytes()
        except FileNotFoundError:
            return 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(hits=self._hits, misses=self._misses, evictions=self._evictions,
                              corrupt_entries=self._corrupt, rebuilds=self._rebuilds,
                              entries=self._meta("entries"),
                              payload_bytes=self._meta("payload_bytes"),
                              file_bytes=self.file_bytes())

    def flush(self) -> None:
        """Write pending hit times now (also done by ``put_many`` and ``close``)."""
        if self.readonly:
            return
        with self._lock:
            db = self._require_db()
            with transaction(db):
                self._flush_touches(db)

    def close(self) -> None:
        """Flush pending hits and close. Idempotent."""
        with self._lock:
            if self._db is None:
                return
            try:
                self.flush()
            except sqlite3.DatabaseError as exc:
                log.warning("cache_flush_failed", path=str(self.db_path), error=str(exc))
            self._db.close()
            self._db = None

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

