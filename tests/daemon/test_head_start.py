"""The head start (vnpd/daemon/head_start.py): a claimed file's first proteins computed
while it is indexed, and their rows handed to its job.

Unit tests use a real RowSharing, a real journal and real jobs (an indexed FASTA file, its
repeat keys, a real partial HDF5 file); the workers are played by the tests, which return
for each record a row that only its residues determine; where a cache is needed it is the
real RowCache (its SQLite store and writer process). The scheduler-level tests run the
real Scheduler, and the copy test the real Intake and JobCompletion. The end-to-end tests run the real daemon with real worker processes and
compare its output with the same file computed with ``[jobs] head_start = "off"``.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from tests.conftest import random_sequences, write_fasta
from tests.daemon.test_scheduler import BUDGET, DIM
from tests.daemon_harness import Daemon, DaemonDirs, drop, fasta_text, write_config
from tests.inputs.test_nucleotide import phage_like
from vnpd.cache.key import cache_namespace
from vnpd.compute.windows import PieceIndex
from vnpd.config import Config, PathsConfig
from vnpd.daemon.completion import JobCompletion
from vnpd.daemon.head_start import HeadKey, HeadStart
from vnpd.daemon.indexing import build_source
from vnpd.daemon.intake import Intake
from vnpd.daemon.jobs import ActiveJob, QueuedBatch
from vnpd.daemon.journal import Journal
from vnpd.daemon.metrics import Metrics
from vnpd.daemon.reuse import RowCache
from vnpd.daemon.scheduler import Scheduler
from vnpd.daemon.sharing import RowSharing
from vnpd.faults import FaultPlan
from vnpd.inputs.duplicates import row_key
from vnpd.inputs.protein import ProteinSource
from vnpd.inputs.source import SourceSettings
from vnpd.output.hdf5 import PartialOutput
from vnpd.output.schema import EMBEDDINGS
from vnpd.output.verify import read_output, verify_output
from vnpd.workers.pool import (BatchDone, BatchesLost, BatchFailed, Dispatch, ModelInfo,
                               Outcome)

TRUNCATION = 60
EVERYTHING = 10**9  # a peek budget no test file reaches
CACHE_NAMESPACE = cache_namespace("c" * 64, layers=[-1], dtype="float32", output_dtype="float32",
                                  truncation=TRUNCATION, long_sequences="truncate",
                                  window_stride=TRUNCATION // 2, per_residue=False)


def row_of(sequence: str) -> np.ndarray:
    """The row a worker returns for ``sequence``: one that only its residues determine."""
    digest = hashlib.sha256(sequence.upper()[:TRUNCATION].encode()).digest()
    return np.frombuffer(digest[:DIM], dtype=np.uint8).astype(np.float32)


def computed_rows(dispatch: Dispatch, sequences: dict[str, str], shift: float = 0.0
                  ) -> np.ndarray:
    """What a worker returns for ``dispatch`` (its records by id), plus ``shift``."""
    return np.stack([row_of(sequences[rid]) for rid in dispatch.batch.ids]) + shift


def indexed_job(tmp_path: Path, journal: Journal, sequences: list[str], name: str = "a.fasta",
                stride: int | None = None) -> ActiveJob:
    """A job as intake makes one: journaled, indexed with its repeat keys, its partial
    file created. ``stride``: window mode (keys of all residues)."""
    stem = Path(name).stem
    path = write_fasta(tmp_path / name, sequences, prefix=f"{stem}_")
    job_id = journal.add_job(name, path)
    source, duplicates = build_source(ProteinSource, path, tmp_path / f"index-{stem}",
                                      SourceSettings(), None if stride else TRUNCATION)
    pieces = PieceIndex.plan(source.lengths, TRUNCATION, stride)
    partial = PartialOutput.create(tmp_path / f"{stem}.h5", source.num_rows, DIM, "float32")
    return ActiveJob(job_id, name, source, partial, 0,
                     int(pieces.row_tokens(0, source.num_rows).sum()),
                     duplicates=duplicates, pieces=pieces)


def records(job: ActiveJob) -> dict[str, str]:
    """The job's records by id."""
    return {r.id: r.sequence for r in job.source.rows()}


def peek(job: ActiveJob, max_tokens: int = EVERYTHING) -> list[tuple[str, str]]:
    return ProteinSource.peek(job.source.path, SourceSettings(), max_tokens, TRUNCATION)


def written_rows(job: ActiveJob) -> np.ndarray:
    """Every row of the job's partial file (NaN: not written); closes the file."""
    job.partial.flush()
    job.partial.close()
    with h5py.File(job.partial.path, "r") as f:
        return f[EMBEDDINGS][:]


def head_scheduler(journal: Journal) -> Scheduler:
    scheduler = Scheduler(journal, truncation=TRUNCATION, max_tokens=BUDGET,
                          on_poison="quarantine")
    assert scheduler.sharing is not None
    scheduler.head = HeadStart(TRUNCATION, scheduler.sharing)
    return scheduler


def take_all(scheduler: Scheduler) -> list[Dispatch]:
    """Every batch the scheduler has now, as idle workers take them."""
    taken = []
    while (dispatch := scheduler.take_batch(BUDGET)) is not None:
        taken.append(dispatch)
    return taken


def run_to_the_end(scheduler: Scheduler, job: ActiveJob, dispatches: list[Dispatch]) -> None:
    """Play the workers: compute ``dispatches`` and whatever follows, commit, until
    ``job`` is finished."""
    sequences = records(job)
    for _ in range(20):
        for dispatch in dispatches:
            scheduler.apply(BatchDone(dispatch, computed_rows(dispatch, sequences), "cpu", 0.0))
        asyncio.run(scheduler.commit())
        if not scheduler.finished.empty():
            assert scheduler.finished.get_nowait() is job
            return
        dispatches = take_all(scheduler)
    raise AssertionError("the job never finished")


