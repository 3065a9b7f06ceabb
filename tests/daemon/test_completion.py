"""How a job ends (vnpd/daemon/completion.py), driven directly: real journal, index, partial
file and outbox; no daemon. The crash points and full disks are in tests/fault_scenarios.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np

from tests.conftest import random_sequences, write_fasta
from vnpd.daemon.completion import JobCompletion
from vnpd.config import Config, PathsConfig
from vnpd.inputs.index import index_fasta
from vnpd.daemon.journal import Journal
from vnpd.daemon.metrics import Metrics
from vnpd.output.hdf5 import PartialOutput
from vnpd.daemon.jobs import ActiveJob
from vnpd.inputs.protein import ProteinSource
from vnpd.workers.pool import ModelInfo
from vnpd.output.verify import read_output


def finished_job(tmp_path: Path, n: int = 30) -> tuple[JobCompletion, ActiveJob, Config]:
    """A job whose rows are all written and committed, ready to publish."""
    cfg = Config(paths=PathsConfig(*(tmp_path / d for d in ("inbox", "outbox", "state",
                                                              "failed"))))
    for d in (cfg.paths.outbox, cfg.paths.failed, cfg.paths.state / "done"):
        d.mkdir(parents=True)
    journal = Journal(cfg.paths.state / "journal.sqlite3")
    source = write_fasta(cfg.paths.state / "claimed-a.fasta",
                         random_sequences([20 + i for i in range(n)]), prefix="r")
    job_id = journal.add_job("a.fasta", source)
    index = index_fasta(source)
    job_dir = cfg.paths.state / "jobs" / str(job_id)
    job_dir.mkdir(parents=True)
    partial = PartialOutput.create(job_dir / "partial.h5", n, 4, "float32")
    partial.write_rows(np.arange(n), np.ones((n, 4)))
    partial.flush()

    async def model() -> ModelInfo:
        return ModelInfo(embed_dim=4, layer=1, attention_backend="exact", max_tokens=1024)
    completion = JobCompletion(cfg, journal, Metrics(), cfg.paths.state / "jobs",
                               cfg.paths.state / "done", model)
    job = ActiveJob(job_id, "a.fasta", ProteinSource(source, index), partial, n, 0)
    return completion, job, cfg


def test_publish_writes_the_ids_from_the_input(tmp_path: Path) -> None:
    completion, job, cfg = finished_job(tmp_path)
    asyncio.run(completion.publish(job))
    _, ids, lengths, attrs = read_output(cfg.paths.outbox / "a.h5")
    assert ids == [f"r{i}" for i in range(30)] and lengths.tolist() == list(range(20, 50))
    assert completion.journal.job(job.job_id).state == "done"
    assert not job.source.path.exists() and (cfg.paths.state / "done" / job.source.path.name).exists()


def test_an_input_changed_after_indexing_fails_its_job_at_publish(tmp_path: Path) -> None:
    """Its writer went on writing after the claim: the ids read at finalize could be
    another file's, so the job goes to failed/ (and the daemon goes on)."""
    completion, job, cfg = finished_job(tmp_path)
    with open(job.source.path, "a") as writer:
        writer.write(">late\nMKV\n")
    asyncio.run(completion.publish(job))
    assert list(cfg.paths.outbox.iterdir()) == []
    report = json.loads((cfg.paths.failed / "a.fasta.error.json").read_text())
    assert "changed after it was indexed" in report["reason"]
    assert (cfg.paths.failed / "a.fasta").exists()
    assert completion.journal.job(job.job_id).state == "failed"


def test_two_failures_of_one_name_at_once_get_two_destinations(tmp_path: Path) -> None:
    completion, first, cfg = finished_job(tmp_path)
    second_source = write_fasta(cfg.paths.state / "claimed-b.fasta", ["MKV"], prefix="s")
    second = completion.journal.add_job("a.fasta", second_source)

    async def both() -> None:
        await asyncio.gather(
            completion.fail_job(first.job_id, "a.fasta", first.source.path, {"reason": "x"}, "x"),
            completion.fail_job(second, "a.fasta", second_source, {"reason": "y"}, "y"))
    asyncio.run(both())
    reports = {json.loads(p.read_text())["job"]: p for p in cfg.paths.failed.glob("*.error.json")}
    assert set(reports) == {first.job_id, second}
    moved = {p.name for p in cfg.paths.failed.iterdir() if not p.name.endswith(".json")}
    assert moved == {"a.fasta", "a.fasta.1"}
    assert (cfg.paths.failed / "a.fasta.1").read_text() != (cfg.paths.failed / "a.fasta").read_text()
    assert {completion.journal.job(j).state for j in (first.job_id, second)} == {"failed"}


def test_failing_a_large_file_leaves_the_event_loop_free(tmp_path: Path) -> None:
    """The refused file is hashed for its report in a thread: a 1 GiB file (sparse, so it
    costs no disk) must not stop the loop, which also serves heartbeats and the inbox."""
    completion, job, cfg = finished_job(tmp_path)
    big = cfg.paths.state / "claimed-big.fasta"
    with open(big, "wb") as fh:
        fh.truncate(1 << 30)
    job_id = completion.journal.add_job("big.fasta", big)

    async def run() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        worst, last, done = 0.0, loop.time(), asyncio.Event()

        async def tick() -> None:
            nonlocal worst, last
            while not done.is_set():
                await asyncio.sleep(0.01)
                worst, last = max(worst, loop.time() - last), loop.time()
        ticker = asyncio.create_task(tick())
        start = loop.time()
        await completion.fail_job(job_id, "big.fasta", big, {"reason": "binary"}, "binary")
        took = loop.time() - start
        done.set()
        await ticker
        return worst, took
    worst, took = asyncio.run(run())
    report = json.loads((cfg.paths.failed / "big.fasta.error.json").read_text())
    assert report["sha256"] and (cfg.paths.failed / "big.fasta").stat().st_size == 1 << 30
    assert worst < 0.25 and worst < took / 2, f"loop stalled {worst:.2f}s of {took:.2f}s"
