"""The scheduler with the real local pool's dispatch, a real journal, index and partial
file; only the worker processes are played by this test (their deaths and results).

What is checked is the poison isolation of vnpd/daemon/scheduler.py: a worker dies with every
batch it holds, so only a batch that fails alone is blamed; a poison record ends
quarantined after three deaths, and no bystander is quarantined or computed twice.
"""

from __future__ import annotations

import asyncio

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import random_sequences, write_fasta
from vnpd.inputs.index import index_fasta
from vnpd.daemon.journal import Journal
from vnpd.workers.protocol import WorkerSpec
from vnpd.output.hdf5 import PartialOutput
from vnpd.daemon.jobs import ActiveJob
from vnpd.daemon.scheduler import Scheduler
from vnpd.inputs.protein import ProteinSource
from vnpd.workers.local import LocalPool
from vnpd.workers.restarts import Supervision
from vnpd.workers.pool import Dispatch

BUDGET = 256
DIM = 4


class Bench:
    """One job of ``n`` records served to two 'ready' worker slots of a real LocalPool."""

    def __init__(self, tmp_path: Path, n: int = 60, journal: Journal | None = None) -> None:
        self.source = write_fasta(tmp_path / "a.fasta",
                                  random_sequences([20 + (7 * i) % 40 for i in range(n)]),
                                  prefix="s")
        self.journal = journal or Journal(tmp_path / "journal.sqlite3")
        self.completed: list[ActiveJob] = []
        self.scheduler = Scheduler(self.journal, truncation=1022, max_tokens=BUDGET,
                                   on_poison="quarantine")
        specs = [WorkerSpec(i, "cpu", "m.pt", "float32", -1, 1022, BUDGET, 1.0, "json", "info")
                 for i in range(2)]
        self.supervisor = LocalPool(specs, Supervision(
            heartbeat_timeout_s=30, batch_deadline_base_s=60,
            batch_deadline_per_1k_tokens_s=0, restart_backoff_s=1, restart_backoff_max_s=1,
            crash_budget=99, crash_window_s=60, degraded_retry_s=60))
        for h in self.supervisor.workers:
            h.state, h.max_tokens = "ready", BUDGET
        self.done: list[int] = []   # positions whose rows were written, in order
        self.deaths = 0

    def _collect_finished(self) -> None:
        while not self.scheduler.finished.empty():
            self.completed.append(self.scheduler.finished.get_nowait())

    def add_job(self, job_id: int | None = None) -> ActiveJob:
        index = index_fasta(self.source)
        if job_id is None:
            job_id = self.journal.add_job("a.fasta", self.source)
        partial = self.source.with_name(f"{job_id}.h5")
        out = PartialOutput.open_existing(partial) if partial.exists() else \
            PartialOutput.create(partial, index.num_records, DIM, "float32")
        job = ActiveJob(job_id, "a.fasta", ProteinSource(self.source, index), out,
                        self.journal.job(job_id).next_position, 0)
        self.scheduler.add_job(job)
        return job

    def step(self, poison: str | None) -> None:
        """Dispatch, then each worker finishes its oldest batch, or dies on ``poison``."""
        self.supervisor.dispatch(self.scheduler)
        for h in self.supervisor.workers:
            if not h.inflight:
                continue
            batch_id, dispatch = next(iter(h.inflight.items()))
            if poison in dispatch.batch.ids:
                lost = list(h.inflight.values())
                h.inflight.clear()
                self.deaths += 1
                self.scheduler.batches_lost(lost, "crash")
            else:
                del h.inflight[batch_id]
                self.finish(dispatch)
        asyncio.run(self.scheduler.commit())
        self._collect_finished()

    def finish(self, dispatch: Dispatch) -> None:
        self.done += dispatch.key[1].positions.tolist()
        self.scheduler.batch_done(dispatch, np.ones((len(dispatch.batch.ids), DIM)), "cpu", 0.0)