@pytest.fixture()
def journal(tmp_path: Path) -> Journal:
    return Journal(tmp_path / "journal.sqlite3")


# HeadStart alone -------------------------------------------------------------------------

def test_add_queues_the_new_whole_rows_of_files_being_indexed_only() -> None:
    head = HeadStart(TRUNCATION, RowSharing())
    short, other, third, fourth = random_sequences([20, 35, 48, 30], seed=1)
    exact, long = random_sequences([TRUNCATION, TRUNCATION + 1], seed=2)
    assert head.add(1, [("a", short)]) == 0  # never opened (claimed)
    head.open(1)
    assert head.add(1, [("a", short), ("long", long), ("empty", ""), ("exact", exact),
                        ("again", short), ("lower", short.lower()), ("b", other)]) == 3
    head.open(2)
    assert head.add(2, [("c", other), ("d", third)]) == 1  # job 1 queued "other" already
    head.open(3)
    head.started(3)  # indexed before its peek came back: it packs its rows itself
    assert head.add(3, [("e", fourth)]) == 0
    assert head.pending() == 4
    dispatch = head.take_batch(EVERYTHING, batch_id=1)
    assert dispatch is not None and head.pending() == 0
    assert dispatch.batch.ids == ("a", "exact", "b", "d")
    assert dispatch.key.jobs == (1, 1, 1, 2)
    assert head.add(1, [("a2", short)]) == 0  # in flight: not queued again


def test_head_batches_keep_to_the_budget_carry_ids_and_lend_their_rows(
        tmp_path: Path, journal: Journal) -> None:
    sequences = random_sequences([20, 30, 50, 10, 40], seed=3)
    sharing = RowSharing()
    head = HeadStart(TRUNCATION, sharing)
    head.open(1)
    head.add(1, [(f"p{i}", s) for i, s in enumerate(sequences)])
    first = head.take_batch(60, batch_id=7)   # 22 + 32 tokens; 52 more would pass 60
    second = head.take_batch(30, batch_id=8)  # 52 tokens: over, but a batch has one row
    third = head.take_batch(60, batch_id=9)
    assert head.take_batch(60, batch_id=10) is None
    batches = [first, second, third]
    assert all(d is not None and isinstance(d.key, HeadKey) for d in batches)
    # Record ids travel with the batch: the test fault plan finds records by them.
    assert [d.batch.ids for d in batches] == [("p0", "p1"), ("p2",), ("p3", "p4")]
    assert [d.tokens for d in batches] == [54, 52, 54]
    assert [d.batch_id for d in batches] == [7, 8, 9]
    assert first.key.keys == tuple(row_key(s, TRUNCATION) for s in sequences[:2])
    lenders = [d.key.lender for d in batches]
    assert all(lender < 0 for lender in lenders) and len(set(lenders)) == 3
    # A job with these rows borrows them from the head batches, as from a job.
    job = indexed_job(tmp_path, journal, [sequences[1], "MKVLAAGIVG", sequences[3]])
    assert sharing.lenders_of(job, np.arange(3)).tolist() == [True, False, True]
    assert sharing.lent_by_head(job, np.arange(3)).tolist() == [True, False, True]
    for dispatch in batches:
        head.done(dispatch, np.zeros((len(dispatch.batch.ids), DIM), np.float32), {}, journal)
    assert len(sharing) == 0  # back: nothing is lent any more


def no_hits() -> tuple[np.ndarray, np.ndarray]:
    """A window's cache hits when the cache has none: what split_window returns then."""
    return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)


def test_rows_that_come_back_wait_for_jobs_still_claimed_or_running(
        tmp_path: Path, journal: Journal) -> None:
    sequences = random_sequences([20 + 5 * i for i in range(6)], seed=4)
    reader = indexed_job(tmp_path, journal, sequences)  # has every row: takes what waits
    head = HeadStart(TRUNCATION, RowSharing())
    claimed, running, gone = 101, reader.job_id, 102
    for job_id in (claimed, running, gone):
        head.open(job_id)
    head.add(claimed, [("a0", sequences[0]), ("a1", sequences[1])])
    head.add(running, [("b0", sequences[2])])
    head.add(gone, [("c0", sequences[3])])
    dispatch = head.take_batch(EVERYTHING, batch_id=1)
    assert dispatch is not None
    head.started(running)  # indexed meanwhile
    head.forget(gone)      # failed to index meanwhile
    rows = np.stack([row_of(s) for s in sequences[:4]])
    head.done(dispatch, rows, {running: reader}, journal)
    assert head.computed == 4
    mine, mine_rows, rest, hit, hit_rows = head.split(reader, np.arange(6), 0, *no_hits())
    # Its own row is computed for it; the claimed file's rows are served to it, as cache
    # hits; the row of the job that left is not there any more.
    assert mine.tolist() == [2]
    np.testing.assert_array_equal(mine_rows, rows[2:3])
    assert hit.tolist() == [0, 1]
    np.testing.assert_array_equal(hit_rows, rows[:2])
    assert rest.tolist() == [3, 4, 5]
    assert head.taken == 3


def test_a_head_batch_with_a_row_that_is_not_finite_keeps_none_of_its_rows(
        tmp_path: Path, journal: Journal) -> None:
    sequences = random_sequences([20, 30, 40], seed=12)
    reader = indexed_job(tmp_path, journal, sequences)
    sharing = RowSharing()
    head = HeadStart(TRUNCATION, sharing)
    head.open(reader.job_id)
    head.add(reader.job_id, [(f"p{i}", s) for i, s in enumerate(sequences)])
    dispatch = head.take_batch(EVERYTHING, batch_id=1)
    assert dispatch is not None and len(sharing) == 3
    rows = np.stack([row_of(s) for s in sequences])
    rows[1, 2] = np.inf
    head.done(dispatch, rows, {}, journal)
    assert head.computed == 0 and len(sharing) == 0
    mine, _, rest, hit, _ = head.split(reader, np.arange(3), 0, *no_hits())
    assert mine.tolist() == [] and hit.tolist() == [] and rest.tolist() == [0, 1, 2]
    # Its keys are free again: a later claim may queue them.
    head.open(77)
    assert head.add(77, [("q", sequences[1])]) == 1


