"""Tests for vnpd/daemon/cache_writer.py: a real writer process, a real SQLite store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from vnpd.cache.key import cache_namespace, sequence_key
from vnpd.cache.store import EmbeddingCache
from vnpd.daemon import cache_writer
from vnpd.daemon.cache_writer import ROW, CacheWriter
from vnpd.daemon.reuse import RowCache
from vnpd.lifeline import alive

ROOT = Path(__file__).resolve().parents[2]
NS = cache_namespace("b" * 64, layers=[-1], dtype="bfloat16", output_dtype="float32",
                     truncation=1022, long_sequences="truncate", window_stride=511,
                     per_residue=False)
DIM = 64


def batch(first: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys and rows of sequences first..first+n-1, rows distinct per sequence."""
    keys = np.stack([np.frombuffer(sequence_key(f"S{i}"), np.uint8)
                     for i in range(first, first + n)])
    rows = np.random.default_rng(first).standard_normal((n, DIM)).astype(np.float32)
    return keys, rows


def stored(directory: Path, keys: np.ndarray) -> dict[bytes, np.ndarray]:
    cache = EmbeddingCache.open(directory, 64 << 20, NS)
    try:
        return {k: v[ROW] for k, v in cache.get_many([bytes(k) for k in keys]).items()}
    finally:
        cache.close()


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_rows_stored_by_the_writer_process_are_served_bit_exact(tmp_path: Path) -> None:
    cache = RowCache.open(tmp_path, 64 << 20, NS)
    batches = [batch(100 * b, 50) for b in range(3)]
    try:
        for keys, rows in batches:
            cache.store(keys, rows)
            assert not rows.flags.writeable  # queued as they are: nobody may change them
        wait_until(lambda: cache.stats()[1].entries == 150)
        keys, rows = batches[1]
        found = cache.lookup(keys)
        assert sorted(found) == list(range(50))
        np.testing.assert_array_equal(np.stack([found[i] for i in range(50)]), rows)
        assert cache.dropped == 0
    finally:
        cache.close()
    assert not cache.writer._process.is_alive()
    every_key = np.concatenate([k for k, _ in batches])
    assert len(stored(tmp_path, every_key)) == 150


def test_close_writes_what_is_queued_first(tmp_path: Path) -> None:
    writer = CacheWriter.spawn(tmp_path)
    writer.open(64 << 20, NS)
    keys, rows = batch(0, 400)
    for i in range(0, 400, 25):
        assert writer.submit(keys[i:i + 25], rows[i:i + 25])
    writer.close()
    got = stored(tmp_path, keys)
    assert len(got) == 400
    np.testing.assert_array_equal(got[bytes(keys[7])], rows[7])


def test_a_full_queue_drops_rows_instead_of_waiting(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_writer, "QUEUE_BATCHES", 1)
    writer = CacheWriter.spawn(tmp_path)  # not opened: nothing is sent, the queue fills
    keys, rows = batch(0, 4)
    assert writer.submit(keys[:2], rows[:2]) is True
    started = time.monotonic()
    assert writer.submit(keys[2:], rows[2:]) is False
    assert time.monotonic() - started < 0.5
    writer.close()


def test_a_writer_that_dies_is_logged_and_stores_nothing_more(tmp_path: Path) -> None:
    cache = RowCache.open(tmp_path, 64 << 20, NS)
    keys, rows = batch(0, 10)
    try:
        with capture_logs() as logs:
            os.kill(cache.writer._process.pid, signal.SIGKILL)
            wait_until(lambda: any(e["event"] == "cache_writer_died" for e in logs))
        cache.store(keys, rows)
        assert cache.dropped == 10
        assert cache.lookup(keys) == {}  # lookups go on, and miss
    finally:
        cache.close()


def test_a_store_that_cannot_open_raises_and_leaves_no_process(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    writer = CacheWriter.spawn(blocker)
    with pytest.raises(RuntimeError, match="could not open the store"):
        writer.open(64 << 20, NS)
    assert not writer._process.is_alive()


def test_the_writer_ends_when_its_daemon_is_sigkilled(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from vnpd.daemon.cache_writer import CacheWriter
        if __name__ == "__main__":
            writer = CacheWriter.spawn(Path({str(tmp_path)!r}))
            writer.open(64 << 20, {NS!r})
            print("WRITER", writer._process.pid, flush=True)
            time.sleep(60)
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("WRITER"):  # past the log lines on the same stdout
            line = owner.stdout.readline()
            assert line, "the owner ended before it started its writer"
        child = int(line.split()[1])
        assert alive(child)
        owner.kill()
        owner.wait(10)
        wait_until(lambda: not alive(child), timeout=10)
    finally:
        owner.kill()
