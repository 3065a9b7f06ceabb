"""End-to-end: the real daemon with two CPU workers, real files, a real watchdog observer.

Each output is compared with `vnpd embed` on the same file (same engine, one process) and,
for one file, with fair-esm's own ESM2.forward.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import random_sequences
from tests.daemon_harness import Daemon, DaemonDirs, drop, fasta_text, write_config
from tests.compute.families.test_esm2 import fair_esm_means
from vnpd.embed import embed_file
from vnpd.compute.engine import Engine
from vnpd.compute.families.esm2_checkpoint import load_esm2
from vnpd.output.verify import read_output, verify_output

pytestmark = pytest.mark.timeout(600)


@pytest.fixture()
def dirs(tmp_path: Path) -> DaemonDirs:
    return DaemonDirs(tmp_path)


def embed_reference(src: Path, model: Path, tmp: Path) -> np.ndarray:
    out = tmp / f"ref-{src.name}.h5"
    engine = Engine.load(str(model), device="cpu", dtype="float32", max_tokens=2048)
    embed_file(src, out, engine)
    return read_output(out)[0]


def test_bursts_and_singles_all_published_and_equal_to_embed(dirs: DaemonDirs,
                                                              tiny_model: Path) -> None:
    daemon = Daemon(write_config(dirs, tiny_model), dirs)
    try:
        daemon.wait_ready()
        texts = {}
        # A burst of five files at once...
        for i in range(5):
            seqs = random_sequences([3 + 37 * j % 400 for j in range(10 + i * 7)], seed=i)
            texts[f"burst{i}.fasta"] = fasta_text(seqs, prefix=f"b{i}_")
        for name, text in texts.items():
            drop(dirs.inbox, name, text)
        # ...then three one by one.
        for i in range(3):
            name = f"single{i}.fa"
            texts[name] = fasta_text(random_sequences([50, 1, 1100, 7][: i + 2], seed=100 + i))
            drop(dirs.inbox, name, texts[name])
            time.sleep(0.7)
        outputs = daemon.wait_outputs([Path(n).stem + ".h5" for n in texts])
        status_json = subprocess.run(
            [sys.executable, "-m", "vnpd", "status", "--config", str(daemon.config), "--json"],
            capture_output=True, text=True, check=True).stdout
        status = json.loads(status_json)
        assert len(status["workers"]) == 2 and all(w["pid"] for w in status["workers"])
    finally:
        assert daemon.terminate() == 0
    for (name, text), out in zip(texts.items(), outputs):
        verify_output(out)
        src = dirs.root / f"copy-{name}"
        src.write_text(text)
        emb, ids, lengths, attrs = read_output(out)
        np.testing.assert_allclose(emb, embed_reference(src, tiny_model, dirs.root), atol=1e-5)
        assert ids == [line[1:].split()[0] for line in text.splitlines() if line.startswith(">")]
        assert attrs["source_name"] == name and attrs["num_sequences"] == len(ids)
        assert (dirs.state / "done" / next(p.name for p in (dirs.state / "done").iterdir()
                                           if p.name.endswith(name))).exists()
    # fair-esm itself, for one file with a sequence beyond 1022 residues.
    model, alphabet = load_esm2(tiny_model)
    emb, ids, _, _ = read_output(dirs.outbox / "single2.h5")
    seqs = [line for line in texts["single2.fa"].splitlines() if not line.startswith(">")]
    np.testing.assert_allclose(emb, fair_esm_means(model, alphabet, seqs, model.num_layers),
                               atol=1e-5)
    assert not list(dirs.inbox.iterdir())
    summary = daemon.events("job_published")
    assert len(summary) == len(texts) and all("tokens_per_s" in e for e in summary)


def test_small_file_published_while_big_one_runs(dirs: DaemonDirs, tiny_model: Path) -> None:
    daemon = Daemon(write_config(dirs, tiny_model, max_tokens=1024), dirs)
    try:
        daemon.wait_ready()
        big = random_sequences([900] * 400, seed=5)
        drop(dirs.inbox, "big.fasta", fasta_text(big))
        daemon.wait_for(lambda: any(e.get("file") == "big.fasta"
                                    for e in daemon.events("job_started")), 60, "big job start")
        drop(dirs.inbox, "tiny.fasta", ">only\nMKTAYIAKQR\n")
        daemon.wait_outputs(["tiny.h5"], timeout=120)
        assert not (dirs.outbox / "big.h5").exists(), "the small job waited for the big one"
        daemon.wait_outputs(["big.h5"], timeout=400)
    finally:
        assert daemon.terminate() == 0


def test_bad_file_fails_with_reason_and_others_go_on(dirs: DaemonDirs, tiny_model: Path) -> None:
    daemon = Daemon(write_config(dirs, tiny_model), dirs)
    try:
        daemon.wait_ready()
        drop(dirs.inbox, "bad.fasta", ">ok1\nMKV\n>broken\nMK1V\n")
        drop(dirs.inbox, "good.fasta", ">g\nMKVLA\n")
        daemon.wait_outputs(["good.h5"])
        report_path = dirs.failed / "bad.fasta.error.json"
        daemon.wait_for(report_path.exists, 60, "error report")
    finally:
        assert daemon.terminate() == 0
    report = json.loads(report_path.read_text())
    assert report["record"] == "broken" and report["line"] == 4
    assert "'1'" in report["reason"]
    assert report["sha256"] and report["vnpd_version"]
    assert (dirs.failed / "bad.fasta").read_text() == ">ok1\nMKV\n>broken\nMK1V\n"
    assert not (dirs.outbox / "bad.h5").exists()


def test_sigterm_drains_then_restart_resumes_without_recompute(dirs: DaemonDirs,
                                                               tiny_model: Path) -> None:
    seqs = random_sequences([200 + (i * 53) % 800 for i in range(600)], seed=8)
    text = fasta_text(seqs)
    config = write_config(dirs, tiny_model, max_tokens=1024)
    daemon = Daemon(config, dirs)
    daemon.wait_ready()
    drop(dirs.inbox, "long.fasta", text)
    daemon.wait_for(lambda: len(daemon.events("batch_done")) >= 20, 200, "some batches")
    started = time.monotonic()
    assert daemon.terminate(timeout=120) == 0
    assert time.monotonic() - started < 120
    assert daemon.events("daemon_exit")[-1]["code"] == 0
    assert not (dirs.outbox / "long.h5").exists()

    second = Daemon(config, dirs)
    try:
        second.wait_outputs(["long.h5"], timeout=500)
    finally:
        assert second.terminate() == 0
    resumed = [e for e in second.events("job_started") if e.get("file") == "long.fasta"]
    assert resumed and resumed[0]["resumed_sequences"] > 0
    recomputed = sum(e["sequences"] for e in second.events("batch_done"))
    # Only what was not finished before the stop is computed again: nothing twice.
    assert recomputed == len(seqs) - resumed[0]["resumed_sequences"]
    src = dirs.root / "long-copy.fasta"
    src.write_text(text)
    emb, ids, _, _ = read_output(dirs.outbox / "long.h5")
    assert ids == [f"seq{i}" for i in range(len(seqs))]
    np.testing.assert_allclose(emb, embed_reference(src, tiny_model, dirs.root), atol=1e-5)


def test_same_content_is_not_recomputed(dirs: DaemonDirs, tiny_model: Path) -> None:
    daemon = Daemon(write_config(dirs, tiny_model), dirs)
    text = fasta_text(random_sequences([30, 60, 90], seed=4))
    try:
        daemon.wait_ready()
        drop(dirs.inbox, "first.fasta", text)
        daemon.wait_outputs(["first.h5"])
        drop(dirs.inbox, "again.fasta", text)
        daemon.wait_outputs(["again.h5"])
    finally:
        assert daemon.terminate() == 0
    dup = daemon.events("job_duplicate_content")
    assert len(dup) == 1 and dup[0]["file"] == "again.fasta"
    a, b = read_output(dirs.outbox / "first.h5"), read_output(dirs.outbox / "again.h5")
    np.testing.assert_array_equal(a[0], b[0])
    assert b[3]["source_name"] == "again.fasta"