def test_started_drops_only_that_jobs_pending_rows_and_forget_its_ready_rows(
        tmp_path: Path, journal: Journal) -> None:
    sequences = random_sequences([20, 25, 30, 35], seed=5)
    reader = indexed_job(tmp_path, journal, sequences)
    one, two, three, four = 201, 202, reader.job_id, 204
    head = HeadStart(TRUNCATION, RowSharing())
    for job_id in (one, two, three):
        head.open(job_id)
    head.add(one, [("a0", sequences[0]), ("a1", sequences[1])])
    head.add(two, [("b0", sequences[2])])
    head.add(three, [("c0", sequences[3])])
    head.started(one)
    assert head.pending() == 2
    dispatch = head.take_batch(EVERYTHING, batch_id=1)
    assert dispatch is not None and dispatch.batch.ids == ("b0", "c0")
    head.open(four)  # job one's rows are no longer queued: another file may queue them
    assert head.add(four, [("d0", sequences[0])]) == 1
    head.done(dispatch, np.stack([row_of(s) for s in sequences[2:]]), {}, journal)
    head.forget(two)  # left: its ready row is dropped; job three's waits
    head.open(205)    # the dropped row's key is free again; the waiting one's is not
    assert head.add(205, [("e0", sequences[2]), ("e1", sequences[3])]) == 1
    head.started(205)
    mine, rows, rest, hit, _ = head.split(reader, np.arange(4), 0, *no_hits())
    assert mine.tolist() == [3] and hit.tolist() == [] and rest.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(rows, [row_of(sequences[3])])


def test_forget_drops_the_ready_rows_of_the_job_only(tmp_path: Path, journal: Journal
                                                     ) -> None:
    sequences = random_sequences([20, 25, 30], seed=15)
    reader = indexed_job(tmp_path, journal, sequences)
    head = HeadStart(TRUNCATION, RowSharing())
    for job_id in (301, 302):
        head.open(job_id)
    head.add(301, [("a0", sequences[0]), ("a1", sequences[1])])
    head.add(302, [("b0", sequences[2])])
    dispatch = head.take_batch(EVERYTHING, batch_id=1)
    assert dispatch is not None
    head.done(dispatch, np.stack([row_of(s) for s in sequences]), {}, journal)
    head.forget(301)  # published as a copy, say: it will never take its rows
    _, _, rest, hit, hit_rows = head.split(reader, np.arange(3), 0, *no_hits())
    assert hit.tolist() == [2] and rest.tolist() == [0, 1]
    np.testing.assert_array_equal(hit_rows, [row_of(sequences[2])])
    # Taken as served, it stays for its owner, which computes nothing of it again.
    _, _, rest, hit, _ = head.split(reader, np.arange(3), 0, *no_hits())
    assert hit.tolist() == [2] and rest.tolist() == [0, 1]


def test_split_takes_the_rows_that_came_back_once_and_leaves_the_rest(
        tmp_path: Path, journal: Journal) -> None:
    sequences = random_sequences([25] * 8, seed=6)
    job = indexed_job(tmp_path, journal, sequences)
    head = HeadStart(TRUNCATION, RowSharing())
    head.open(job.job_id)
    head.add(job.job_id, [("x", sequences[2]), ("y", sequences[5]), ("z", sequences[7])])
    dispatch = head.take_batch(EVERYTHING, batch_id=1)
    assert dispatch is not None
    head.done(dispatch, np.stack([row_of(sequences[i]) for i in (2, 5, 7)]), {job.job_id: job},
              journal)
    compute = np.array([0, 1, 3, 4])  # local indices of a window from row 2: rows 2 3 5 6
    cached, cached_rows = np.array([2]), np.full((1, DIM), 7.0, np.float32)  # row 4: a hit
    mine, rows, rest, hit, hit_rows = head.split(job, compute, 2, cached, cached_rows)
    assert mine.tolist() == [0, 3] and rest.tolist() == [1, 4]
    np.testing.assert_array_equal(rows, [row_of(sequences[2]), row_of(sequences[5])])
    assert hit.tolist() == [2]  # its own rows are no hits: the cache hits are left as they are
    np.testing.assert_array_equal(hit_rows, cached_rows)
    mine, rows, rest, hit, _ = head.split(job, compute, 2, *no_hits())  # taken: not twice
    assert mine.tolist() == [] and hit.tolist() == [] and rest.tolist() == compute.tolist()
    mine, rows, rest, hit, _ = head.split(job, np.array([0]), 7, *no_hits())
    assert mine.tolist() == [0] and rest.tolist() == [] and hit.tolist() == []
    assert head.taken == 3


