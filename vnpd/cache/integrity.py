"""Is a cache file a whole SQLite database? Checks cheap enough to run at every open.

Three layers, from cheap to thorough:
- ``header_problem``: the 100-byte header (magic, page size) and a file long enough for
  the page count the header claims: catches truncation and garbage at the start;
- ``quick_check``: ``PRAGMA quick_check`` on the whole file up to 1 GiB; above that on the
  small tables only (meta, namespaces, entries), because reading a 50 GB file at every
  start is not acceptable;
- at any time, SQLite's own SQLITE_CORRUPT / SQLITE_NOTADB errors (``is_corrupt``) on the
  pages a query touches, and the per-entry checksum (``vnpd.cache.entry``) on payloads.

Example::

    if (problem := header_problem(db_path)) is not None:
        ...  # remove and rebuild
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

FULL_CHECK_MAX_BYTES = 1 << 30
_CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}


class CacheCorruptError(RuntimeError):
    """The cache file is damaged and this handle cannot rebuild it (read-only)."""


def is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    """True for errors that mean a damaged file, not a busy or full one."""
    return getattr(exc, "sqlite_errorcode", None) in _CORRUPT_CODES


def header_problem(path: Path, check_size: bool = True) -> str | None:
    """Why the file at ``path`` is not a whole SQLite database, or None if it may be.

    ``check_size=False`` skips the length check: pass it while a WAL still holds frames,
    since a checkpoint killed half way leaves page 1 (new size) ahead of the file's end.
    """
    size = path.stat().st_size
    if size == 0:
        return None  # a fresh file SQLite has not written yet
    with path.open("rb") as f:
        header = f.read(100)
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return "bad header"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return "bad page size"
    pages = int.from_bytes(header[28:32], "big")
    valid = header[24:28] == header[92:96]  # the in-header size is trusted only then
    if check_size and valid and pages * page_size > size:
        return f"truncated: header claims {pages * page_size} bytes, file has {size}"
    return None


def quick_check(db: sqlite3.Connection, file_size: int) -> str | None:
    """The first problems ``PRAGMA quick_check`` reports, or None if it says ok.

    May raise ``sqlite3.DatabaseError`` itself on a badly damaged file (see ``is_corrupt``).
    """
    if file_size <= FULL_CHECK_MAX_BYTES:
        rows = db.execute("PRAGMA quick_check").fetchall()
    else:
        rows = [r for table in ("meta", "namespaces", "entries")
                for r in db.execute(f"PRAGMA quick_check({table})").fetchall()]
    bad = [r[0] for r in rows if r[0] != "ok"]
    return "; ".join(bad[:5]) if bad else None
