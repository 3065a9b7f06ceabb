"""Tests for vnpd/cache/store.py: real SQLite files, real processes, real corruption."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from vnpd.cache.key import cache_namespace, sequence_key
from vnpd.cache.store import DB_NAME, EmbeddingCache

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
BASE = dict(model_hash="a" * 64, layers=[-1], dtype="bfloat16", output_dtype="float32",
            truncation=1022, long_sequences="truncate", window_stride=511, per_residue=False)
NS = cache_namespace(**BASE)


def key_of(i: int) -> bytes:
    return sequence_key(f"SEQ{i}")


def value_of(i: int, dim: int = 256) -> dict[str, np.ndarray]:
    """A deterministic entry for key i: a mean row and, for odd i, per-residue rows."""
    rng = np.random.default_rng(i)
    out = {"mean": rng.standard_normal(dim).astype(np.float32)}
    if i % 2:
        out["residues"] = rng.standard_normal((5 + i % 7, dim)).astype(np.float16)
    return out


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        assert got[name].tobytes() == want[name].tobytes()  # bit-exact, NaN payloads included


def test_round_trip_shapes_and_dtypes_bit_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    f16 = rng.standard_normal((3, 7)).astype(np.float16)
    f16[0, 0] = np.float16(np.nan)
    items = {
        b"a" * 32: {"mean": rng.standard_normal(64).astype(np.float32)},
        b"b" * 32: {"mean": rng.standard_normal((2, 64)).astype(np.float16)},
        b"c" * 32: {"mean": rng.standard_normal((4, 64)).astype(np.float32),
                    "residues": rng.standard_normal((30, 4, 64)).astype(np.float16)},
        b"d" * 32: {"residues": f16, "scalar": np.array(3.5, dtype=np.float32)},
        b"e" * 32: {"mean": rng.standard_normal((8, 9)).astype(">f4")[:, ::2]},  # BE, strided
    }
    with EmbeddingCache.open(tmp_path, 64 * MiB, NS) as cache:
        cache.put_many(items.items())
        got = cache.get_many([*items, b"z" * 32])
        assert set(got) == set(items)
        for k, v in items.items():
            for name in v:
                assert np.array_equal(got[k][name], v[name], equal_nan=True)
                assert got[k][name].shape == v[name].shape
        assert_same(got[b"d" * 32], items[b"d" * 32])
        s = cache.stats()
        assert (s.hits, s.misses, s.entries) == (5, 1, 5)


def test_rejects_other_dtypes(tmp_path: Path) -> None:
    with EmbeddingCache.open(tmp_path, 64 * MiB, NS) as cache:
        with pytest.raises(TypeError):
            cache.put_many([(b"k" * 32, {"mean": np.zeros(4, np.float64)})])


CHANGES = {"model_hash": "b" * 64, "layers": [-1, 20], "dtype": "float16",
           "output_dtype": "float16", "truncation": 1000, "long_sequences": "window",
           "window_stride": 256, "per_residue": True}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_other_namespace_is_never_served(tmp_path: Path, field: str) -> None:
    with EmbeddingCache.open(tmp_path, 64 * MiB, NS) as cache:
        cache.put_many((key_of(i), value_of(i)) for i in range(20))
    other = cache_namespace(**{**BASE, field: CHANGES[field]})
    with EmbeddingCache.open(tmp_path, 64 * MiB, other) as cache:
        assert cache.get_many([key_of(i) for i in range(20)]) == {}
        # The same keys under the other namespace are separate entries.
        cache.put_many([(key_of(0), value_of(99))])
        assert_same(cache.get_many([key_of(0)])[key_of(0)], value_of(99))
    with EmbeddingCache.open(tmp_path, 64 * MiB, NS) as cache:
        assert_same(cache.get_many([key_of(0)])[key_of(0)], value_of(0))


def test_persists_across_close_and_open(tmp_path: Path) -> None:
    with EmbeddingCache.open(tmp_path, 64 * MiB, NS) as cache:
        cache.put_many((key_of(i), value_of(i)) for i in range(50))
    with EmbeddingCache.open(tmp_path, 64 * MiB, NS) as cache:
        got = cache.get_many([key_of(i) for i in range(60)])
        assert len(got) == 50 and cache.stats().entries == 50
        for i in range(50):
            assert_same(got[key_of(i)], value_of(i))
    with EmbeddingCache.open(tmp_path, 64 * MiB, NS, readonly=True) as ro:
        assert len(ro.get_many([key_of(i) for i in range(50)])) == 50
        with pytest.raises(RuntimeError):
            ro.put_many([(key_of(0), value_of(0))])


def test_existing_key_is_kept(tmp_path: Path) -> None:
    with EmbeddingCache.open(tmp_path, 64 * MiB, NS) as cache:
        cache.put_many([(key_of(1), value_of(1)), (key_of(1), value_of(2))])
        assert_same(cache.get_many([key_of(1)])[key_of(1)], value_of(1))
        assert cache.stats().entries == 1


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from tests.cache.test_store import key_of, value_of, NS
    from vnpd.cache.store import EmbeddingCache
    cache = EmbeddingCache.open(Path(sys.argv[1]), 1 << 30, NS)
    i = 0
    while True:
        cache.put_many((key_of(j), value_of(j, dim=2048)) for j in range(i, i + 25))
        i += 25
        print(i, flush=True)
""")


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2])
def test_sigkill_mid_write_leaves_no_torn_entry(tmp_path: Path, delay: float) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(ROOT)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert int(proc.stdout.readline()) == 25  # at least one commit happened
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    with EmbeddingCache.open(tmp_path, 1 << 30, NS) as cache:
        n = cache.stats().entries
        assert n >= 25 and n % 25 == 0  # whole transactions only
        got = cache.get_many([key_of(i) for i in range(n + 200)])
        assert sorted(got) == sorted(key_of(i) for i in range(n))
        for i in range(n):
            assert_same(got[key_of(i)], value_of(i, dim=2048))
        s = cache.stats()
        assert s.corrupt_entries == 0 and s.rebuilds == 0