def test_split_serves_the_rows_queued_for_another_job_as_cache_hits(
        tmp_path: Path, journal: Journal) -> None:
    sequences = random_sequences([25] * 8, seed=16)
    job = indexed_job(tmp_path, journal, sequences)
    head = HeadStart(TRUNCATION, RowSharing())
    other = job.job_id + 100  # a file still being indexed
    for job_id in (job.job_id, other):
        head.open(job_id)
    head.add(other, [("x", sequences[2]), ("y", sequences[5])])
    head.add(job.job_id, [("z", sequences[3]), ("again", sequences[5])])  # y: other's
    dispatch = head.take_batch(EVERYTHING, batch_id=1)
    assert dispatch is not None and dispatch.key.jobs == (other, other, job.job_id)
    rows = np.stack([row_of(sequences[i]) for i in (2, 5, 3)])
    head.done(dispatch, rows, {job.job_id: job}, journal)
    compute = np.array([0, 1, 3, 4])  # window from row 2: rows 2 3 5 6
    cached, cached_rows = np.array([2]), np.full((1, DIM), 7.0, np.float32)  # row 4: a hit
    mine, mine_rows, rest, hit, hit_rows = head.split(job, compute, 2, cached, cached_rows)
    assert mine.tolist() == [1] and rest.tolist() == [4]
    np.testing.assert_array_equal(mine_rows, rows[2:3])
    # The cache's hits first, then the other job's rows, each with its row.
    assert hit.tolist() == [2, 0, 3]
    np.testing.assert_array_equal(hit_rows, np.concatenate([cached_rows, rows[:2]]))
    # Without cache hits the served rows alone.
    head.open(other + 1)
    head.add(other + 1, [("w", sequences[6])])
    dispatch = head.take_batch(EVERYTHING, batch_id=2)
    assert dispatch is not None
    head.done(dispatch, row_of(sequences[6])[None], {}, journal)
    mine, _, rest, hit, hit_rows = head.split(job, np.array([4]), 2, *no_hits())
    assert mine.tolist() == [] and rest.tolist() == [] and hit.tolist() == [4]
    np.testing.assert_array_equal(hit_rows, row_of(sequences[6])[None])
    assert head.taken == 4


def test_split_never_takes_a_row_the_job_computes_in_windows(
        tmp_path: Path, journal: Journal) -> None:
    short, long = random_sequences([40, 80], seed=7)
    job = indexed_job(tmp_path, journal, [short, long], stride=30)
    # A head whose truncation covers the long row whole: its key is then the window-mode
    # job's key (all residues), but the job computes that row as windows.
    head = HeadStart(1022, RowSharing())
    head.open(job.job_id)
    head.add(job.job_id, [("long", long), ("short", short)])
    dispatch = head.take_batch(EVERYTHING, batch_id=1)
    assert dispatch is not None
    head.done(dispatch, np.stack([row_of(long), row_of(short)]), {}, journal)
    mine, rows, rest, hit, _ = head.split(job, np.arange(2), 0, *no_hits())
    assert mine.tolist() == [0] and rest.tolist() == [1] and hit.tolist() == []
    np.testing.assert_array_equal(rows, [row_of(short)])


def test_take_outcome_takes_the_head_batches_and_returns_the_jobs(
        tmp_path: Path, journal: Journal) -> None:
    scheduler = head_scheduler(journal)
    head = scheduler.head
    assert head is not None
    sequences = random_sequences([20, 30, 40, 25], seed=8)
    head.open(99)
    head.add(99, [(f"h{i}", s) for i, s in enumerate(sequences)])
    heads = [head.take_batch(30, batch_id=i) for i in range(4)]  # one row each
    job = indexed_job(tmp_path, journal, random_sequences([30] * 20, seed=9))
    scheduler.add_job(job)
    own = take_all(scheduler)
    assert len(own) >= 2 and all(isinstance(d.key, tuple) for d in own)
    assert all(d is not None for d in heads)

    def take(outcome: Outcome) -> Outcome | None:
        return head.take_outcome(outcome, scheduler.jobs, journal)

    rows = np.zeros((1, DIM), np.float32)
    assert take(BatchDone(heads[0], rows, "cpu", 0.0)) is None
    assert head.computed == 1
    assert take(BatchFailed(heads[1], "batch", "boom")) is None
    for outcome in (BatchDone(own[0], rows, "cpu", 0.0), BatchFailed(own[0], "oom", "x"),
                    BatchesLost([own[0], own[1]], "crash")):
        assert take(outcome) is outcome
    left = take(BatchesLost([own[0], heads[2], own[1]], "crash"))
    assert isinstance(left, BatchesLost)
    assert left.dispatches == [own[0], own[1]] and left.reason == "crash"
    assert take(BatchesLost([heads[3]], "shutdown")) is None
    assert head.computed == 1  # failed and lost head batches computed nothing


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Until ``predicate()``: the cache stores rows in a process of its own."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def key_array(sequences: list[str]) -> np.ndarray:
    """The repeat keys of ``sequences``, as the cache takes them ((k, 32) uint8)."""
    return np.frombuffer(b"".join(row_key(s, TRUNCATION) for s in sequences),
                         dtype=np.uint8).reshape(len(sequences), 32)


@pytest.fixture()
def row_cache(tmp_path: Path) -> Iterator[RowCache]:
    """A real cache: its SQLite store, and the writer process that stores into it."""
    cache = RowCache.open(tmp_path / "cache", 64 << 20, CACHE_NAMESPACE)
    try:
        yield cache
    finally:
        cache.close()


def test_add_leaves_to_the_jobs_the_rows_a_job_computes_now_or_the_cache_holds(
        tmp_path: Path, journal: Journal, row_cache: RowCache) -> None:
    sequences = random_sequences([20 + 3 * i for i in range(12)], seed=13)
    scheduler = head_scheduler(journal)
    head, sharing = scheduler.head, scheduler.sharing
    assert head is not None and sharing is not None
    running = indexed_job(tmp_path, journal, sequences[:4])
    scheduler.add_job(running)
    in_flight = take_all(scheduler)  # its window is read: it lends those rows now
    assert in_flight and all(sharing.is_lent(row_key(s, TRUNCATION)) for s in sequences[:4])
    row_cache.store(key_array(sequences[4:7]), np.stack([row_of(s) for s in sequences[4:7]]))
    wait_until(lambda: len(row_cache.lookup(key_array(sequences[4:7]))) == 3)
    head.open(901)
    assert head.add(901, [(f"n{i}", s) for i, s in enumerate(sequences)], row_cache) == 5
    dispatch = head.take_batch(EVERYTHING, batch_id=1)
    assert dispatch is not None
    assert dispatch.batch.ids == ("n7", "n8", "n9", "n10", "n11")
    # Without the cache the cached rows are queued; the running job's rows never are.
    head.open(902)
    assert head.add(902, [(f"m{i}", s) for i, s in enumerate(sequences)]) == 3
    assert head.take_batch(EVERYTHING, batch_id=2).batch.ids == ("m4", "m5", "m6")


