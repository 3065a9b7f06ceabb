"""`vnpd run`: the daemon's event loop, which ties inbox, jobs, workers and outbox together.

One asyncio loop owns every file and all state. Its tasks: intake (watch + scan the
inbox, claim settled files, index them in threads), supervision (health checks and
dispatch), publishing (finalize, verify, atomic rename into the outbox), status
(``state/status.json``, sd_notify STATUS, metrics) and the systemd watchdog.

SIGTERM/SIGINT: stop intake, let the workers finish the batches they hold (bounded by
``drain_timeout_s``), journal the rest, stop the workers, exit 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import structlog

from vnpd import __version__
from vnpd.completion import JobCompletion, utc_now, with_disk_retry
from vnpd.config import EX_CONFIG, Config, ConfigError, load_config
from vnpd.fasta import FastaError
from vnpd.inbox import ClaimError, InboxWatcher, SettleTracker, claim_file, scan_inbox
from vnpd.index import FileIndex, index_fasta
from vnpd.journal import Journal
from vnpd.log import configure_logging
from vnpd.metrics import Metrics
from vnpd.notify import Notifier, WatchdogPinger, scrub_notify_env
from vnpd.outbox import fsync_dir, fsync_file
from vnpd.packing import tokens_for
from vnpd.preflight import resolve_devices, validate_config
from vnpd.protocol import WorkerSpec
from vnpd.publish import OutputMeta, PartialOutput
from vnpd.scheduler import ActiveJob, Scheduler
from vnpd.status import write_status
from vnpd.supervisor import Supervisor
from vnpd.testhooks import crash_at
from vnpd.verify import IncompleteOutputError

log = structlog.get_logger()

EX_SOFTWARE = 70
DRAIN_TIMEOUT_S = 120.0
CHECK_INTERVAL_S = 0.25
STALL_TIMEOUT_S = 600.0
COMMIT_INTERVAL_S = 0.5


def run_daemon(config_path: Path, overrides: dict[str, object]) -> int:
    """Load and validate the configuration, then run until SIGTERM/SIGINT. Returns the exit code."""
    try:
        cfg = load_config(config_path, overrides=overrides)
        validate_config(cfg)
    except ConfigError as exc:
        configure_logging("auto", "info", stream=sys.stderr)
        log.error("config_invalid", config=str(config_path), problems=exc.problems)
        sys.stderr.write(f"vnpd run: {config_path}: invalid configuration\n{exc}\n")
        return EX_CONFIG
    configure_logging(cfg.logging.format, cfg.logging.level, stream=sys.stdout)
    return asyncio.run(Daemon(cfg).run())


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        paths = cfg.paths
        self.claimed_dir = paths.state / "claimed"
        self.jobs_dir = paths.state / "jobs"
        self.done_dir = paths.state / "done"
        for d in (paths.inbox, paths.outbox, paths.failed, self.claimed_dir, self.jobs_dir,
                  self.done_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.notifier = Notifier()
        scrub_notify_env(os.environ)  # workers must never inherit NOTIFY_SOCKET
        self.metrics = Metrics()
        self.journal = Journal(paths.state / "journal.sqlite3")
        self.stopping = asyncio.Event()
        self.wake = asyncio.Event()
        self.devices = resolve_devices(cfg.workers.devices)
        self.scheduler = Scheduler(self.journal, truncation=cfg.model.truncation,
                                   max_tokens=cfg.model.max_tokens_per_batch or 0,
                                   on_poison=cfg.jobs.on_poison,
                                   on_job_complete=self._job_complete, metrics=self.metrics,
                                   disk_retry_max_s=cfg.jobs.publish_retry_max_s)
        self.supervisor = Supervisor(
            self._worker_specs(), self.scheduler,
            heartbeat_timeout_s=cfg.workers.heartbeat_timeout_s,
            batch_deadline_base_s=cfg.workers.batch_deadline_base_s,
            batch_deadline_per_1k_tokens_s=cfg.workers.batch_deadline_per_1k_tokens_s,
            restart_backoff_s=cfg.workers.restart_backoff_s,
            restart_backoff_max_s=cfg.workers.restart_backoff_max_s,
            crash_budget=cfg.workers.crash_budget, crash_window_s=cfg.workers.crash_window_s,
            degraded_retry_s=cfg.workers.degraded_retry_s,
            credit=cfg.workers.batches_in_flight + 1, metrics=self.metrics)
        self.completion = JobCompletion(cfg, self.journal, self.metrics, self.jobs_dir,
                                        self.done_dir, self._output_meta)
        self.settle = SettleTracker(cfg.inbox.settle_s)
        self.indexing: set[int] = set()
        self.unrecorded_claims = False  # a claim the journal could not record (disk full)
        self.publishing: set[asyncio.Task[Any]] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.attention_backend = ""
        self.layer = -1
        self.last_progress = time.monotonic()
        self.started = time.time()
        self.ready_sent = False
        self.metrics_address: str | None = None

    def _worker_specs(self) -> list[WorkerSpec]:
        cfg = self.cfg
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        visible_list = visible.split(",") if visible else None
        cpu_workers = sum(1 for d in self.devices if d == "cpu")
        threads = max(1, (os.cpu_count() or 1) // max(1, cpu_workers)) if cpu_workers else 0
        specs = []
        for i, device in enumerate(self.devices):
            if device == "cpu":
                env = {"CUDA_VISIBLE_DEVICES": ""}
            else:
                n = int(device.split(":")[1])
                env = {"CUDA_VISIBLE_DEVICES": visible_list[n] if visible_list else str(n)}
            specs.append(WorkerSpec(
                worker_id=i, device=device, checkpoint=cfg.model.checkpoint, dtype=cfg.model.dtype,
                layer=cfg.model.layer, truncation=cfg.model.truncation,
                max_tokens=cfg.model.max_tokens_per_batch,
                heartbeat_interval_s=cfg.workers.heartbeat_interval_s,
                log_format=cfg.logging.format, log_level=cfg.logging.level,
                threads=threads if device == "cpu" else 0, env=env))
        return specs

    # Main ---------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        log.info("daemon_start", version=__version__, pid=os.getpid(), devices=self.devices,
                 model=self.cfg.model.checkpoint, inbox=str(self.cfg.paths.inbox),
                 outbox=str(self.cfg.paths.outbox))
        self._remove_stray_files()
        listen = self.metrics.start_server(self.cfg.metrics.listen)
        if listen:
            self.metrics_address = f"{listen[0]}:{listen[1]}"
            log.info("metrics_listening", address=self.metrics_address)
        self.supervisor.start(loop)
        watcher = InboxWatcher(self.cfg.paths.inbox, loop, self.wake,
                               polling=self.cfg.inbox.polling)
        watcher.start()
        self._spawn(self._supervise())
        self._spawn(self._status_loop())
        self._spawn(self._intake_loop())
        self._spawn(WatchdogPinger(self.notifier).run(self._healthy))
        exit_code = 0
        try:
            await self.stopping.wait()
        finally:
            exit_code = await self._shutdown(watcher)
        return exit_code

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _spawn_publish(self, job: ActiveJob) -> None:
        try:
            self.journal.set_state(job.job_id, "publishing")
        except sqlite3.OperationalError as exc:
            # A full disk. Harmless: the publish journals its output name (with retries),
            # and until then a restart resumes the job, finds nothing left, and publishes.
            log.error("journal_write_failed", job=job.job_id, error=str(exc))
        task = self._spawn(self.completion.publish(job))
        self.publishing.add(task)
        task.add_done_callback(self.publishing.discard)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task_crashed", task=task.get_coro().__qualname__,
                      error=repr(task.exception()))
            self.exit_code = EX_SOFTWARE
            self.stopping.set()

    def _on_signal(self, sig: int) -> None:
        log.info("signal_received", signal=signal.Signals(sig).name)
        self.notifier.stopping()
        self.stopping.set()

    async def _shutdown(self, watcher: InboxWatcher) -> int:
        watcher.stop()
        log.info("draining", inflight=sum(len(h.inflight) for h in self.supervisor.workers))
        await self.supervisor.stop(DRAIN_TIMEOUT_S)  # results arriving meanwhile are written
        self.scheduler.commit()
        for task in list(self.tasks - self.publishing):
            task.cancel()
        if self.publishing:
            # A publish left unfinished here (a full outbox, say) resumes after the restart:
            # every step of it is journaled or idempotent.
            _, unfinished = await asyncio.wait(list(self.publishing), timeout=30)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        for job in list(self.scheduler.jobs.values()):
            job.partial.close()
        self.metrics.stop_server()
        self._write_status(self._status(final=True))
        self.journal.close()
        code = getattr(self, "exit_code", 0)
        if self.supervisor.all_degraded():
            code = 1
        log.info("daemon_exit", code=code)
        return code

    # Supervision --------------------------------------------------------------------
    async def _supervise(self) -> None:
        last_ping = last_commit = 0.0
        while not self.stopping.is_set():
            self.supervisor.check_workers()
            if self.supervisor.all_degraded():
                log.critical("all_devices_degraded", devices=self.devices)
                self.exit_code = 1
                self.stopping.set()
                return
            if not self.ready_sent and self.supervisor.all_ready():
                self.ready_sent = True
                self.notifier.ready("workers ready")
                log.info("daemon_ready", workers=len(self.supervisor.workers))
            if self.supervisor.dispatch():
                self.last_progress = time.monotonic()
            now = time.monotonic()
            if now - last_commit > COMMIT_INTERVAL_S:
                self.scheduler.commit()
                last_commit = now
            if now - last_ping > self.cfg.workers.heartbeat_interval_s:
                self.supervisor.ping_workers()
                last_ping = now
            self.supervisor.changed.clear()
            try:
                await asyncio.wait_for(self.supervisor.changed.wait(), CHECK_INTERVAL_S)
            except TimeoutError:
                pass

    def _healthy(self) -> bool:
        """Watchdog condition: a worker with a fresh heartbeat and no stalled job."""
        # Fresh = a few heartbeat intervals: a wedged worker stops the watchdog pings well
        # before the supervisor's kill timeout, so systemd sees the trouble too.
        w = self.cfg.workers
        if not self.supervisor.healthy(min(w.heartbeat_timeout_s, 5 * w.heartbeat_interval_s)):
            return False
        busy = any(job.inflight for job in self.scheduler.jobs.values())
        return not busy or time.monotonic() - self.last_progress < STALL_TIMEOUT_S

    # Intake -------------------------------------------------------------------------
    async def _intake_loop(self) -> None:
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
        crash_at("claimed")
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
        self._spawn(self._index_job(job_id, name, claimed))

    async def _index_job(self, job_id: int, name: str, claimed: Path) -> None:
        try:
            index = await asyncio.to_thread(index_fasta, claimed)
        except FastaError as exc:
            self.indexing.discard(job_id)
            await self.completion.fail_job(job_id, name, claimed, exc.to_dict(), str(exc))
            return
        except OSError as exc:
            self.indexing.discard(job_id)
            await self.completion.fail_job(job_id, name, claimed,
                                           {"reason": f"cannot read file: {exc}"}, str(exc))
            return
        self.indexing.discard(job_id)
        total_tokens = int(tokens_for(index.lengths, self.cfg.model.truncation).sum())
        key = self._cache_key(index.sha256)

        async def save() -> None:
            await asyncio.to_thread(_save_durably, index, self.jobs_dir / str(job_id) / "index")
            self.journal.set_indexed(job_id, index.sha256, key, index.num_records, total_tokens)
        await with_disk_retry(save, "index_save_retry", self.cfg.jobs.publish_retry_max_s,
                              job=job_id, file=name)
        previous = self.journal.published_with_key(key)
        copy = previous is not None and bool(previous.output) and Path(previous.output).is_file()
        if copy:
            # Same content, same model settings, already published: copy, don't recompute.
            await self.completion.copy_duplicate(job_id, previous, name)
        await self._activate(job_id, name, claimed, index, total_tokens, resume=copy)

    async def _activate(self, job_id: int, name: str, claimed: Path, index: FileIndex,
                        total_tokens: int, *, resume: bool) -> None:
        """Serve a job: resume its partial file (``resume``) or create one. A partial file
        that is already finalized (a crash came before its publish, or it is the copy of
        an identical earlier output) goes straight to publishing."""
        dim = await self._embed_dim()
        partial_path = self.jobs_dir / str(job_id) / "partial.h5"
        partial = None
        if resume and partial_path.exists():
            try:
                partial = PartialOutput.open_existing(partial_path)
            except IncompleteOutputError as exc:
                log.warning("partial_unreadable_restarting_job", job=job_id, error=str(exc))
        if partial is None:
            if resume:  # rows the journal calls done are not on disk: compute them again
                self.journal.reset_job(job_id)
            # Allocated in full here, so a disk too full for the output is found now.
            partial = await with_disk_retry(
                lambda: asyncio.to_thread(PartialOutput.create, partial_path, index.num_records,
                                          dim, self.cfg.model.output_dtype),
                "partial_create_retry", self.cfg.jobs.publish_retry_max_s, job=job_id, file=name)
        job = ActiveJob(job_id, name, claimed, index, partial,
                        self.journal.job(job_id).next_position, total_tokens)
        if partial.finalized:
            self._spawn_publish(job)
            return
        self.scheduler.add_job(job)
        self.supervisor.changed.set()

    async def _embed_dim(self) -> int:
        """The model's embedding width, known once a worker has loaded it."""
        while True:
            for h in self.supervisor.workers:
                if h.embed_dim:
                    self.attention_backend, self.layer = h.attention_backend, h.layer
                    if not self.cfg.model.max_tokens_per_batch:
                        # Pack for the smallest budget any ready device chose from its memory.
                        self.scheduler.max_tokens = min(w.max_tokens for w in
                                                        self.supervisor.workers if w.max_tokens)
                    return h.embed_dim
            await asyncio.sleep(0.1)

    async def _output_meta(self, job: ActiveJob) -> OutputMeta:
        await self._embed_dim()  # the resolved layer and backend come from a ready worker
        m = self.cfg.model
        return OutputMeta(model=m.checkpoint, layer=self.layer, dtype=m.dtype,
                          truncation=m.truncation, attention_backend=self.attention_backend,
                          source_name=job.name, source_sha256=job.index.sha256)

    def _cache_key(self, sha256: str) -> str:
        m = self.cfg.model
        return json.dumps([sha256, m.checkpoint, m.layer, m.dtype, m.truncation, m.output_dtype])

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
                await self._activate(row.id, row.name, row.claimed_path,
                                     FileIndex.load(index_dir), int(row.total_tokens or 0),
                                     resume=True)
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

    def _remove_stray_files(self) -> None:
        """Temp files of an earlier run: partial copies and state of finished jobs."""
        unfinished = {str(r.id) for r in self.journal.unfinished_jobs()}
        for job_dir in self.jobs_dir.iterdir():
            if job_dir.name not in unfinished:
                shutil.rmtree(job_dir, ignore_errors=True)
                log.info("stray_removed", path=str(job_dir))
            else:
                # Temp copies, and compactions cut short (publish.PartialOutput._compact).
                for tmp in [*job_dir.glob("*.tmp*"), *job_dir.glob(".*.compact-*")]:
                    tmp.unlink(missing_ok=True)
                    log.info("stray_removed", path=str(tmp))
        for tmp in self.cfg.paths.state.glob("*.tmp*"):
            tmp.unlink(missing_ok=True)
        for tmp in self.cfg.paths.failed.glob(".*.error.json.tmp"):  # a half-written report
            tmp.unlink(missing_ok=True)

    # Completion ---------------------------------------------------------------------
    def _job_complete(self, job: ActiveJob) -> None:
        """Called by the scheduler when a job has no work left (or failed)."""
        self.scheduler.remove_job(job.job_id)
        self.last_progress = time.monotonic()
        if job.failed:
            job.partial.close()
            self._spawn(self.completion.fail_job(job.job_id, job.name, job.source,
                                                 {"reason": job.failed}, job.failed))
            return
        self._spawn_publish(job)

    # Status -------------------------------------------------------------------------
    async def _status_loop(self) -> None:
        while not self.stopping.is_set():
            status = self._status()
            await asyncio.to_thread(self._write_status, status)
            ready = sum(1 for w in status["workers"] if w["state"] == "ready")
            self.notifier.status(f"{len(status['jobs'])} jobs active, "
                                 f"{self.scheduler.queued_sequences()} sequences queued, "
                                 f"{ready}/{len(status['workers'])} workers ready")
            self.metrics.queue_depth.set(len(self.scheduler.jobs) + len(self.indexing))
            self.metrics.queued_sequences.set(self.scheduler.queued_sequences())
            self.metrics.workers_ready.set(ready)
            for h in self.supervisor.workers:
                self.metrics.batches_inflight.labels(device=h.device).set(len(h.inflight))
            self.metrics.update_busy(time.time())
            await asyncio.sleep(1.0)

    def _write_status(self, status: dict[str, Any]) -> None:
        try:
            write_status(self.cfg.paths.state, status)
        except OSError as exc:  # a full disk: the snapshot is only for `vnpd status`
            log.warning("status_write_failed", error=str(exc))

    def _status(self, final: bool = False) -> dict[str, Any]:
        jobs = []
        for job in self.scheduler.jobs.values():
            elapsed = time.monotonic() - job.started
            rate = job.done_tokens / elapsed if elapsed > 0 else 0.0
            remaining = job.total_tokens - job.done_tokens
            jobs.append({"job": job.job_id, "file": job.name, "state": "running",
                         "sequences": job.num_records, "sequences_done": job.done_sequences,
                         "tokens": job.total_tokens, "tokens_done": job.done_tokens,
                         "tokens_per_s": round(rate, 1),
                         "eta_s": round(remaining / rate, 1) if rate > 0 else None})
        for job_id in self.indexing:
            jobs.append({"job": job_id, "state": "indexing"})
        return {"pid": os.getpid(), "version": __version__, "updated_utc": utc_now(),
                "started_unix": self.started, "stopped": final, "metrics": self.metrics_address,
                "workers": [h.describe() for h in self.supervisor.workers], "jobs": jobs}


def _save_durably(index: FileIndex, directory: Path) -> None:
    """Save a job's index and fsync it: the journal is about to call the job indexed,
    and a restart after a power cut must find the files whole."""
    index.save(directory)
    for path in directory.iterdir():
        fsync_file(path)
    fsync_dir(directory)
    fsync_dir(directory.parent)
