"""The cache's SQLite file: schema, connection settings, transactions, page accounting.

Schema: ``entries`` holds small rows (namespace id, key, layout, checksum, payload size,
``last_used``) and ``payloads`` the bytes under the same rowid. They are separate so that
marking a hit rewrites a 100-byte row, not a multi-MB blob. Triggers keep the running
totals (entries, payload bytes) in ``meta`` inside the writing transaction, so ``stats``
never scans, and deleting an entry deletes its payload.

Example::

    db = connect(cache_dir / "embeddings.sqlite3", readonly=False, wal_max=64 << 20)
    with transaction(db):
        db.execute("DELETE FROM entries WHERE id=?", (7,))
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('entries', 0), ('payload_bytes', 0), ('clock', 0);
CREATE TABLE IF NOT EXISTS namespaces (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY,
    ns INTEGER NOT NULL,
    key BLOB NOT NULL,
    layout TEXT NOT NULL,
    checksum INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    last_used INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS entries_by_key ON entries (ns, key);
CREATE INDEX IF NOT EXISTS entries_by_age ON entries (last_used);
CREATE TABLE IF NOT EXISTS payloads (id INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TRIGGER IF NOT EXISTS entries_added AFTER INSERT ON entries BEGIN
    UPDATE meta SET value = value + 1 WHERE name = 'entries';
    UPDATE meta SET value = value + NEW.nbytes WHERE name = 'payload_bytes';
END;
CREATE TRIGGER IF NOT EXISTS entries_removed AFTER DELETE ON entries BEGIN
    UPDATE meta SET value = value - 1 WHERE name = 'entries';
    UPDATE meta SET value = value - OLD.nbytes WHERE name = 'payload_bytes';
    DELETE FROM payloads WHERE id = OLD.id;
END;
"""


def connect(path: Path, *, readonly: bool, wal_max: int) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), schema created.

    ``readonly`` opens with ``mode=ro`` and creates nothing (a missing file raises
    ``sqlite3.OperationalError``). Corruption surfaces as ``sqlite3.DatabaseError``.
    """
    if readonly:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                             check_same_thread=False)
    else:
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        # auto_vacuum must be chosen before the first table exists; it lets a cache
        # opened with a smaller budget give pages back to the filesystem.
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL: a crash never corrupts; power loss may drop the last commits,
        # which for a cache only means recomputing them.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA journal_size_limit={int(wal_max)}")
        db.executescript(SCHEMA)
    db.execute("PRAGMA busy_timeout=5000")
    db.execute("PRAGMA cache_size=-8192")  # 8 MiB page cache, whatever the file size
    db.execute("PRAGMA mmap_size=0")
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def pragma_int(db: sqlite3.Connection, name: str) -> int:
    return int(db.execute(f"PRAGMA {name}").fetchone()[0])


def used_bytes(db: sqlite3.Connection) -> int:
    """Bytes of pages in use (the file's pages minus free ones): what eviction bounds."""
    return (pragma_int(db, "page_count") - pragma_int(db, "freelist_count")) * pragma_int(db, "page_size")
