"""Jobs in progress: read windows of sequences, pack them, hand out batches, take results.

Each active job reads its file in windows (bounded host memory whatever the file size),
packs each window by token budget, journals the batches (positions, not ids), and queues
them. What a batch holds are pieces (:class:`vnpd.compute.windows.PieceIndex`): rows, or
in window mode the windows of long rows, kept by slot (:mod:`vnpd.daemon.window_rows`),
cut from the input by :mod:`vnpd.daemon.piece_batches`. :meth:`Scheduler.take_batch`
serves jobs round-robin, so a one-sequence file gets the next free slot instead of waiting
behind a million-sequence file.
Rows that another job computes now are borrowed from it (:mod:`vnpd.daemon.sharing`).

Failures: a batch that OOMs is split in two (the device's budget was already lowered by
the supervisor). Any other failure (its worker died, hung or reported an error) counts an
attempt in the journal and makes the batch a *suspect*. A worker dies with every batch it
holds, up to three, and only one of them is to blame, so a suspect is sent only to a
worker holding nothing else, and runs alone: if it fails again, the failure is its own.
A suspect that fails alone is split into single sequences, each again a suspect; a
single sequence that fails alone is poison: quarantined (``on_poison = "quarantine"``)
or its job fails (``"fail"``). So a bystander is never quarantined for a neighbour's
crash, and a poison record costs three worker deaths whatever its batch's size (one
beside others, one with its batch alone, one alone), not two per halving.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from vnpd.daemon.jobs import ActiveJob, QueuedBatch
from vnpd.daemon.piece_batches import (job_pieces, pack_pieces, queue_journaled, read_window,
                                       reread_batch, window_batch)
from vnpd.daemon.journal import Journal
from vnpd.daemon.retry import DISK_ERRORS, Backoff
from vnpd.daemon.rows import followers_rows, split_window, write_with_copies
from vnpd.daemon.sharing import RowSharing
from vnpd.daemon.window_rows import store_windows
from vnpd.faults import FaultPlan
from vnpd.inputs.fasta import FastaError
from vnpd.workers.pool import BatchDone, BatchesLost, BatchFailed, Dispatch, Outcome

if TYPE_CHECKING:  # annotations only
    from vnpd.compute.windows import PieceIndex
    from vnpd.daemon.head_start import HeadStart
    from vnpd.daemon.reuse import RowCache

log = structlog.get_logger()

POISON_ATTEMPTS = 2          # failures before a single sequence can be poison (one alone)
WINDOW_BATCHES = 8           # read a new window when fewer batches than this are queued
WINDOW_MAX_RECORDS = 200_000


class Scheduler:
    """Round-robin batch source over active jobs; applies the pool's outcomes.

    A job with no work left (or that failed) leaves the scheduler and goes onto
    :attr:`finished`, a queue that the daemon's completion takes it from.
    """

    def __init__(self, journal: Journal, *, truncation: int, max_tokens: int,
                 on_poison: str, metrics: Any = None, disk_retry_max_s: float = 30.0,
                 faults: FaultPlan = FaultPlan()) -> None:
        self.journal = journal
        self.truncation = truncation
        self.max_tokens = max_tokens
        self.on_poison = on_poison
        self.metrics = metrics
        self.faults = faults
        self.cache: RowCache | None = None  # set by the daemon once the cache is open
        # Rows of jobs running at once, lent to each other (None: per-residue rows).
        self.sharing: RowSharing | None = RowSharing()
        # Claimed files' first proteins, computed while they are indexed (None: off).
        self.head: HeadStart | None = None
        self.jobs: dict[int, ActiveJob] = {}
        self.finished: asyncio.Queue[ActiveJob] = asyncio.Queue()
        self._rr: deque[int] = deque()
        self._batch_ids = itertools.count(1)
        # After a disk error (full disk), commits and window reads pause with backoff.
        self._disk = Backoff(disk_retry_max_s)
        self._commit_lock = asyncio.Lock()

    # Jobs ---------------------------------------------------------------------------
    def add_job(self, job: ActiveJob) -> None:
        """Start serving a job, its journaled unfinished batches first (suspects first)."""
        queue_journaled(job, self.journal, self.truncation)
        if self.head is not None:
            self.head.started(job.job_id)
        self.jobs[job.job_id] = job
        self._rr.append(job.job_id)
        log.info("job_started", job=job.job_id, file=job.name, sequences=job.num_records,
                 tokens=job.total_tokens, resumed_sequences=job.done_sequences,
                 queued_batches=len(job.queue))
        self._check_complete(job)

    def remove_job(self, job_id: int) -> ActiveJob | None:
        job = self.jobs.pop(job_id, None)
        if self.head is not None:
            self.head.forget(job_id)
        if job_id in self._rr:
            self._rr.remove(job_id)
        if self.sharing is not None:  # what it was to lend, its borrowers compute
            self.sharing.release(job_id, None, self.jobs, self.journal)
        return job

    def queued_sequences(self) -> int:
        return sum(j.num_records - j.done_sequences for j in self.jobs.values())

    # Batch source -------------------------------------------------------------------
    def take_batch(self, max_tokens: int, alone: bool = True) -> Dispatch | None:
        """The next batch for a worker with budget ``max_tokens``, or None.

        ``alone``: the worker holds no other batch. A suspect (a batch that failed
        before) is only handed to such a worker, as an exclusive dispatch. While one
        waits, busy workers get nothing, so that one of them drains and takes it soon.
        """
        # Suspects are always first in their job's queue (see _after_failure, add_job).
        suspect = next((j for j in self.jobs.values()
                        if j.queue and j.queue[0].attempts and not j.failed), None)
        if suspect is not None:
            return self._next_from(suspect, max_tokens) if alone else None
        for _ in range(len(self._rr)):
            job_id = self._rr[0]
            self._rr.rotate(-1)
            job = self.jobs[job_id]
            if job.failed:
                continue
            dispatch = self._next_from(job, max_tokens)
            if dispatch is not None:
                return dispatch
        # No job has a batch: a device would idle. Files still being indexed may have
        # their first proteins ready (:mod:`vnpd.daemon.head_start`).
        if self.head is not None:
            return self.head.take_batch(max_tokens, next(self._batch_ids))
        return None

    def _next_from(self, job: ActiveJob, max_tokens: int) -> Dispatch | None:
        """The job's next batch, reading a new window first when few are queued.

        An input that no longer reads as it was indexed (its writer went on writing
        after the claim) fails its job here, and only its job.
        """
        try:
            if len(job.queue) < WINDOW_BATCHES:
                self._read_window(job)
            return self._take(job, max_tokens) if job.queue else None
        except FastaError as exc:
            log.error("job_input_changed", job=job.job_id, file=job.name, error=str(exc))
            job.failed = str(exc)
            self._finish(job)
            return None

    def _take(self, job: ActiveJob, max_tokens: int) -> Dispatch:
        queued = job.queue.popleft()
        if queued.tokens > max_tokens and len(queued.positions) > 1:
            # This device's budget is lower (it ran out of memory): split first.
            try:
                self._split(job, queued, "over device budget")
                queued = job.queue.popleft()
            except sqlite3.OperationalError as exc:  # a full disk: send it whole
                log.error("journal_write_failed", job=job.job_id, batch=queued.batch_no,
                          error=str(exc))
        return self._dispatch(job, queued)

    def _read_window(self, job: ActiveJob) -> None:
        if job.next_position >= job.num_records or self._disk.waiting():
            return
        start, pieces = job.next_position, job_pieces(job, self.truncation)
        # The window: records up to the one that reaches WINDOW_BATCHES budgets of tokens.
        ahead = pieces.row_tokens(start, min(start + WINDOW_MAX_RECORDS, job.num_records))
        count = min(int(np.searchsorted(np.cumsum(ahead), WINDOW_BATCHES * self.max_tokens))
                    + 1, len(ahead))
        stop = start + count
        window = read_window(job, start, count)
        # Ids and lengths are not written here but at finalize, from the input: ids are
        # HDF5 heap (metadata) writes, which a crash between flushes could leave dangling.
        # Repeats of earlier rows are copied, cached rows served: neither is computed.
        compute, hit, hit_rows = split_window(job.duplicates, self.cache, start, stop)
        early = np.zeros(0, dtype=np.int64)  # rows head batches computed: taken as done
        early_rows = np.zeros((0, 0), dtype=np.float32)
        if self.head is not None:  # those of another job's head: served, as cache hits
            early, early_rows, compute, hit, hit_rows = self.head.split(job, compute, start,
                                                                        hit, hit_rows)
        borrowed = np.zeros(0, dtype=np.int64)  # rows another job computes now: borrowed
        if self.sharing is not None:
            borrowed, compute = self.sharing.split(job, compute, start)
        # What runs are pieces: the rows, or in window mode the windows of long rows.
        plan = pack_pieces(pieces, pieces.pieces_of(compute + start), self.max_tokens)
        batches = [(p, int(pieces.tokens(p).sum())) for p in plan]
        if len(hit):
            batches.append((pieces.pieces_of(hit + start), 0))  # no tokens: cache hits
        early_at = len(batches)  # with their tokens: computed for this job, not served
        if len(early):
            early_pieces = pieces.pieces_of(early + start)
            batches.append((early_pieces, int(pieces.tokens(early_pieces).sum())))
        batches += [(p, t) for p, t in zip((pieces.pieces_of(borrowed[i:i + 1])
                                            for i in range(len(borrowed))),
                                           self.head.loan_tokens(job, pieces, borrowed)
                                           if self.head else itertools.repeat(0))]
        try:
            numbers = self.journal.add_batches(job.job_id, batches, stop)
        except sqlite3.OperationalError as exc:
            # A full disk: nothing was journaled or queued; the window is read again later.
            self._disk_failed("window_read_failed", exc, job=job.job_id, start=start)
            return
        if self.sharing is not None:
            self.sharing.register(job, compute + start, borrowed,
                                  numbers[len(numbers) - len(borrowed):])
        if len(hit):
            self._write_rows(job, hit + start, hit_rows)
            job.unflushed.append(numbers[len(plan)])
        if len(early):
            self._write_early(job, early + start, early_rows, batches[early_at][1],
                              numbers[early_at])
        for no, batch_pieces in zip(numbers, plan):
            batch = window_batch(job, batch_pieces, window, start, self.truncation)
            job.queue.append(QueuedBatch(no, batch.positions, batch.num_tokens, batch))
        job.next_position = stop
        if not plan:
            self._check_complete(job)  # a window of repeats, hits, loans only: maybe the last

    def _write_early(self, job: ActiveJob, positions: np.ndarray, rows: np.ndarray,
                     tokens: int, batch_no: int) -> None:
        """Rows head batches computed: one batch of the job's, done at the next commit."""
        self._write_rows(job, positions, rows)
        job.unflushed.append(batch_no)
        job.done_tokens += tokens
        if self.cache is not None and job.duplicates is not None:  # as computed rows are
            self.cache.store(np.asarray(job.duplicates.keys[positions]), rows)

    def _dispatch(self, job: ActiveJob, queued: QueuedBatch) -> Dispatch:
        if queued.batch is None:
            queued.batch = reread_batch(job, queued.positions, self.truncation)
        job.inflight.add(queued.batch_no)
        if queued.attempts:
            log.info("batch_isolated", job=job.job_id, batch=queued.batch_no,
                     sequences=len(queued.positions), attempts=queued.attempts)
        return Dispatch((job.job_id, queued), next(self._batch_ids), queued.batch,
                        exclusive=queued.attempts > 0)

    # Pool outcomes ------------------------------------------------------------------
    def apply(self, outcome: Outcome) -> None:
        """Take in what became of a batch: rows to write, a failure, or lost batches."""
        if self.head is not None:  # head batches' outcomes are the head start's
            left = self.head.take_outcome(outcome, self.jobs, self.journal, self.cache)
            if left is None:
                return
            outcome = left
        if isinstance(outcome, BatchDone):
            self.batch_done(outcome.dispatch, outcome.rows, outcome.device, outcome.seconds,
                            outcome.residues, outcome.residue_counts)
        elif isinstance(outcome, BatchFailed):
            self.batch_failed(outcome.dispatch, outcome.kind, outcome.message)
        elif isinstance(outcome, BatchesLost):
            self.batches_lost(outcome.dispatches, outcome.reason)

    def batch_done(self, dispatch: Dispatch, rows: np.ndarray, device: str,
                   seconds: float, residues: np.ndarray | None = None,
                   residue_counts: np.ndarray | None = None) -> None:
        job_id, queued = dispatch.key
        job = self.jobs.get(job_id)
        if job is None or queued.batch_no not in job.inflight:
            return  # job failed meanwhile, or a duplicate result: never written twice
        positions, rows = self._write_pieces(job, queued.positions, rows, residues,
                                             residue_counts)
        if self.cache is not None and job.duplicates is not None and len(positions):
            self.cache.store(np.asarray(job.duplicates.keys[positions]), rows)
        if self.sharing is not None and len(positions):  # rows that other jobs borrowed
            self.sharing.repay(job.job_id, positions, rows, self.jobs, self.journal,
                               refuse=job.partial.has_residues)
        job.inflight.discard(queued.batch_no)
        job.unflushed.append(queued.batch_no)
        job.done_tokens += queued.tokens
        if self.metrics is not None:
            finished = job_pieces(job, self.truncation).is_last(queued.positions)  # rows done with it
            self.metrics.sequences_total.inc(int(finished.sum()))
            self.metrics.tokens_total.inc(queued.tokens)
        log.debug("batch_done", job=job_id, batch=queued.batch_no, device=device,
                  sequences=len(queued.positions), tokens=queued.tokens,
                  seconds=round(seconds, 3))

    def _write_pieces(self, job: ActiveJob, pieces: np.ndarray, rows: np.ndarray,
                      residues: np.ndarray | None, residue_counts: np.ndarray | None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Write a batch's results: windows of long rows into their slots, whole rows at
        their positions. Returns (positions, rows) of the whole rows written."""
        index = job_pieces(job, self.truncation)
        if index.windows:
            job.done_sequences += int(index.is_last(pieces[index.windowed(pieces)]).sum())
            pieces, rows, residues, residue_counts = store_windows(
                job.partial, index, pieces, rows, residues, residue_counts)
        positions = index.rows(pieces)
        self._write_rows(job, positions, rows, residues, residue_counts)
        return positions, rows

    def _write_rows(self, job: ActiveJob, positions: np.ndarray, rows: np.ndarray,
                    residues: np.ndarray | None = None,
                    residue_counts: np.ndarray | None = None) -> None:
        """Write rows (and per-residue rows, before the same flush) at their positions,
        and copies at the positions that repeat them."""
        job.done_sequences += write_with_copies(job.partial, job.duplicates, positions, rows,
                                                residues, residue_counts)

    async def commit(self, *, wait: bool = False) -> None:
        """Make written rows durable, then journal their batches as done.

        Called twice a second, not per batch (an fsync can cost more than a small model's
        batch). The fsync runs in a thread while results go on being written; only the
        batches written before it are journaled after it. A crash loses at most the
        uncommitted batches (recomputed); rows are never marked done before they are on
        disk. One at a time: with another under way, returns, or with ``wait`` follows it.
        """
        if self._disk.waiting() or (self._commit_lock.locked() and not wait):
            return
        async with self._commit_lock:
            for job in [j for j in self.jobs.values() if j.unflushed]:
                batches = list(job.unflushed)
                try:
                    await asyncio.to_thread(job.partial.flush)
                    if self.jobs.get(job.job_id) is not job:
                        continue  # failed meanwhile: its file is no longer ours to commit
                    self.faults.crash_at("rows_flushed")
                    self.journal.mark_done(job.job_id, batches)
                except Exception as exc:
                    if self.jobs.get(job.job_id) is not job:
                        continue  # failed, and its file closed, during the flush
                    if not isinstance(exc, DISK_ERRORS):
                        raise
                    # A full disk: the batches stay pending, and a later commit tries again.
                    self._disk_failed("commit_failed", exc, job=job.job_id,
                                      batches=len(batches))
                    return
                self._disk.reset()
                del job.unflushed[:len(batches)]  # those written since wait for the next
                self._check_complete(job)

    def _disk_failed(self, event: str, exc: BaseException, **fields: Any) -> None:
        log.error(event, error=str(exc), retry_in_s=self._disk.failed(), **fields)

    def batch_failed(self, dispatch: Dispatch, kind: str, message: str) -> None:
        job_id, queued = dispatch.key
        job = self.jobs.get(job_id)
        if job is None or queued.batch_no not in job.inflight:
            return
        job.inflight.discard(queued.batch_no)
        self._count_attempt(job, queued)
        if kind == "oom" and len(queued.positions) > 1:
            self._split(job, queued, "out of memory")
        else:
            self._after_failure(job, queued, dispatch.exclusive, f"{kind}: {message}")

    def batches_lost(self, dispatches: list[Dispatch], reason: str) -> None:
        for dispatch in dispatches:
            job_id, queued = dispatch.key
            job = self.jobs.get(job_id)
            if job is None or queued.batch_no not in job.inflight:
                continue
            job.inflight.discard(queued.batch_no)
            if reason == "shutdown":
                job.queue.appendleft(queued)  # journaled as not done: resumes on restart
                continue
            self._count_attempt(job, queued)
            self._after_failure(job, queued, dispatch.exclusive, reason)

    def _count_attempt(self, job: ActiveJob, queued: QueuedBatch) -> None:
        try:
            queued.attempts = self.journal.count_attempt(job.job_id, queued.batch_no)
        except sqlite3.OperationalError as exc:
            queued.attempts += 1  # a full disk: counted in memory only, until a restart
            log.error("journal_write_failed", job=job.job_id, batch=queued.batch_no,
                      error=str(exc))

    def _after_failure(self, job: ActiveJob, queued: QueuedBatch, alone: bool,
                       reason: str) -> None:
        """Retry as a suspect; or, when it failed alone, split it or quarantine it."""
        try:
            if not alone or (len(queued.positions) == 1 and queued.attempts < POISON_ATTEMPTS):
                # Beside other batches the blame is unknown: retry it alone, first in line.
                job.queue.appendleft(queued)
            elif len(queued.positions) > 1:
                # Its own failure: find the culprit among its sequences, each alone.
                self._split(job, queued, reason, singles=True)
            else:
                self._poisoned(job, queued, reason)
        except sqlite3.OperationalError as exc:
            # A full disk: the split or quarantine was rolled back; the batch, still
            # pending in the journal, is retried as it is.
            log.error("journal_write_failed", job=job.job_id, batch=queued.batch_no,
                      error=str(exc))
            job.queue.appendleft(queued)

    def _split(self, job: ActiveJob, queued: QueuedBatch, reason: str, *,
               singles: bool = False) -> None:
        """Replace ``queued`` by its halves (or its single sequences), first in line.

        The parts keep its attempts: a part of a suspect is a suspect.
        """
        if singles:
            parts = [queued.positions[i:i + 1] for i in range(len(queued.positions))]
        else:
            half = len(queued.positions) // 2
            parts = [queued.positions[:half], queued.positions[half:]]
        tokens = [int(job_pieces(job, self.truncation).tokens(p).sum()) for p in parts]
        numbers = self.journal.split_batch(job.job_id, queued.batch_no, list(zip(parts, tokens)))
        log.warning("batch_split", job=job.job_id, batch=queued.batch_no, into=numbers,
                    sequences=len(queued.positions), reason=reason)
        job.queue.extendleft(reversed([QueuedBatch(no, p, t, attempts=queued.attempts)
                                       for no, p, t in zip(numbers, parts, tokens)]))

    def _poisoned(self, job: ActiveJob, queued: QueuedBatch, reason: str) -> None:
        position = int(job_pieces(job, self.truncation).rows(queued.positions[:1])[0])  # its row
        record_id = queued.batch.ids[0] if queued.batch and queued.batch.ids else str(position)
        log.error("sequence_poisoned", job=job.job_id, position=position, record=record_id,
                  reason=reason, policy=self.on_poison)
        if self.metrics is not None:
            self.metrics.quarantined_sequences_total.inc()
        if self.on_poison == "fail":
            job.failed = (f"record {record_id!r} (position {position}) repeatedly killed its "
                          f"worker ({reason}); on_poison = \"fail\"")
            self._finish(job)
            return
        self.journal.quarantine(job.job_id, queued.batch_no, position, record_id, reason)
        if self.sharing is not None:  # its borrowers compute it, by their own rules
            self.sharing.release(job.job_id, [position], self.jobs, self.journal)
        # The row's other windows waiting alone (its batch's split) need not each prove it.
        index = job_pieces(job, self.truncation)
        for other in [q for q in job.queue if (index.rows(q.positions) == position).all()]:
            self.journal.quarantine(job.job_id, other.batch_no, position, record_id, reason)
            job.queue.remove(other)
        followers, _ = followers_rows(job.duplicates, np.array([position]))
        if len(followers):  # the same sequence again: it would fail the same way
            self.journal.quarantine_more(job.job_id, followers, f"same as {record_id}", reason)
        job.done_sequences += 1 + len(followers)
        self._check_complete(job)

    def _check_complete(self, job: ActiveJob) -> None:
        if job.finished():
            self._finish(job)

    def _finish(self, job: ActiveJob) -> None:
        """Hand a job with no work left (or a failed one) to completion, once."""
        if self.remove_job(job.job_id) is not None:
            self.finished.put_nowait(job)
