"""The daemon's intake: claim settled inbox files, index them, and start their jobs.

The inbox is scanned (watch events only wake the loop up); a file that has settled is
renamed into ``state/claimed/`` and journaled as a job, then indexed in a thread. Its
partial output is created (or, on a resume, reopened) and the job goes to the scheduler.
At start, every unfinished job in the journal resumes, and claimed files the journal
never recorded are taken as new jobs.

Example::

    intake = Intake(cfg, journal, scheduler, completion, claimed_dir=state / "claimed",
                    jobs_dir=state / "jobs", stopping=stopping, wake=wake,
                    work_added=pool.changed, spawn=spawn, spawn_publish=spawn_publish,
                    model=pool.ready, faults=FaultPlan(), source_type=ProteinSource)
    intake.remove_stray_files()   # before anything runs
    spawn(intake.run())           # resume, then claim until ``stopping`` is set
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from vnpd.compute.windows import PieceIndex
from vnpd.daemon.indexing import IndexProcessDied, Indexer
from vnpd.daemon.inbox import ClaimError, SettleTracker, claim_file, scan_inbox
from vnpd.daemon.jobs import ActiveJob
from vnpd.daemon.journal import Journal
from vnpd.daemon.retry import with_disk_retry
from vnpd.daemon.scheduler import Scheduler
from vnpd.daemon.window_rows import configured_stride, slot_shape, window_plan
from vnpd.faults import FaultPlan
from vnpd.inputs.duplicates import DuplicatePlan
from vnpd.inputs.fasta import FastaError
from vnpd.inputs.source import SequenceSource, SourceSettings
from vnpd.output.background import QUEUE_BYTES
from vnpd.output.hdf5 import PartialOutput
from vnpd.output.outbox import fsync_dir, fsync_file
from vnpd.output.schema import residue_counts, row_shape
from vnpd.output.verify import IncompleteOutputError
from vnpd.workers.pool import ModelInfo

if TYPE_CHECKING:  # annotations only: the daemon hands these in
    from vnpd.config import Config
    from vnpd.daemon.completion import JobCompletion

log = structlog.get_logger()


class Intake:
    """Takes files from the inbox to the scheduler; owned by the daemon's event loop.

    The daemon owns the tasks: ``spawn`` starts one that it tracks, ``spawn_publish``
    sends a job whose partial file is already finalized to publishing, ``model`` waits
    for the model's facts (its width sizes the output), and ``work_added`` is set when a
    job has batches to dispatch. ``source_type`` is the input kind's
    :class:`SequenceSource`. ``indexing`` (the jobs being indexed) is read by the daemon's
    status.
    """

    def __init__(self, cfg: Config, journal: Journal, scheduler: Scheduler,
                 completion: JobCompletion, *, claimed_dir: Path, jobs_dir: Path,
                 stopping: asyncio.Event, wake: asyncio.Event, work_added: asyncio.Event,
                 spawn: Callable[[Any], asyncio.Task[Any]],
                 spawn_publish: Callable[[ActiveJob], None],
                 model: Callable[[], Awaitable[ModelInfo]], faults: FaultPlan,
                 source_type: type[SequenceSource]) -> None:
        self.cfg, self.journal, self.completion = cfg, journal, completion
        self.scheduler = scheduler
        self.claimed_dir, self.jobs_dir = claimed_dir, jobs_dir
        self.stopping, self.wake, self.work_added = stopping, wake, work_added
        self._spawn, self._spawn_publish, self._model = spawn, spawn_publish, model
        self.faults = faults
        self.settings = source_settings(cfg)
        self.source_type = source_type
        self.settle = SettleTracker(cfg.inbox.settle_s)
        self.indexer = Indexer(cfg.jobs.index_processes, cfg.logging.format, cfg.logging.level)
        self.indexing: set[int] = set()
        self.unrecorded_claims = False  # a claim the journal could not record (disk full)

    # Claim and index ----------------------------------------------------------------
    async def run(self) -> None:
        """Resume unfinished jobs, then claim settled files until ``stopping`` is set."""
        self.indexer.start(self.source_type, self.settings)
        await self._resume_jobs()
        while not self.stopping.is_set():
            self.wake.clear()
            if self.unrecorded_claims:
                self._recover_claimed(self.journal.claimed_names())
            if len(self.scheduler.jobs) + len(self.indexing) < self.cfg.jobs.max_active_jobs:
                for candidate in self.settle.observe(scan_inbox(self.cfg.paths.inbox)):
                    if len(self.scheduler.jobs) + len(self.indexing) >= \
                            self.cfg.jobs.max_active_jobs:
                        break
                    self._claim(candidate)
            # Events only wake us up; the scan is the truth (events can be lost).
            timeout = self.cfg.inbox.settle_s / 2 if self.settle.pending() else \
                self.cfg.inbox.rescan_interval_s
            try:
                await asyncio.wait_for(self.wake.wait(), max(0.05, timeout))
            except TimeoutError:
                pass

    def _claim(self, candidate: Any) -> None:
        name = candidate.path.name
        job_id = self.journal.next_job_id()
        try:
            # The random part keeps the name unique even if a crash left a claimed file
            # whose id the journal hands out again.
            claimed = claim_file(candidate, self.claimed_dir,
                                 f"{job_id:08d}.{uuid.uuid4().hex[:8]}-{name}")
        except ClaimError as exc:
            log.warning("claim_failed", file=name, reason=exc.reason, detail=exc.detail)
            self.settle.forget(candidate.path)
            if exc.kept is None:
                return
            # Another file was renamed over the settled one during the claim; it arrived
            # by rename, so under the writer contract it is complete: take it as it is.
            claimed = exc.kept
        self.settle.forget(candidate.path)
        self.faults.crash_at("claimed")
        job_id = self._record_claim(name, claimed)
        if job_id is not None:
            log.info("job_claimed", job=job_id, file=name, bytes=candidate.size)
            self._start_indexing(job_id, name, claimed)

    def _record_claim(self, name: str, claimed: Path) -> int | None:
        """Journal a claimed file as a new job. On a full disk, None: the file waits in
        state/claimed/ for :meth:`_recover_claimed`."""
        try:
            return self.journal.add_job(name, claimed)
        except sqlite3.OperationalError as exc:
            log.error("claim_journal_failed", file=name, claimed=str(claimed), error=str(exc))
            self.unrecorded_claims = True
            return None

    def _start_indexing(self, job_id: int, name: str, claimed: Path) -> None:
        self.indexing.add(job_id)
        if self.scheduler.head is not None:  # its first proteins, meanwhile
            self.scheduler.head.open(job_id)
            self._spawn(self._peek(job_id, claimed))
        self._spawn(self._index_job(job_id, name, claimed))

    async def _peek(self, job_id: int, claimed: Path) -> None:
        """Queue the file's first proteins for head batches (:mod:`vnpd.daemon.head_start`)."""
        head = self.scheduler.head
        assert head is not None
        await self._model()  # the batch size is the model's
        budget = head.budget(self.scheduler.max_tokens)
        if sum(j.total_tokens - j.done_tokens for j in self.scheduler.jobs.values()) > budget:
            return  # the devices have work for longer: the peek would only slow the indexing
        proteins = await self.indexer.peek(self.source_type, claimed, self.settings, budget,
                                           self.cfg.model.truncation)
        if head.add(job_id, proteins, self.scheduler.cache):
            self.work_added.set()

    async def _index_job(self, job_id: int, name: str, claimed: Path) -> None:
        directory = self.jobs_dir / str(job_id) / "index"
        try:
            source, duplicates = await self.indexer.build(
                self.source_type, claimed, directory, self.settings, self._key_truncation())
        except FastaError as exc:
            self._indexing_failed(job_id)
            await self.completion.fail_job(job_id, name, claimed, exc.to_dict(), str(exc))
            return
        except OSError as exc:
            self._indexing_failed(job_id)
            await self.completion.fail_job(job_id, name, claimed,
                                           {"reason": f"cannot read file: {exc}"}, str(exc))
            return
        except IndexProcessDied as exc:
            self._indexing_failed(job_id)
            await self.completion.fail_job(job_id, name, claimed, {"reason": str(exc)}, str(exc))
            return
        self.indexing.discard(job_id)
        total_tokens = int(self._pieces(source).row_tokens(0, source.num_rows).sum())
        key = self._cache_key(source.sha256)

        async def save() -> None:
            await asyncio.to_thread(_save_durably, source, duplicates, directory)
            self.journal.set_indexed(job_id, source.sha256, key, source.num_rows, total_tokens)
        await with_disk_retry(save, "index_save_retry", self.cfg.jobs.publish_retry_max_s,
                              job=job_id, file=name)
        previous = self.journal.published_with_key(key)
        copy = previous is not None and bool(previous.output) and Path(previous.output).is_file()
        if copy:
            # Same content, same model settings, already published: copy, don't recompute.
            await self.completion.copy_duplicate(job_id, previous, name)
        await self._activate(job_id, name, source, total_tokens, resume=copy,
                             duplicates=duplicates)

    def _indexing_failed(self, job_id: int) -> None:
        self.indexing.discard(job_id)
        self._forget_head(job_id)

    def _forget_head(self, job_id: int) -> None:
        """The job will not run in the scheduler: what its head start holds is dropped."""
        if self.scheduler.head is not None:
            self.scheduler.head.forget(job_id)

    def _key_truncation(self) -> int | None:
        """How many residues of a row its repeat key covers: in window mode a row is all
        its residues, else the truncation."""
        m = self.cfg.model
        return None if m.long_sequences == "window" else m.truncation

    def _pieces(self, source: SequenceSource) -> PieceIndex:
        """What a job's batches hold: its rows, or in window mode their windows."""
        m = self.cfg.model
        return PieceIndex.plan(source.lengths, m.truncation, configured_stride(m))

    async def _activate(self, job_id: int, name: str, source: SequenceSource,
                        total_tokens: int, *, resume: bool,
                        duplicates: DuplicatePlan | None) -> None:
        """Serve a job: resume its partial file (``resume``) or create one. A partial file
        that is already finalized (a crash came before its publish, or it is the copy of
        an identical earlier output) goes straight to publishing."""
        info = await self._model()
        dim, num_layers = info.embed_dim, max(1, len(info.layers))
        per_residue = self.cfg.output.per_residue
        pieces = self._pieces(source)
        slots = slot_shape(pieces, row_shape(dim, num_layers), per_residue)
        partial_path = self.jobs_dir / str(job_id) / "partial.h5"
        partial = None
        if resume and partial_path.exists():
            try:
                partial = PartialOutput.open_existing(partial_path)
            except IncompleteOutputError as exc:
                log.warning("partial_unreadable_restarting_job", job=job_id, error=str(exc))
            if partial is not None and not partial.finalized and (
                    partial.row_shape != row_shape(dim, num_layers)
                    or partial.has_residues != per_residue
                    or partial.window_slots_shape != slots
                    or partial.window_plan != window_plan(pieces)):
                # Layers, per_residue or windows changed across the restart: rows do not fit.
                log.warning("partial_shape_changed_restarting_job", job=job_id,
                            rows=partial.row_shape, residues=partial.has_residues,
                            window_slots=partial.window_slots_shape,
                            window_plan=partial.window_plan)
                if partial.window_plan != window_plan(pieces):
                    duplicates = None  # keyed for the other mode: repeats are computed
                partial.close()
                partial = None
        if partial is None:
            if resume:  # rows the journal calls done are not on disk: compute them again
                self.journal.reset_job(job_id)
            # Allocated in full here, so a disk too full for the output is found now; and
            # prefilled with ids, lengths and attributes, so that finalize copies nothing.
            meta = await self.completion.output_meta(name, source)
            layout: dict[str, Any] = {
                "num_layers": num_layers, "window_slots": slots,
                "window_plan": window_plan(pieces),
                "residue_counts": residue_counts(
                    np.asarray(source.lengths), self.cfg.model.truncation,
                    self.cfg.model.long_sequences) if per_residue else None}
            try:
                partial = await with_disk_retry(
                    lambda: asyncio.to_thread(self.completion.create_partial, partial_path,
                                              source, meta, dim, self.cfg.model.output_dtype,
                                              **layout),
                    "partial_create_retry", self.cfg.jobs.publish_retry_max_s, job=job_id,
                    file=name)
            except FastaError as exc:  # its writer went on after the claim: fail the job
                log.error("job_input_changed", job=job_id, file=name, error=str(exc))
                self._forget_head(job_id)
                await self.completion.fail_job(job_id, name, source.path, exc.to_dict(),
                                               str(exc))
                return
        job = ActiveJob(job_id, name, source, partial,
                        self.journal.job(job_id).next_position, total_tokens,
                        duplicates=duplicates, pieces=pieces)
        if partial.finalized:
            self._forget_head(job_id)
            self._spawn_publish(job)
            return
        partial.write_in_background(QUEUE_BYTES)  # pwrite off the event loop
        self.scheduler.add_job(job)
        self.work_added.set()

    def _cache_key(self, sha256: str) -> str:
        m, s = self.cfg.model, self.settings
        key: list[object] = [sha256, m.checkpoint, m.layer, m.dtype, m.truncation, m.output_dtype]
        if m.resolved_layers() != [m.layer] or self.cfg.output.per_residue:
            # Outputs of other shapes; keys of the one-layer mean outputs stay as they were.
            key += ["layers", m.resolved_layers(), "per_residue", self.cfg.output.per_residue]
        if s.kind != "protein":  # protein keys stay as they were, so old outputs still match
            key += [s.kind, s.proteins, s.chunk_length]
        if m.long_sequences == "window":
            key += ["window", configured_stride(m)]
        return json.dumps(key)

    # Resume -------------------------------------------------------------------------
    async def _resume_jobs(self) -> None:
        """Pick up every unfinished job of the journal, and claimed files it never recorded."""
        known = self.journal.claimed_names()
        for row in self.journal.unfinished_jobs():
            log.info("job_resume", job=row.id, file=row.name, state=row.state)
            index_dir = self.jobs_dir / str(row.id) / "index"
            published = self.completion.published_before_crash(row)
            if published is not None:
                self.completion.finish_done(row, published, int(row.total_tokens or 0), 0.0)
            elif not row.claimed_path.exists():
                self.journal.set_state(row.id, "failed", error="claimed input file is missing")
            elif row.state in ("indexed", "publishing") and index_dir.exists():
                source = self.source_type.open(row.claimed_path, index_dir, self.settings)
                # A job indexed by an older version has no plan: its repeats are computed.
                duplicates = DuplicatePlan.load(index_dir) \
                    if DuplicatePlan.exists(index_dir) else None
                await self._activate(row.id, row.name, source, int(row.total_tokens or 0),
                                     resume=True, duplicates=duplicates)
            else:
                self.journal.reset_job(row.id)
                self._start_indexing(row.id, row.name, row.claimed_path)
        self._recover_claimed(known)

    def _recover_claimed(self, known: set[str]) -> None:
        """Register files in state/claimed/ that no job names (claimed just before a
        crash, or while the journal could not be written)."""
        self.unrecorded_claims = False
        for path in sorted(self.claimed_dir.iterdir()):
            if path.name in known:
                continue
            name = path.name.split("-", 1)[1] if "-" in path.name else path.name
            job_id = self._record_claim(name, path)
            if job_id is not None:
                log.info("job_recovered", job=job_id, file=name)
                self._start_indexing(job_id, name, path)

    def remove_stray_files(self) -> None:
        """Temp files of an earlier run: partial copies and state of finished jobs."""
        unfinished = {str(r.id) for r in self.journal.unfinished_jobs()}
        for job_dir in self.jobs_dir.iterdir():
            if job_dir.name not in unfinished:
                shutil.rmtree(job_dir, ignore_errors=True)
                log.info("stray_removed", path=str(job_dir))
            else:
                # Temp copies, and compactions cut short (publish.PartialOutput._rebuild).
                for tmp in [*job_dir.glob("*.tmp*"), *job_dir.glob(".*.compact-*")]:
                    tmp.unlink(missing_ok=True)
                    log.info("stray_removed", path=str(tmp))
        for tmp in self.cfg.paths.state.glob("*.tmp*"):
            tmp.unlink(missing_ok=True)
        for tmp in self.cfg.paths.failed.glob(".*.error.json.tmp"):  # a half-written report
            tmp.unlink(missing_ok=True)


def source_settings(cfg: Config) -> SourceSettings:
    """The configuration's ``[input]`` and ``[nucleotide]`` settings."""
    return SourceSettings(kind=cfg.input.kind, proteins=cfg.nucleotide.proteins,
                          chunk_length=cfg.nucleotide.chunk_length,
                          gene_workers=cfg.nucleotide.gene_workers,
                          six_frame_workers=cfg.nucleotide.six_frame_workers)


def _save_durably(source: SequenceSource, duplicates: DuplicatePlan, directory: Path) -> None:
    """Save what a job's source needs, and its repeats, and fsync them: the journal is
    about to call the job indexed, and a restart after a power cut must find them whole."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in [*source.save(directory), *duplicates.save(directory)]:
        fsync_file(path)
    fsync_dir(directory)
    fsync_dir(directory.parent)
