"""vnpd/cache/known.py: lookups skip SQLite for keys the store cannot hold, and miss
nothing it holds, whoever stored it and whenever (a real store, two handles)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from tests.cache.test_store import MiB, NS, assert_same, key_of, value_of
from vnpd.cache.known import KnownKeys, prefixes
from vnpd.cache.store import EmbeddingCache


def lookups_in_sqlite(cache: EmbeddingCache) -> list[str]:
    """Record the SELECTs by key that ``cache``'s connection runs from now on."""
    statements: list[str] = []
    db = cache._require_db()  # the handle's own connection: what it sends SQLite
    db.set_trace_callback(lambda sql: statements.append(sql) if "e.key IN" in sql else None)
    return statements


def test_absent_keys_skip_sqlite_and_present_ones_are_served(tmp_path: Path) -> None:
    with EmbeddingCache.open(tmp_path, 64 * MiB, NS) as writer:
        writer.put_many([(key_of(i), value_of(i)) for i in range(0, 400, 2)])  # even keys
    with EmbeddingCache.open(tmp_path, 64 * MiB, NS) as reader:
        sql = lookups_in_sqlite(reader)
        assert reader.get_many([key_of(i) for i in range(1, 400, 2)]) == {}  # odd: absent
        assert sql == []
        found = reader.get_many([key_of(i) for i in range(400)])
        assert sorted(found) == sorted(key_of(i) for i in range(0, 400, 2))
        for i in range(0, 400, 2):
            assert_same(found[key_of(i)], value_of(i))
        assert len(sql) == 1
        stats = reader.stats()
        assert (stats.hits, stats.misses) == (200, 400)  # skipped keys count as misses


def test_keys_stored_after_the_reader_opened_are_found(tmp_path: Path) -> None:
    with EmbeddingCache.open(tmp_path, 64 * MiB, NS) as reader, \
            EmbeddingCache.open(tmp_path, 64 * MiB, NS) as writer:  # another process's, say
        assert reader.get_many([key_of(1)]) == {}
        for batch in range(5):
            keys = list(range(batch * 100, batch * 100 + 100))
            writer.put_many([(key_of(i), value_of(i)) for i in keys])
            found = reader.get_many([key_of(i) for i in range(600)])
            assert sorted(found) == sorted(key_of(i) for i in range(batch * 100 + 100))


def test_a_key_sharing_a_prefix_is_a_miss_not_a_wrong_row(tmp_path: Path) -> None:
    with EmbeddingCache.open(tmp_path, 64 * MiB, NS) as cache:
        cache.put_many([(key_of(7), value_of(7))])
        twin = key_of(7)[:8] + bytes(24)  # the same first 8 bytes, another key
        sql = lookups_in_sqlite(cache)
        assert cache.get_many([twin]) == {}
        assert len(sql) == 1  # it may be present: SQLite says it is not
        assert_same(cache.get_many([key_of(7)])[key_of(7)], value_of(7))


def test_known_keys_follow_the_entries_table(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "t.sqlite3")
    db.execute("CREATE TABLE entries (id INTEGER PRIMARY KEY, ns INTEGER, key BLOB)")
    rng = np.random.default_rng(0)
    keys = [rng.bytes(32) for _ in range(5000)]
    known = KnownKeys()
    for start in range(0, 5000, 700):  # refreshes of new rows, merged now and then
        db.executemany("INSERT INTO entries (ns, key) VALUES (?, ?)",
                       [(1 if i % 3 else 2, keys[i]) for i in range(start, min(5000, start + 700))])
        known.refresh(db, 1)
        seen = [keys[i] for i in range(min(5000, start + 700)) if i % 3]
        assert known.maybe(seen).all() and len(known) == len(seen)
    others = [keys[i] for i in range(0, 5000, 3)] + [rng.bytes(32) for _ in range(1000)]
    assert not known.maybe(others).any()  # namespace 2's and unknown keys
    assert known.last_id == 5000
    assert prefixes([b"short"]).tolist() == [int.from_bytes(b"short".ljust(8, b"\0"), "little")]