def fill(path: Path, n: int = 200) -> None:
    with EmbeddingCache.open(path, 64 * MiB, NS) as cache:
        cache.put_many((key_of(i), value_of(i, dim=2048)) for i in range(n))


def test_truncated_file_is_rebuilt(tmp_path: Path) -> None:
    fill(tmp_path)
    db = tmp_path / DB_NAME
    with db.open("r+b") as f:
        f.truncate(db.stat().st_size // 2)
    with capture_logs() as logs, EmbeddingCache.open(tmp_path, 64 * MiB, NS) as cache:
        assert cache.get_many([key_of(i) for i in range(200)]) == {}
        assert cache.stats().rebuilds == 1 and cache.stats().entries == 0
        cache.put_many([(key_of(1), value_of(1))])  # usable again
        assert_same(cache.get_many([key_of(1)])[key_of(1)], value_of(1))
    assert any(e["event"] == "cache_corrupt_rebuilt" for e in logs)


def test_garbage_header_is_rebuilt(tmp_path: Path) -> None:
    fill(tmp_path)
    with (tmp_path / DB_NAME).open("r+b") as f:
        f.write(os.urandom(100))
    with capture_logs() as logs, EmbeddingCache.open(tmp_path, 64 * MiB, NS) as cache:
        assert cache.get_many([key_of(0)]) == {} and cache.stats().rebuilds == 1
    assert [e["event"] for e in logs].count("cache_corrupt_rebuilt") == 1


@pytest.mark.parametrize("where", [0.3, 0.5, 0.8])
def test_garbage_in_the_middle_serves_nothing_wrong(tmp_path: Path, where: float) -> None:
    fill(tmp_path)
    db = tmp_path / DB_NAME
    rng = np.random.default_rng(int(where * 10))
    with db.open("r+b") as f:
        f.seek(int(db.stat().st_size * where))
        f.write(rng.bytes(20000))
    with capture_logs() as logs, EmbeddingCache.open(tmp_path, 64 * MiB, NS) as cache:
        got = cache.get_many([key_of(i) for i in range(200)])
        for i in range(200):
            if key_of(i) in got:
                assert_same(got[key_of(i)], value_of(i, dim=2048))
        s = cache.stats()
        assert s.rebuilds + s.corrupt_entries >= 1  # the damage was seen, not ignored
        assert len(got) < 200
    events = {e["event"] for e in logs}
    assert events & {"cache_corrupt_rebuilt", "cache_entry_corrupt"}


def test_bad_entry_checksum_is_a_miss_and_deleted(tmp_path: Path) -> None:
    fill(tmp_path, 10)
    db = sqlite3.connect(tmp_path / DB_NAME)
    rowid, data = db.execute("SELECT e.id, p.data FROM entries e JOIN payloads p ON p.id=e.id "
                             "WHERE e.key=?", (key_of(3),)).fetchone()
    tampered = bytearray(data)
    tampered[len(tampered) // 2] ^= 0x01  # one bit
    db.execute("UPDATE payloads SET data=? WHERE id=?", (bytes(tampered), rowid))
    db.commit()
    db.close()
    with capture_logs() as logs, EmbeddingCache.open(tmp_path, 64 * MiB, NS) as cache:
        got = cache.get_many([key_of(i) for i in range(10)])
        assert key_of(3) not in got and len(got) == 9
        s = cache.stats()
        assert (s.corrupt_entries, s.entries, s.misses, s.rebuilds) == (1, 9, 1, 0)
        assert cache.get_many([key_of(3)]) == {}
        assert cache.stats().corrupt_entries == 1  # deleted: not seen a second time
    assert [e["event"] for e in logs].count("cache_entry_corrupt") == 1


def test_eviction_keeps_file_under_budget_and_respects_lru(tmp_path: Path) -> None:
    budget = 4 * MiB
    hot = [key_of(i) for i in range(10)]
    with EmbeddingCache.open(tmp_path, budget, NS) as cache:
        cache.put_many((key_of(i), value_of(i, dim=1024)) for i in range(10))
        for start in range(10, 3010, 20):
            cache.put_many((key_of(i), value_of(i, dim=1024)) for i in range(start, start + 20))
            assert len(cache.get_many(hot)) == 10  # used all the time: must survive
            assert cache.file_bytes() < budget, start
        s = cache.stats()
        assert s.evictions > 1000 and s.payload_bytes < budget
        got = cache.get_many([key_of(i) for i in range(3010)])
        assert all(k in got for k in hot)
        assert key_of(10) not in got and key_of(3009) in got  # oldest cold gone, newest kept
        survivors = sorted(i for i in range(10, 3010) if key_of(i) in got)
        assert survivors == list(range(survivors[0], 3010))  # evicted strictly oldest first
        for i in survivors[-5:]:
            assert_same(got[key_of(i)], value_of(i, dim=1024))
    assert (tmp_path / DB_NAME).stat().st_size < budget


def test_reopen_with_smaller_budget_shrinks_the_file(tmp_path: Path) -> None:
    with EmbeddingCache.open(tmp_path, 32 * MiB, NS) as cache:
        cache.put_many((key_of(i), value_of(i, dim=2048)) for i in range(1500))
        assert cache.file_bytes() > 8 * MiB
    with EmbeddingCache.open(tmp_path, 4 * MiB, NS) as cache:
        assert cache.file_bytes() < 4 * MiB
        assert cache.stats().entries > 0 and key_of(1499) in cache.get_many([key_of(1499)])


def test_concurrent_readers_with_one_writer(tmp_path: Path) -> None:
    with EmbeddingCache.open(tmp_path, 64 * MiB, NS) as writer:
        writer.put_many((key_of(i), value_of(i)) for i in range(100))
        errors: list[BaseException] = []
        done = threading.Event()
        seen = [0] * 4

        def read(slot: int) -> None:
            try:
                with EmbeddingCache.open(tmp_path, 64 * MiB, NS, readonly=True) as ro:
                    while not done.is_set():
                        got = ro.get_many([key_of(i) for i in range(0, 2000, 3)])
                        for k, v in list(got.items())[:20]:
                            i = next(j for j in range(0, 2000, 3) if key_of(j) == k)
                            assert_same(v, value_of(i))
                        seen[slot] = max(seen[slot], len(got))
            except BaseException as exc:  # reported below, in the test thread
                errors.append(exc)

        readers = [threading.Thread(target=read, args=(n,)) for n in range(4)]
        for t in readers:
            t.start()
        for start in range(100, 2000, 50):
            writer.put_many((key_of(i), value_of(i)) for i in range(start, start + 50))
        done.set()
        for t in readers:
            t.join(30)
        assert not errors, errors
        assert min(seen) >= 34 and writer.stats().entries == 2000


def test_corrupt_file_readonly_raises(tmp_path: Path) -> None:
    from vnpd.cache.store import CacheCorruptError
    fill(tmp_path, 20)
    with (tmp_path / DB_NAME).open("r+b") as f:
        f.write(b"\0" * 100)
    with pytest.raises(CacheCorruptError):
        EmbeddingCache.open(tmp_path, 64 * MiB, NS, readonly=True)


def test_hits_are_checksummed_blobs_not_trusted_rows(tmp_path: Path) -> None:
    """Moving one entry's payload under another key is caught: the key is in the checksum."""
    fill(tmp_path, 4)
    db = sqlite3.connect(tmp_path / DB_NAME)
    a = db.execute("SELECT id FROM entries WHERE key=?", (key_of(0),)).fetchone()[0]
    b = db.execute("SELECT id FROM entries WHERE key=?", (key_of(2),)).fetchone()[0]
    data = db.execute("SELECT data FROM payloads WHERE id=?", (b,)).fetchone()[0]
    db.execute("UPDATE payloads SET data=? WHERE id=?", (data, a))
    db.commit()
    db.close()
    with EmbeddingCache.open(tmp_path, 64 * MiB, NS) as cache:
        got = cache.get_many([key_of(i) for i in range(4)])
        assert key_of(0) not in got and hashlib.sha256(b"").digest() not in got
        assert_same(got[key_of(2)], value_of(2, dim=2048))