@pytest.mark.parametrize("poison", [0, 17, 33, 59])
def test_a_poison_record_is_quarantined_alone_after_three_deaths(tmp_path: Path,
                                                                 poison: int) -> None:
    bench = Bench(tmp_path)
    job = bench.add_job()
    for _ in range(500):
        if bench.completed:
            break
        bench.step(f"s{poison}")
    assert bench.completed == [job]
    quarantined = bench.journal.quarantined(job.job_id)
    assert [(q.position, q.record) for q in quarantined] == [(poison, f"s{poison}")]
    # Every other record computed exactly once, bystanders of the deaths included.
    assert sorted(bench.done) == [p for p in range(job.num_records) if p != poison]
    # One death beside other batches, one with its batch alone, one alone; a batch of one
    # sequence skips the middle one.
    assert bench.deaths in (2, 3)


def test_a_suspect_waits_for_an_idle_worker_and_runs_alone(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    bench.add_job()
    bench.supervisor.dispatch(bench.scheduler)
    first, second = bench.supervisor.workers
    assert len(first.inflight) == len(second.inflight) == 3
    lost = list(first.inflight.values())
    first.inflight.clear()
    bench.scheduler.batches_lost(lost, "crash")
    # The dead worker's three batches are suspects now: the busy worker gets nothing
    # more, and the idle one gets exactly one, exclusively.
    bench.supervisor.dispatch(bench.scheduler)
    assert len(second.inflight) == 3 and len(first.inflight) == 1
    (suspect,) = first.inflight.values()
    assert suspect.exclusive
    assert suspect.key[1].positions.tolist() == lost[-1].key[1].positions.tolist()
    # A worker being killed (or exiting after a sticky error) gets nothing at all.
    first.inflight.clear()
    bench.scheduler.batches_lost([suspect], "crash")
    first.kill_reason = "sticky_error"
    bench.supervisor.dispatch(bench.scheduler)
    assert not first.inflight


def test_attempts_survive_a_restart_and_suspects_go_first(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    job = bench.add_job()
    bench.supervisor.dispatch(bench.scheduler)
    first = bench.supervisor.workers[0]
    lost = list(first.inflight.values())
    first.inflight.clear()
    bench.scheduler.batches_lost(lost, "crash")
    suspects = sorted(d.key[1].positions.tolist() for d in lost)
    bench.journal.close()

    # A new daemon: a new scheduler on the same journal.
    again = Bench(tmp_path, journal=Journal(tmp_path / "journal.sqlite3"))
    again.add_job(job.job_id)
    again.supervisor.dispatch(again.scheduler)
    # Both workers are idle: each runs one suspect, alone; nothing else goes out.
    for h in again.supervisor.workers:
        (isolated,) = h.inflight.values()
        assert isolated.exclusive and isolated.key[1].positions.tolist() in suspects


def test_a_commit_journals_only_the_batches_written_before_its_fsync(tmp_path: Path) -> None:
    """The fsync runs in a thread while results go on being written: a batch written
    meanwhile is not journaled as done by that commit (its rows may not be on disk),
    but by the next."""
    bench = Bench(tmp_path)
    job = bench.add_job()
    bench.supervisor.dispatch(bench.scheduler)
    first, second = [d for h in bench.supervisor.workers for d in h.inflight.values()][:2]

    async def commit_while_writing() -> None:
        bench.finish(first)
        commit = asyncio.create_task(bench.scheduler.commit())
        await asyncio.sleep(0)  # the commit is in its fsync thread now
        bench.finish(second)
        await commit

    asyncio.run(commit_while_writing())
    done = set(bench.journal.done_positions(job.job_id).tolist())
    assert done == set(first.key[1].positions.tolist())
    assert job.unflushed == [second.key[1].batch_no]
    asyncio.run(bench.scheduler.commit())
    done = set(bench.journal.done_positions(job.job_id).tolist())
    assert done == set(first.key[1].positions.tolist()) | set(second.key[1].positions.tolist())
    assert job.unflushed == []
