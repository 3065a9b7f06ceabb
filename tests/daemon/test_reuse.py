"""Compute once, end to end: the real daemon with CPU workers, real files, a real cache.

Identical records of a file are computed once; the persistent cache serves sequences of
earlier files, across restarts, and never across models; a SIGKILL loses nothing and leaves
no torn entry; the store stays under its size bound. Every row is checked against fair-esm.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.compute.families.test_esm2 import fair_esm_means
from tests.conftest import random_sequences
from tests.daemon_harness import Daemon, DaemonDirs, drop, fasta_text, write_config
from vnpd.cache.store import DB_NAME
from vnpd.compute.families.esm2_checkpoint import load_esm2, make_test_model
from vnpd.output.verify import read_output, verify_output

pytestmark = pytest.mark.timeout(600)


def expected_rows(model: Path, sequences: list[str]) -> np.ndarray:
    reference, alphabet = load_esm2(model)
    distinct = sorted(set(sequences))
    means = fair_esm_means(reference, alphabet, distinct, reference.num_layers)
    row = {s: means[i] for i, s in enumerate(distinct)}
    return np.stack([row[s] for s in sequences])


@dataclass(frozen=True)
class Page:
    offset: int
    size: int


def live_page_near_middle(db: Path, table: str) -> Page:
    """The page of ``table``'s b-tree nearest the middle of the file (SQLite's dbstat)."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        size = int(con.execute("PRAGMA page_size").fetchone()[0])
        pages = [int(r[0]) for r in con.execute("SELECT pageno FROM dbstat WHERE name=?", (table,))]
    assert pages, f"{table} has no pages in {db}"
    middle = db.stat().st_size // size // 2
    return Page(offset=(min(pages, key=lambda n: abs(n - middle)) - 1) * size, size=size)


def shuffled_repeats(distinct: list[str], copies: int, seed: int) -> list[str]:
    rows = [s for s in distinct for _ in range(copies)]
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order]


def publish(daemon: Daemon, dirs: DaemonDirs, name: str, sequences: list[str],
            prefix: str) -> tuple[np.ndarray, list[str], dict]:
    drop(dirs.inbox, name, fasta_text(sequences, prefix=prefix))
    out, = daemon.wait_outputs([Path(name).stem + ".h5"])
    verify_output(out)
    emb, ids, _, attrs = read_output(out)
    assert ids == [f"{prefix}{i}" for i in range(len(sequences))]
    return emb, ids, attrs


def counts(attrs: dict) -> tuple[int, int, int]:
    return (int(attrs["computed_sequences"]), int(attrs["cache_hits"]),
            int(attrs["duplicate_records"]))


def test_computed_once_within_a_file_across_files_and_restarts_never_across_models(
        tmp_path: Path, tiny_model: Path) -> None:
    dirs = DaemonDirs(tmp_path)
    distinct = random_sequences([1 + (37 * i) % 300 for i in range(150)], seed=21)
    first = shuffled_repeats(distinct, 4, seed=1)            # 600 records, 150 distinct
    new = random_sequences([5 + i for i in range(50)], seed=22)
    second = distinct[::-1] + new                             # 150 shared under other ids
    config = write_config(dirs, tiny_model, max_tokens=1024)
    daemon = Daemon(config, dirs)
    try:
        daemon.wait_ready()
        emb, _, attrs = publish(daemon, dirs, "first.fasta", first, "a")
        assert counts(attrs) == (150, 0, 450)
        np.testing.assert_allclose(emb, expected_rows(tiny_model, first), atol=1e-5)
        emb, _, attrs = publish(daemon, dirs, "second.fasta", second, "b")
        assert counts(attrs) == (50, 150, 0)
        np.testing.assert_allclose(emb, expected_rows(tiny_model, second), atol=1e-5)
        published = daemon.events("job_published")
        assert [(e["computed_sequences"], e["cache_hits"]) for e in published] == \
            [(150, 0), (50, 150)]
    finally:
        assert daemon.terminate() == 0

    third = distinct[:30] + random_sequences([40] * 10, seed=23)
    daemon = Daemon(config, dirs)  # a restart: the cache is on disk
    try:
        daemon.wait_ready()
        emb, _, attrs = publish(daemon, dirs, "third.fasta", third, "c")
        assert counts(attrs) == (10, 30, 0)
        np.testing.assert_allclose(emb, expected_rows(tiny_model, third), atol=1e-5)
    finally:
        assert daemon.terminate() == 0

    # Another checkpoint of the same shape: a served row would be a wrong row.
    other, _ = make_test_model(tmp_path / "esm2_other.pt", layers=2, dim=64, heads=4, seed=8)
    daemon = Daemon(write_config(dirs, other, max_tokens=1024), dirs)
    try:
        daemon.wait_ready()
        emb, _, attrs = publish(daemon, dirs, "fourth.fasta", distinct[:40], "d")
        assert counts(attrs) == (40, 0, 0)
        np.testing.assert_allclose(emb, expected_rows(other, distinct[:40]), atol=1e-5)
    finally:
        assert daemon.terminate() == 0