def test_rows_whose_job_left_are_stored_in_the_cache_and_the_others_kept(
        tmp_path: Path, journal: Journal, row_cache: RowCache) -> None:
    sequences = random_sequences([20, 30, 40, 50], seed=14)
    reader = indexed_job(tmp_path, journal, sequences)
    head = HeadStart(TRUNCATION, RowSharing())
    for job_id in (reader.job_id, 902):
        head.open(job_id)
    head.add(902, [("g0", sequences[0]), ("g1", sequences[1])])
    head.add(reader.job_id, [("r2", sequences[2]), ("r3", sequences[3])])
    dispatch = head.take_batch(EVERYTHING, batch_id=1)
    assert dispatch is not None
    head.forget(902)  # left while its head batch ran (failed to index, say)
    rows = np.stack([row_of(s) for s in sequences])
    assert head.take_outcome(BatchDone(dispatch, rows, "cpu", 0.0), {}, journal,
                             row_cache) is None
    wait_until(lambda: len(row_cache.lookup(key_array(sequences[:2]))) == 2)
    found = row_cache.lookup(key_array(sequences[:2]))
    np.testing.assert_array_equal(np.stack([found[0], found[1]]), rows[:2])
    # The rows of the job still claimed wait for it, not in the cache: a hit there would
    # count as served.
    assert row_cache.lookup(key_array(sequences[2:])) == {}
    assert row_cache.stats()[1].entries == 2
    mine, mine_rows, rest, hit, _ = head.split(reader, np.arange(4), 0, *no_hits())
    assert mine.tolist() == [2, 3] and rest.tolist() == [0, 1] and hit.tolist() == []
    np.testing.assert_array_equal(mine_rows, rows[2:])


def test_loan_tokens_counts_a_head_row_as_computed_for_its_owner_only(
        tmp_path: Path, journal: Journal) -> None:
    sequences = random_sequences([20, 30, 40, 50, 25], seed=17)
    owner = indexed_job(tmp_path, journal, sequences[:4], name="a.fasta")
    other = indexed_job(tmp_path, journal, sequences[:4] + sequences[4:], name="b.fasta")
    lender = indexed_job(tmp_path, journal, [sequences[3]], name="c.fasta")
    sharing = RowSharing()
    head = HeadStart(TRUNCATION, sharing)
    head.open(owner.job_id)
    head.add(owner.job_id, [(f"p{i}", s) for i, s in enumerate(sequences[:3])])
    assert head.take_batch(EVERYTHING, batch_id=1) is not None  # in flight: lends them
    sharing.lend(lender, np.array([0]))  # a job computes the fourth row now
    rows = np.arange(4)
    assert owner.pieces is not None and other.pieces is not None
    assert sharing.lenders_of(owner, rows).all()
    # Computed for the owner: journaled with their tokens; a job's loan is served.
    assert head.loan_tokens(owner, owner.pieces, rows) == [22, 32, 42, 0]
    # Another job borrows the owner's rows: served, as cache hits are.
    assert head.loan_tokens(other, other.pieces, rows) == [0, 0, 0, 0]


# The scheduler with a head start -------------------------------------------------------

def test_rows_of_head_batches_back_before_the_job_starts_are_its_computed_rows(
        tmp_path: Path, journal: Journal) -> None:
    sequences = random_sequences([20 + (7 * i) % 40 for i in range(30)], seed=10)
    sequences.append(sequences[1])  # a repeat of a head row: gets its copy
    job = indexed_job(tmp_path, journal, sequences)
    scheduler = head_scheduler(journal)
    head = scheduler.head
    assert head is not None
    head.open(job.job_id)
    assert head.add(job.job_id, peek(job, max_tokens=200)) == 6  # lengths 20..55
    early = take_all(scheduler)  # no job yet: idle workers take the head batches
    assert early and all(isinstance(d.key, HeadKey) for d in early)
    early_ids = {rid for d in early for rid in d.batch.ids}
    assert early_ids == {f"a_{i}" for i in range(6)}
    for dispatch in early:  # rows told apart from the job's own by their shift
        scheduler.apply(BatchDone(dispatch, computed_rows(dispatch, records(job), 1000.0),
                                  "cpu", 0.0))
    scheduler.add_job(job)
    own = take_all(scheduler)
    assert not early_ids & {rid for d in own for rid in d.batch.ids}  # not computed again
    run_to_the_end(scheduler, job, own)
    got = written_rows(job)
    want = np.stack([row_of(s) for s in sequences])
    want[[0, 1, 2, 3, 4, 5, 30]] += 1000.0  # the head batches' rows, and the copy of one
    np.testing.assert_array_equal(got, want)
    # Journaled with their tokens: counted as computed, not as served.
    assert journal.reuse_counts(job.job_id) == (30, 0)
    assert head.taken == 6


def claimed_and_running(tmp_path: Path, journal: Journal, claimed: list[str],
                        running: list[str]
                        ) -> tuple[ActiveJob, ActiveJob, Scheduler, HeadStart]:
    """Job A (``claimed``: its head is open) and job B (``running``), both indexed, and a
    scheduler with a head start."""
    a = indexed_job(tmp_path, journal, claimed, name="a.fasta")
    b = indexed_job(tmp_path, journal, running, name="b.fasta")
    scheduler = head_scheduler(journal)
    assert scheduler.head is not None
    scheduler.head.open(a.job_id)
    return a, b, scheduler, scheduler.head


