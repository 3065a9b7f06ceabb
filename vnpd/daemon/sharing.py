"""Rows shared by jobs computed at the same time: a row already queued or in flight for
another active job is borrowed from it, not computed again (issue 17; docs/DAEMON.md,
"Compute once").

The registry lives in memory, in the scheduler: key (the row's SHA-256, as the cache keys
it; every job of a daemon has the same model and settings, so the same cache namespace)
-> the (job, position) whose compute batch holds it. A job registers the rows of a window
when it queues their batches, and a row leaves the registry when its lender writes it
(:meth:`RowSharing.settle`) or gives it up (poisoned, job failed or removed:
:meth:`RowSharing.release`).

A borrower journals each borrowed row as a batch of its own with no tokens, and keeps it
in :attr:`vnpd.daemon.jobs.ActiveJob.borrowed`. When the lender's row is written, the
scheduler writes it into the borrower's partial file too, and the batch becomes unflushed:
the next commit flushes the file, then marks it done, as for any other row. A crash before
that leaves a pending batch of no tokens, which a restart computes (``Scheduler.add_job``).
When the lender gives the row up, the borrower computes it itself
(:func:`compute_instead`), so it is quarantined, or fails its job, by its own rules.
With per-residue output there are no loans (the daemon sets ``Scheduler.sharing`` to
None): a loan carries the pooled row only.

Only whole rows are lent: in window mode, the rows of one window (as the cache).

Example::

    sharing = RowSharing()
    borrowed, compute = sharing.split(job, compute, start)   # reading a window
    sharing.register(job, compute + start, borrowed, batch_nos)  # once journaled
    sharing.repay(lender.job_id, positions, rows, jobs, journal)  # rows written
    sharing.release(job.job_id, None, jobs, journal)  # a job left: borrowers compute
"""

from __future__ import annotations

import collections
import itertools
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import structlog

from vnpd.daemon.jobs import QueuedBatch
from vnpd.daemon.rows import write_with_copies
from vnpd.inputs.duplicates import key_list

if TYPE_CHECKING:  # annotations only
    from vnpd.compute.windows import PieceIndex
    from vnpd.daemon.jobs import ActiveJob
    from vnpd.daemon.journal import Journal

log = structlog.get_logger()


@dataclass(frozen=True)
class Loan:
    """A borrowed row: the borrower's job, its batch of that one row, and the row."""

    job_id: int
    batch_no: int
    position: int


def job_index(job: ActiveJob) -> PieceIndex:
    """The job's piece index: planned (``piece_batches.job_pieces``) when its first window
    was read, before any of its rows was lent or borrowed."""
    assert job.pieces is not None
    return job.pieces


def whole_rows(job: ActiveJob, rows: np.ndarray) -> np.ndarray:
    """Whether each row is computed whole (one piece): only those are lent or borrowed."""
    index = job_index(job)
    if index.offsets is None:
        return np.ones(len(rows), dtype=bool)
    rows = np.asarray(rows, dtype=np.int64)
    return (index.offsets[rows + 1] - index.offsets[rows]) == 1