def test_sigkill_while_the_cache_is_written_loses_nothing(tmp_path: Path,
                                                          tiny_model: Path) -> None:
    dirs = DaemonDirs(tmp_path)
    sequences = random_sequences([20 + (13 * i) % 200 for i in range(400)], seed=31)
    config = write_config(dirs, tiny_model, max_tokens=1024)  # many small batches
    daemon = Daemon(config, dirs)
    try:
        daemon.wait_ready()
        drop(dirs.inbox, "big.fasta", fasta_text(sequences, prefix="k"))
        daemon.wait_for(lambda: len(daemon.events("batch_done")) >= 10, 120, "10 batches")
        os.kill(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait(30)
    finally:
        daemon.kill()
    daemon = Daemon(config, dirs)
    try:
        out, = daemon.wait_outputs(["big.h5"])
        emb, ids, _, attrs = read_output(out)
        assert ids == [f"k{i}" for i in range(400)]  # none lost, none twice
        np.testing.assert_allclose(emb, expected_rows(tiny_model, sequences), atol=1e-5)
        # Every entry that survived is whole: served again, it equals fair-esm.
        emb, _, attrs = publish(daemon, dirs, "again.fasta", sequences, "g")
        assert int(attrs["cache_hits"]) > 0
        np.testing.assert_allclose(emb, expected_rows(tiny_model, sequences), atol=1e-5)
        assert not daemon.events("cache_entry_corrupt")
    finally:
        assert daemon.terminate() == 0


def test_the_store_stays_under_its_bound_and_a_corrupt_one_is_rebuilt(tmp_path: Path,
                                                                      tiny_model: Path) -> None:
    dirs = DaemonDirs(tmp_path)
    max_bytes = 2 << 20
    config = write_config(dirs, tiny_model, max_tokens=2048,
                          extra=f"[cache]\nmax_gb = {max_bytes / (1 << 30)!r}\n")
    sequences = random_sequences([8 + i % 50 for i in range(12000)], seed=41)
    daemon = Daemon(config, dirs)
    try:
        daemon.wait_ready()
        emb, _, attrs = publish(daemon, dirs, "many.fasta", sequences, "m")
        assert counts(attrs) == (len(set(sequences)), 0, len(sequences) - len(set(sequences)))
    finally:
        assert daemon.terminate() == 0
    store = dirs.state / "cache"
    on_disk = sum(p.stat().st_size for p in store.glob(DB_NAME + "*") if not p.name.endswith("shm"))
    assert on_disk <= max_bytes, f"{on_disk} bytes on disk for a bound of {max_bytes}"

    # Garbage over a live page in the middle of the store: detected and rebuilt, nothing
    # wrong served. (Garbage on a free page is no damage at all: SQLite never reads it.)
    db = store / DB_NAME
    page = live_page_near_middle(db, "entries")
    with open(db, "r+b") as f:
        f.seek(page.offset)
        f.write(b"\xff" + os.urandom(page.size - 1))  # 0xff: no valid b-tree page type
    daemon = Daemon(config, dirs)
    try:
        daemon.wait_ready()
        few = sequences[:50]
        emb, _, attrs = publish(daemon, dirs, "few.fasta", few, "f")
        np.testing.assert_allclose(emb, expected_rows(tiny_model, few), atol=1e-5)
        assert daemon.events("cache_corrupt_rebuilt")
    finally:
        assert daemon.terminate() == 0