def test_a_row_queued_for_another_job_and_taken_by_a_window_is_served(
        tmp_path: Path, journal: Journal) -> None:
    shared = random_sequences([20 + (7 * i) % 40 for i in range(30)], seed=18)
    mine = random_sequences([33, 44, 55], seed=19)
    # Job A is claimed and peeked; job B, running, has four of A's first rows.
    a, b, scheduler, head = claimed_and_running(tmp_path, journal,
                                                mine[:2] + shared[2:6] + mine[2:], shared)
    assert head.add(a.job_id, peek(a)) == 7
    for dispatch in take_all(scheduler):  # A's rows, told apart by their shift
        scheduler.apply(BatchDone(dispatch, computed_rows(dispatch, records(a), 1000.0),
                                  "cpu", 0.0))
    scheduler.add_job(b)
    own = take_all(scheduler)
    assert not {f"b_{i}" for i in range(2, 6)} & {rid for d in own for rid in d.batch.ids}
    run_to_the_end(scheduler, b, own)
    got = written_rows(b)
    want = np.stack([row_of(s) for s in shared])
    want[2:6] += 1000.0  # A's head rows, written into B's file
    np.testing.assert_array_equal(got, want)
    # Served to B, as cache hits: B computed the other 26.
    assert journal.reuse_counts(b.job_id) == (26, 4)
    assert head.taken == 4
    # A starts: its own head rows are its computed rows; it computes the rest.
    scheduler.add_job(a)
    run_to_the_end(scheduler, a, take_all(scheduler))
    got = written_rows(a)
    want = np.stack([row_of(s) for s in records(a).values()])
    # All seven were A's head rows, the four served to B too: A computes none again.
    np.testing.assert_array_equal(got, want + 1000.0)
    assert journal.reuse_counts(a.job_id) == (7, 0)
    assert head.taken == 11


def test_a_row_of_another_jobs_head_batch_in_flight_is_served_to_its_borrower(
        tmp_path: Path, journal: Journal) -> None:
    shared = random_sequences([20 + (7 * i) % 40 for i in range(12)], seed=20)
    mine = random_sequences([33, 44], seed=21)
    a, b, scheduler, head = claimed_and_running(tmp_path, journal, shared[:3] + mine, shared)
    assert head.add(a.job_id, peek(a)) == 5
    head_batch = scheduler.take_batch(BUDGET)
    assert head_batch is not None and isinstance(head_batch.key, HeadKey)
    assert len(head_batch.batch.ids) == 5
    scheduler.add_job(b)
    own = take_all(scheduler)
    assert sorted(b.borrowed.values()) == [0, 1, 2]
    loans = {b_.batch_no: b_.tokens for b_ in journal.pending_batches(b.job_id)
             if b_.batch_no in b.borrowed}
    assert loans == {no: 0 for no in b.borrowed}  # served: A's rows, not B's
    for dispatch in own:
        scheduler.apply(BatchDone(dispatch, computed_rows(dispatch, records(b)), "cpu", 0.0))
    scheduler.apply(BatchDone(head_batch, computed_rows(head_batch, records(a), 1000.0),
                              "cpu", 0.0))
    assert b.borrowed == {}
    run_to_the_end(scheduler, b, [])
    want = np.stack([row_of(s) for s in shared])
    want[:3] += 1000.0
    np.testing.assert_array_equal(written_rows(b), want)
    assert journal.reuse_counts(b.job_id) == (9, 3)
    # The rows wait for A all the same: it takes all five as its computed rows.
    scheduler.add_job(a)
    own = take_all(scheduler)
    assert not own
    run_to_the_end(scheduler, a, own)
    np.testing.assert_array_equal(written_rows(a),
                                  np.stack([row_of(s) for s in records(a).values()]) + 1000.0)
    assert journal.reuse_counts(a.job_id) == (5, 0)
    assert head.taken == 5


def real_intake(tmp_path: Path) -> tuple[Intake, JobCompletion, list[ActiveJob]]:
    """The daemon's intake and completion over a real journal and a scheduler with a head
    start; indexing in a thread, nothing spawned (a test runs each step itself), and the
    jobs handed to publishing collected in the list returned."""
    cfg = Config(paths=PathsConfig(*(tmp_path / d for d in ("inbox", "outbox", "state",
                                                              "failed"))))
    cfg.model.truncation = TRUNCATION
    cfg.jobs.index_processes = 0  # indexed in a thread
    state = cfg.paths.state
    for d in (cfg.paths.inbox, cfg.paths.outbox, cfg.paths.failed, state / "done",
              state / "claimed"):
        d.mkdir(parents=True)
    journal = Journal(state / "journal.sqlite3")

    async def model() -> ModelInfo:
        return ModelInfo(embed_dim=DIM, layer=1, attention_backend="exact", max_tokens=BUDGET)
    completion = JobCompletion(cfg, journal, Metrics(), state / "jobs", state / "done", model)
    published: list[ActiveJob] = []

    def spawn(coro: Any) -> asyncio.Task[Any]:
        raise AssertionError("the test runs each step itself")
    intake = Intake(cfg, journal, head_scheduler(journal), completion,
                    claimed_dir=state / "claimed", jobs_dir=state / "jobs",
                    stopping=asyncio.Event(), wake=asyncio.Event(), work_added=asyncio.Event(),
                    spawn=spawn, spawn_publish=published.append, model=model,
                    faults=FaultPlan(), source_type=ProteinSource)
    return intake, completion, published