class RowSharing:
    """key -> the (job, position) computing it, and the loans waiting on it."""

    def __init__(self) -> None:
        self._lenders: dict[bytes, tuple[int, int]] = {}
        self._lent: dict[int, dict[int, bytes]] = {}    # job -> {position: key}
        self._loans: dict[bytes, list[Loan]] = {}

    def __len__(self) -> int:
        return len(self._lenders)

    def split(self, job: ActiveJob, compute: np.ndarray, start: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """Of a window's rows to compute (``compute``: indices from ``start``), those that
        another job computes now. Returns (their positions, the local indices left)."""
        rows = compute + start
        borrow = self.lenders_of(job, rows)
        if borrow.any():
            borrow &= whole_rows(job, rows)
        return rows[borrow], compute[~borrow]

    def register(self, job: ActiveJob, computed: np.ndarray, borrowed: np.ndarray,
                 batch_nos: list[int]) -> None:
        """A window's batches are journaled and queued: ``job`` lends the whole rows of
        ``computed`` and borrows ``borrowed`` (batch ``batch_nos[i]`` each)."""
        self.borrow(job, borrowed, batch_nos)
        self.lend(job, computed[whole_rows(job, computed)])
        if len(borrowed):
            log.debug("rows_borrowing", job=job.job_id, rows=len(borrowed))

    def lenders_of(self, job: ActiveJob, rows: np.ndarray) -> np.ndarray:
        """Mask of ``rows`` (positions of ``job``) that another job computes now."""
        return np.fromiter((lender is not None and lender[0] != job.job_id
                            for lender in self._lenders_of_rows(job, rows)),
                           dtype=bool, count=len(rows))

    def lend(self, job: ActiveJob, rows: np.ndarray) -> None:
        """``job`` computes ``rows`` (queued): register those that no job computes yet."""
        if job.duplicates is None or not len(rows):
            return
        lent = self._lent.setdefault(job.job_id, {})
        # Dict and set operations over whole windows: with a Python step per row, this,
        # lenders_of and settle cost the parent's loop twice as much (1.26 against
        # 0.68 us a row).
        keys, positions = key_list(job.duplicates.keys[rows]), np.asarray(rows).tolist()
        fresh = dict(zip(reversed(keys), reversed(positions)))  # a key's first row wins
        for key in fresh.keys() & self._lenders.keys():
            del fresh[key]
        self._lenders.update(zip(fresh, zip(itertools.repeat(job.job_id), fresh.values())))
        lent.update(zip(fresh.values(), fresh))

    def lend_keys(self, lender: int, keys: Sequence[bytes]) -> None:
        """A lender that is no job (below zero: a head batch, :mod:`vnpd.daemon.head_start`)
        computes ``keys[i]`` as its position i: register those that no one computes yet."""
        lent = self._lent.setdefault(lender, {})
        for position, key in enumerate(keys):
            if key not in self._lenders:
                self._lenders[key] = (lender, position)
                lent[position] = key

    def is_lent(self, key: bytes) -> bool:
        """Whether a job (or a head batch) computes ``key`` now."""
        return key in self._lenders

    def awaited(self, keys: Sequence[bytes]) -> np.ndarray:
        """Mask of ``keys`` that some job waits to borrow."""
        return np.fromiter((key in self._loans for key in keys), dtype=bool, count=len(keys))

    def lent_by_head(self, job: ActiveJob, rows: np.ndarray) -> np.ndarray:
        """Mask of ``rows`` (positions of ``job``, being borrowed) whose lender is a head
        batch: the job journals those with their tokens, as rows computed for it."""
        return np.fromiter((lender is not None and lender[0] < 0
                            for lender in self._lenders_of_rows(job, rows)),
                           dtype=bool, count=len(rows))

    def _lenders_of_rows(self, job: ActiveJob, rows: np.ndarray
                         ) -> Iterable[tuple[int, int] | None]:
        """The (lender, position) computing each of ``rows`` (positions of ``job``), or
        None for each where nobody does (or the job has no keys)."""
        if job.duplicates is None or not self._lenders or not len(rows):
            return itertools.repeat(None, len(rows))
        return map(self._lenders.get,
                   key_list(job.duplicates.keys[np.asarray(rows, dtype=np.int64)]))

    def borrow(self, job: ActiveJob, rows: np.ndarray, batch_nos: list[int]) -> None:
        """``job`` waits for ``rows`` (journaled, one batch each) from their lenders."""
        if job.duplicates is None or not len(rows):
            return
        keys = key_list(job.duplicates.keys[np.asarray(rows, dtype=np.int64)])
        for key, position, batch_no in zip(keys, np.asarray(rows).tolist(), batch_nos):
            self._loans.setdefault(key, []).append(Loan(job.job_id, batch_no, position))
            job.borrowed[batch_no] = position

    def settle(self, job_id: int, positions: np.ndarray) -> tuple[list[Loan], np.ndarray]:
        """``job_id`` wrote the rows at ``positions``: the loans they repay, and for each
        the index into ``positions`` of its row. Their keys leave the registry."""
        lent = self._lent.get(job_id)
        loans: list[Loan] = []
        which: list[int] = []
        if not lent:
            return loans, np.zeros(0, dtype=np.int64)
        keys = list(map(lent.pop, np.asarray(positions).tolist(), itertools.repeat(None)))
        settled = [key for key in keys if key is not None]
        collections.deque(map(self._lenders.pop, settled), maxlen=0)  # all at C speed
        if self._loans and not self._loans.keys().isdisjoint(settled):
            for i, key in enumerate(keys):
                waiting = self._loans.pop(key, []) if key is not None else []
                loans += waiting
                which += [i] * len(waiting)
        return loans, np.asarray(which, dtype=np.int64)

    def release(self, job_id: int, positions: list[int] | None, jobs: dict[int, ActiveJob],
                journal: Journal) -> None:
        """``job_id`` will not write these rows (None: any, it left; its own loans are
        dropped too): their borrowers compute them (:meth:`orphaned`)."""
        self.orphaned(self._give_up(job_id, positions), jobs, journal)

    def _give_up(self, job_id: int, positions: list[int] | None) -> list[Loan]:
        lent = self._lent.get(job_id, {})
        keys = [lent.pop(p) for p in (list(lent) if positions is None else positions)
                if p in lent]
        if positions is None:
            self._lent.pop(job_id, None)
            for key, waiting in list(self._loans.items()):
                self._loans[key] = [loan for loan in waiting if loan.job_id != job_id]
                if not self._loans[key]:
                    del self._loans[key]
        orphans: list[Loan] = []
        for key in keys:
            del self._lenders[key]
            orphans += self._loans.pop(key, [])
        return orphans

    def repay(self, lender_id: int, positions: np.ndarray, rows: np.ndarray,
              jobs: dict[int, ActiveJob], journal: Journal, *, refuse: bool = False) -> None:
        """``lender_id`` wrote ``rows`` at ``positions``: write them (and their copies) into
        the partial files of the jobs that borrowed them, whose loans become unflushed
        batches (done at the next commit, after the flush). ``refuse``: the rows cannot be
        lent (per-residue rows); their borrowers compute them."""
        loans, which = self.settle(lender_id, positions)
        if refuse:
            self.orphaned(loans, jobs, journal)
            return
        for job_id in sorted({loan.job_id for loan in loans}):
            job = jobs.get(job_id)
            if job is None or job.failed:
                continue
            mine = [(loan, i) for loan, i in zip(loans, which.tolist())
                    if loan.job_id == job_id and job.borrowed.pop(loan.batch_no, None) is not None]
            if not mine:
                continue
            job.done_sequences += write_with_copies(
                job.partial, job.duplicates, np.array([loan.position for loan, _ in mine]),
                rows[[i for _, i in mine]])
            job.unflushed += [loan.batch_no for loan, _ in mine]
            log.debug("rows_borrowed", job=job_id, lender=lender_id, rows=len(mine))

    def orphaned(self, loans: list[Loan], jobs: dict[int, ActiveJob], journal: Journal
                 ) -> None:
        """The lenders gave these rows up: their borrowers compute them (and lend them)."""
        for loan in loans:
            job = jobs.get(loan.job_id)
            if job is not None and compute_instead(job, loan, journal):
                self.lend(job, np.array([loan.position], dtype=np.int64))


def compute_instead(job: ActiveJob, loan: Loan, journal: Journal) -> bool:
    """Queue the borrower's batch of a row its lender gave up, to be computed. Its journal
    row gets its tokens (it then counts as computed, not as served). Returns False if the
    loan no longer waited."""
    if job.failed or job.borrowed.pop(loan.batch_no, None) is None:
        return False
    index = job_index(job)
    pieces = index.pieces_of(np.array([loan.position]))
    tokens = int(index.tokens(pieces).sum())
    try:
        journal.set_tokens(job.job_id, loan.batch_no, tokens)
    except sqlite3.OperationalError as exc:  # a full disk: computed all the same
        log.error("journal_write_failed", job=job.job_id, batch=loan.batch_no, error=str(exc))
    job.queue.append(QueuedBatch(loan.batch_no, pieces, tokens))
    log.info("borrowed_row_computed", job=job.job_id, position=loan.position,
             batch=loan.batch_no)
    return True
