"""A head start: the first proteins of a claimed file computed while the file is still
being indexed (issues 13 and 14: the head of a run).

A job's batches can start only once its whole file is indexed: its row count, lengths and
repeat keys size the partial file and the journal. That takes a fraction of a second for
a protein file of 16,000 records, and seconds for a file of contigs whose genes are called
first; a device without other work waits all that time. So at the claim, the input kind
reads the file's first proteins (:meth:`vnpd.inputs.source.SequenceSource.peek`), and a
device that would otherwise be idle computes them in *head batches*: batches of no job,
taken only when no job has a batch to give (:meth:`vnpd.daemon.scheduler.Scheduler.take_batch`).

What they compute reaches the job by the rows' repeat keys (the SHA-256 that compute-once
and the cache use), through the paths that rows shared between jobs already take:

- a head batch in flight lends its rows as a job does (:mod:`vnpd.daemon.sharing`, with a
  lender id below zero): when the job reads its first window, such a row is borrowed, and
  written into the job's file when the head batch returns; if the batch fails, the job
  computes the row itself, by its own rules (retries, quarantine);
- rows of head batches that returned before the job was indexed wait here, in memory
  (:meth:`HeadStart.split`); the job's window takes them as computed rows, journaled with
  their tokens and made durable by the next commit, as any batch.

Nothing a head batch computes is ever journaled as its own: a crash loses it, and the job
computes those rows after the restart. A key that matches is the same residues up to the
truncation, so the row is the one the job would compute. Only whole rows are taken (in
window mode a row no longer than the truncation), and there is no head start with
per-residue output (a loan carries the pooled row only). The peek is bounded (a few
batches per device), and what a job has not taken is dropped when the job leaves.

Example::

    head = HeadStart(truncation=1022, sharing=scheduler.sharing, slots=8)
    head.add(7, [("seq1", "MKV..."), ...])         # at the claim, from the peek
    dispatch = head.take_batch(131072, batch_id=12)  # an idle device's batch
    head.done(dispatch, rows, jobs, journal)         # rows lent, or kept for the job
    mine, rows, compute, hit, hit_rows = head.split(job, compute, start, hit, hit_rows)
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from vnpd.compute.packing import build_batch
from vnpd.daemon.sharing import RowSharing, whole_rows
from vnpd.inputs.duplicates import key_array, key_list, row_key
from vnpd.workers.pool import BatchDone, BatchesLost, Dispatch, Outcome

if TYPE_CHECKING:  # annotations only
    from vnpd.compute.windows import PieceIndex
    from vnpd.daemon.reuse import RowCache
    from vnpd.daemon.jobs import ActiveJob
    from vnpd.daemon.journal import Journal

log = structlog.get_logger()

HEAD_BATCHES = 2
"""Batches per device that a claim's peek reads: enough to cover the indexing of a file of
tens of thousands of proteins (a 650M batch takes ~0.35 s on an H200, a 3B one ~1.3 s)."""


@dataclass(frozen=True)
class HeadKey:
    """A head batch's :attr:`Dispatch.key`: which claims its rows came from, and its
    lender id in :class:`RowSharing` (below zero: never a job's)."""

    lender: int
    keys: tuple[bytes, ...]
    jobs: tuple[int, ...]


@dataclass
class _Entry:
    job_id: int
    key: bytes
    record_id: str
    sequence: str


class HeadStart:
    """Proteins of claimed, not yet indexed files; their head batches; rows that came back.

    Each key is queued for one job, its *owner* (the first file claimed with it): the
    owner counts the row as computed; another job that takes it counts it as served, as
    a row it borrows from a job or finds in the cache."""

    def __init__(self, truncation: int, sharing: RowSharing, slots: int = 1,
                 metrics: Any = None) -> None:
        self.truncation = truncation
        self.sharing = sharing
        self.metrics = metrics  # vnpd.daemon.metrics.Metrics: head batches are embedded too
        self.slots = max(1, slots)  # devices: a claim's peek is HEAD_BATCHES batches each
        self._pending: deque[_Entry] = deque()
        self._owner: dict[bytes, int] = {}  # pending, in flight or ready -> its job
        self._ready: dict[bytes, np.ndarray] = {}
        self._active: set[int] = set()  # jobs whose head is open: claimed, not yet started
        self._lenders = itertools.count(-1, -1)
        self.computed = 0  # rows returned by head batches
        self.taken = 0     # of them, rows a job took from here (loans are counted by jobs)

    def open(self, job_id: int) -> None:
        """A file was claimed: its peek may follow (:meth:`add`)."""
        self._active.add(job_id)

    def add(self, job_id: int, proteins: Sequence[tuple[str, str]],
            cache: RowCache | None = None) -> int:
        """Queue a claimed file's first proteins ((record id, residues), in file order) for
        head batches; returns how many were new. Rows that a job computes now, or that
        ``cache`` holds, are left to the job. Nothing is queued once the job started."""
        if job_id not in self._active:
            return 0
        fresh: dict[bytes, tuple[str, str]] = {}
        for record_id, sequence in proteins:
            if sequence and len(sequence) <= self.truncation:  # longer: windows, not a row
                fresh.setdefault(row_key(sequence, self.truncation), (record_id, sequence))
        for key in [k for k in fresh if k in self._owner or self.sharing.is_lent(k)]:
            del fresh[key]
        if fresh and cache is not None:
            keys = list(fresh)
            cached = cache.lookup(key_array(keys))
            for i in cached:
                del fresh[keys[i]]
        for key, (record_id, sequence) in fresh.items():
            self._owner[key] = job_id
            self._pending.append(_Entry(job_id, key, record_id, sequence))
        if fresh:
            log.info("head_start_queued", job=job_id, sequences=len(fresh))
        return len(fresh)

    def started(self, job_id: int) -> None:
        """The job is indexed and serves its own batches: its proteins not yet sent are
        dropped (the job packs them itself); what is in flight or back stays for it."""
        self._active.discard(job_id)
        kept: deque[_Entry] = deque()
        for entry in self._pending:
            if entry.job_id == job_id:
                del self._owner[entry.key]
            else:
                kept.append(entry)
        self._pending = kept

    def forget(self, job_id: int) -> None:
        """The job left (finished, failed, published as a copy): drop all of its head."""
        self.started(job_id)
        for key in [k for k, owner in self._owner.items() if owner == job_id and k in self._ready]:
            del self._ready[key], self._owner[key]

    def pending(self) -> int:
        return len(self._pending)

    def budget(self, max_tokens: int) -> int:
        """Tokens a claim's peek reads, for batches of ``max_tokens``."""
        return HEAD_BATCHES * self.slots * max_tokens

    def take_batch(self, max_tokens: int, batch_id: int) -> Dispatch | None:
        """A head batch of up to ``max_tokens`` tokens (at least one protein), or None."""
        if not self._pending:
            return None
        entries: list[_Entry] = []
        tokens = 0
        while self._pending:
            cost = len(self._pending[0].sequence) + 2
            if entries and tokens + cost > max_tokens:
                break
            entries.append(self._pending.popleft())
            tokens += cost
        lender = next(self._lenders)
        keys = tuple(e.key for e in entries)
        self.sharing.lend_keys(lender, keys)
        batch = build_batch(np.arange(len(entries)), [e.sequence for e in entries],
                            self.truncation, ids=[e.record_id for e in entries])
        key = HeadKey(lender, keys, tuple(e.job_id for e in entries))
        return Dispatch(key, batch_id, batch)

    def take_outcome(self, outcome: Outcome, jobs: dict[int, ActiveJob], journal: Journal,
                     cache: RowCache | None = None) -> Outcome | None:
        """Take in what became of head batches (rows that went to jobs as loans, or that no
        job waits for, are stored in ``cache``, as computed rows are); returns the rest of ``outcome`` (what is of jobs'
        batches), or None."""
        if isinstance(outcome, BatchesLost):
            heads = [d for d in outcome.dispatches if isinstance(d.key, HeadKey)]
            for dispatch in heads:
                self.failed(dispatch, jobs, journal, outcome.reason)
            if not heads:
                return outcome
            rest = [d for d in outcome.dispatches if not isinstance(d.key, HeadKey)]
            return BatchesLost(rest, outcome.reason) if rest else None
        if not isinstance(outcome.dispatch.key, HeadKey):
            return outcome
        if isinstance(outcome, BatchDone):
            self.done(outcome.dispatch, outcome.rows, jobs, journal, cache)
        else:
            self.failed(outcome.dispatch, jobs, journal, f"{outcome.kind}: {outcome.message}")
        return None

    def loan_tokens(self, job: ActiveJob, pieces: PieceIndex, borrowed: np.ndarray
                    ) -> list[int]:
        """The tokens to journal each borrowed row with (one batch each, ``borrowed``:
        positions): its own for a row a head batch computes for this job (computed for
        it), none otherwise (served: lent by another job, or a head row of another's)."""
        from_head = self.sharing.lent_by_head(job, borrowed)
        if not from_head.any():
            return [0] * len(borrowed)
        assert job.duplicates is not None  # lent_by_head found keys
        keys = key_list(job.duplicates.keys[np.asarray(borrowed, dtype=np.int64)])
        return [int(pieces.tokens(pieces.pieces_of(borrowed[i:i + 1])).sum())
                if head and self._owner.get(key) == job.job_id else 0
                for i, (head, key) in enumerate(zip(from_head.tolist(), keys))]

    def done(self, dispatch: Dispatch, rows: np.ndarray, jobs: dict[int, ActiveJob],
             journal: Journal, cache: RowCache | None = None) -> None:
        """A head batch returned: its rows go to the jobs that borrowed them, and wait
        here for the jobs not yet indexed. A batch with a row that is not finite counts as
        failed."""
        head: HeadKey = dispatch.key
        if not np.isfinite(rows).all():  # the jobs compute these rows, by their own rules
            self.failed(dispatch, jobs, journal, "rows that are not finite")
            return
        self.computed += len(head.keys)
        if self.metrics is not None:
            self.metrics.sequences_total.inc(len(head.keys))
            self.metrics.tokens_total.inc(dispatch.tokens)
        lent = self.sharing.awaited(head.keys)
        self.sharing.repay(head.lender, np.arange(len(head.keys)), rows, jobs, journal)
        self.sharing.release(head.lender, None, jobs, journal)  # nothing is left to lend
        log.info("head_batch_done", sequences=len(head.keys))
        keep = np.array([job_id in self._active or job_id in jobs for job_id in head.jobs],
                        dtype=bool)
        for key, row, kept in zip(head.keys, rows, keep.tolist()):
            if kept:  # cached when its job takes it: a cache hit would count as served
                self._ready[key] = row
            else:  # its job left while the batch ran
                self._owner.pop(key, None)
        store = lent | ~keep  # rows jobs borrowed, and rows no job waits for
        if cache is not None and store.any():
            cache.store(key_array(itertools.compress(head.keys, store)), rows[store])

    def failed(self, dispatch: Dispatch, jobs: dict[int, ActiveJob], journal: Journal,
               reason: str) -> None:
        """A head batch failed or was lost: its borrowers compute the rows themselves."""
        head: HeadKey = dispatch.key
        for key in head.keys:
            self._owner.pop(key, None)
        self.sharing.release(head.lender, None, jobs, journal)
        log.info("head_batch_failed", sequences=len(head.keys), reason=reason)

    def split(self, job: ActiveJob, compute: np.ndarray, start: int, hit: np.ndarray,
              hit_rows: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Of a window's rows to compute (``compute``: indices from ``start``), those whose
        rows came back from head batches. Returns (the local indices and rows of those
        queued for this job, the local indices left to compute, and ``hit`` and
        ``hit_rows`` (the window's cache hits) with those queued for another job: served)."""
        none = np.zeros(0, dtype=np.int64)
        if not self._ready or job.duplicates is None or not len(compute):
            return none, np.zeros((0, 0), dtype=np.float32), compute, hit, hit_rows
        rows = compute + start
        keys = key_list(job.duplicates.keys[rows])
        found = np.fromiter((key in self._ready for key in keys), dtype=bool, count=len(keys))
        if found.any():
            found &= whole_rows(job, rows)
        if not found.any():
            return none, np.zeros((0, 0), dtype=np.float32), compute, hit, hit_rows
        taken = [key for key, ok in zip(keys, found) if ok]
        served = np.stack([self._ready[key] for key in taken])
        own = np.array([self._owner[key] == job.job_id for key in taken], dtype=bool)
        for key in itertools.compress(taken, own):  # another's stays for its owner
            del self._ready[key], self._owner[key]
        self.taken += len(served)
        log.info("head_rows_taken", job=job.job_id, sequences=len(served))
        mine = compute[found]
        if not own.all():
            hit = np.concatenate([hit, mine[~own]])
            hit_rows = np.concatenate([r for r in (hit_rows, served[~own]) if r.size])
        return mine[own], served[own], compute[~found], hit, hit_rows