def test_no_peek_while_the_devices_have_more_work_than_a_head_start(tmp_path: Path) -> None:
    """A head batch runs only when no job has a batch: with more work queued than a peek
    reads, the peek would only slow the indexing down, and is not made."""
    intake, _, _ = real_intake(tmp_path)
    scheduler, journal, state = intake.scheduler, intake.journal, intake.cfg.paths.state
    head = scheduler.head
    assert head is not None
    big = write_fasta(state / "claimed" / "1-big.fasta",
                      random_sequences([200] * 40, seed=23), prefix="b")
    small = write_fasta(state / "claimed" / "2-small.fasta",
                        random_sequences([30] * 5, seed=24), prefix="s")
    for claimed, expect in ((small, 5), (big, None)):
        job_id = journal.add_job(claimed.name, claimed)
        intake.indexing.add(job_id)
        head.open(job_id)
        if expect is not None:  # the devices are idle: the peek is queued
            asyncio.run(intake._peek(job_id, claimed))
            assert head.pending() == expect
            head.forget(job_id)
    # The big file's job now runs, with more tokens left than a peek reads.
    asyncio.run(intake._index_job(job_id, claimed.name, claimed))
    running = scheduler.jobs[job_id]
    assert running.total_tokens - running.done_tokens > head.budget(scheduler.max_tokens)
    later = journal.add_job("2-small.fasta", small)
    intake.indexing.add(later)
    head.open(later)
    asyncio.run(intake._peek(later, small))
    assert head.pending() == 0


def test_a_job_published_as_a_copy_leaves_none_of_its_head_rows_waiting(
        tmp_path: Path) -> None:
    """Through the real intake: a file of the same content as one published before is
    published as a copy and never runs; the rows its head start computed must not wait
    for it (vnpd/daemon/intake.py, ``_forget_head``)."""
    intake, completion, published = real_intake(tmp_path)
    scheduler, journal, state = intake.scheduler, intake.journal, intake.cfg.paths.state
    head = scheduler.head
    assert head is not None
    sequences = random_sequences([20 + (7 * i) % 40 for i in range(20)], seed=22)
    first = write_fasta(state / "claimed" / "1-a.fasta", sequences, prefix="r")
    again = write_fasta(state / "claimed" / "2-b.fasta", sequences, prefix="r")
    by_id = {f"r{i}": s for i, s in enumerate(sequences)}

    # The first file: indexed, computed and published.
    job_id = journal.add_job("a.fasta", first)
    asyncio.run(intake._index_job(job_id, "a.fasta", first))
    job = scheduler.jobs[job_id]
    run_to_the_end(scheduler, job, take_all(scheduler))
    asyncio.run(completion.publish(job))
    assert journal.job(job_id).state == "done"

    # The same content again: claimed, its head computed while it is indexed.
    copy_id = journal.add_job("b.fasta", again)
    intake.indexing.add(copy_id)
    head.open(copy_id)
    asyncio.run(intake._peek(copy_id, again))
    assert head.pending() > 0
    for dispatch in take_all(scheduler):
        assert isinstance(dispatch.key, HeadKey)
        scheduler.apply(BatchDone(dispatch, computed_rows(dispatch, by_id), "cpu", 0.0))
    assert head.computed > 0 and len(head._ready) == head.computed  # they wait for it
    asyncio.run(intake._index_job(copy_id, "b.fasta", again))
    assert [j.job_id for j in published] == [copy_id] and copy_id not in scheduler.jobs
    assert published[0].partial.finalized  # the copy, to publish: it will never run
    assert head._ready == {} and head._owner == {} and head.pending() == 0
    assert head.taken == 0
    # Its keys are free: a later claim of these rows queues them again.
    head.open(999)
    assert head.add(999, [("x", sequences[0])]) == 1


def borrowing_job(tmp_path: Path, journal: Journal) -> tuple[Scheduler, ActiveJob, Dispatch]:
    """A job whose first window borrows four rows of a head batch in flight, and its
    other batches taken; returns the scheduler, the job and the head batch."""
    sequences = random_sequences([20 + (7 * i) % 40 for i in range(12)], seed=11)
    sequences.append(sequences[1])
    job = indexed_job(tmp_path, journal, sequences)
    scheduler = head_scheduler(journal)
    assert scheduler.head is not None
    scheduler.head.open(job.job_id)
    scheduler.head.add(job.job_id, peek(job)[:4])
    head_batch = scheduler.take_batch(BUDGET)
    assert head_batch is not None and isinstance(head_batch.key, HeadKey)
    scheduler.add_job(job)
    assert job.borrowed == {}  # its first window is not read yet
    own = take_all(scheduler)
    assert sorted(job.borrowed.values()) == [0, 1, 2, 3]
    assert not set(head_batch.batch.ids) & {rid for d in own for rid in d.batch.ids}
    # Each loan is a batch journaled with its row's tokens: computed for this job.
    loans = {b.batch_no: b.tokens for b in journal.pending_batches(job.job_id)
             if b.batch_no in job.borrowed}
    assert loans == {no: len(sequences[p]) + 2 for no, p in job.borrowed.items()}
    for dispatch in own:
        scheduler.apply(BatchDone(dispatch, computed_rows(dispatch, records(job)), "cpu", 0.0))
    return scheduler, job, head_batch


def test_a_job_that_borrowed_rows_of_a_head_batch_gets_them_when_it_returns(
        tmp_path: Path, journal: Journal) -> None:
    scheduler, job, head_batch = borrowing_job(tmp_path, journal)
    scheduler.apply(BatchDone(head_batch, computed_rows(head_batch, records(job), 1000.0),
                              "cpu", 0.0))
    assert job.borrowed == {}
    run_to_the_end(scheduler, job, [])
    got = written_rows(job)
    want = np.stack([row_of(s) for s in records(job).values()])
    want[[0, 1, 2, 3, 12]] += 1000.0  # the head batch's rows, and the copy of one
    np.testing.assert_array_equal(got, want)
    assert journal.reuse_counts(job.job_id) == (12, 0)


def not_finite(dispatch: Dispatch) -> BatchDone:
    rows = np.zeros((len(dispatch.batch.ids), DIM), np.float32)
    rows[-1, 0] = np.nan
    return BatchDone(dispatch, rows, "cpu", 0.0)


@pytest.mark.parametrize("lose", [lambda d: BatchFailed(d, "batch", "boom"),
                                  lambda d: BatchesLost([d], "crash"), not_finite],
                         ids=["failed", "lost", "not_finite"])
def test_a_job_computes_the_rows_it_borrowed_of_a_head_batch_that_failed(
        tmp_path: Path, journal: Journal, lose: Callable[[Dispatch], Outcome]) -> None:
    scheduler, job, head_batch = borrowing_job(tmp_path, journal)
    scheduler.apply(lose(head_batch))
    assert job.borrowed == {}
    again = take_all(scheduler)  # its loans' batches, queued to be computed
    assert sorted(rid for d in again for rid in d.batch.ids) == sorted(head_batch.batch.ids)
    assert all(isinstance(d.key[1], QueuedBatch) for d in again)
    run_to_the_end(scheduler, job, again)
    np.testing.assert_array_equal(written_rows(job),
                                  np.stack([row_of(s) for s in records(job).values()]))
    assert journal.reuse_counts(job.job_id) == (12, 0)


# End to end ------------------------------------------------------------------------------

NUCLEOTIDE = '\n[input]\nkind = "nucleotide"\n\n[nucleotide]\nproteins = "six_frame"\n'
INDEX_DELAY_S = 1.0  # the head-start daemon indexes this slowly: its head batches come first


def run_with_and_without_head_start(tmp_path: Path, model: Path, name: str, text: str,
                                    extra: str = "") -> dict[bool, tuple[Daemon, Path]]:
    """``text`` dropped as ``name`` into two daemons run side by side, one with the head
    start (and slow indexing), one with ``head_start = false``. Returns, for each, the
    daemon (stopped) and its published file."""
    daemons: dict[bool, tuple[Daemon, DaemonDirs]] = {}
    for head_start in (True, False):
        dirs = DaemonDirs(tmp_path / ("head" if head_start else "plain"))
        dirs.root.mkdir()
        config = write_config(dirs, model, max_tokens=1024, extra=extra,
                              jobs={"head_start": "on" if head_start else "off"})
        env = {"VNPD_TEST_INDEX_DELAY_S": str(INDEX_DELAY_S)} if head_start else {}
        daemons[head_start] = Daemon(config, dirs, env=env), dirs
    out = {}
    try:
        for daemon, dirs in daemons.values():
            daemon.wait_ready()
        for daemon, dirs in daemons.values():
            drop(dirs.inbox, name, text)
        for head_start, (daemon, dirs) in daemons.items():
            (path,) = daemon.wait_outputs([Path(name).stem + ".h5"])
            out[head_start] = daemon, path
    finally:
        codes = [daemon.terminate() for daemon, _ in daemons.values()]
    assert codes == [0, 0]
    return out


def check_head_start_served(runs: dict[bool, tuple[Daemon, Path]]) -> None:
    """Both outputs equal; the head start computed rows, and its job took them as
    computed (none served)."""
    (head, head_out), (plain, plain_out) = runs[True], runs[False]
    for path in (head_out, plain_out):
        verify_output(path)
    emb, ids, lengths, attrs = read_output(head_out)
    plain_emb, plain_ids, plain_lengths, plain_attrs = read_output(plain_out)
    assert ids == plain_ids and lengths.tolist() == plain_lengths.tolist()
    np.testing.assert_allclose(emb, plain_emb, rtol=0, atol=1e-6)
    for key in ("computed_sequences", "cache_hits", "duplicate_records"):
        assert int(attrs[key]) == int(plain_attrs[key]), key
    assert int(attrs["cache_hits"]) == 0
    queued = sum(e["sequences"] for e in head.events("head_start_queued"))
    computed = sum(e["sequences"] for e in head.events("head_batch_done"))
    # A head batch back before the job's first window is read gives it its rows there;
    # one still in flight then lends them (which, depends on the machine's speed).
    taken = sum(e["sequences"] for e in head.events("head_rows_taken"))
    lent = sum(e["rows"] for e in head.events("rows_borrowed") if e["lender"] < 0)
    assert 5 <= queued < len(ids)  # the file's head: its job computes the rest
    assert 0 < computed <= queued
    assert taken + lent == computed
    assert not plain.events("head_start_queued") and not plain.events("test_index_delay")


def test_a_protein_file_with_a_head_start_is_published_as_without(
        tmp_path: Path, tiny_model: Path) -> None:
    sequences = random_sequences([20 + (37 * i) % 110 for i in range(120)], seed=21)
    sequences[50] = sequences[2]  # a repeat of a head row: its copy
    runs = run_with_and_without_head_start(tmp_path, tiny_model, "p.fasta",
                                           fasta_text(sequences, prefix="p"))
    check_head_start_served(runs)
    assert int(read_output(runs[True][1])[3]["computed_sequences"]) == 119


def test_a_nucleotide_file_with_a_head_start_is_published_as_without(
        tmp_path: Path, tiny_model: Path) -> None:
    rng = random.Random(22)
    contigs = {f"c{i}": phage_like(rng, 4)[0] for i in range(12)}
    text = "".join(f">{rid} contig\n{seq}\n" for rid, seq in contigs.items())
    runs = run_with_and_without_head_start(tmp_path, tiny_model, "c.fna", text, NUCLEOTIDE)
    check_head_start_served(runs)
