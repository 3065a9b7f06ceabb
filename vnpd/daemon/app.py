"""`vnpd run`: the daemon's event loop, which ties inbox, jobs, workers and outbox together.

One asyncio loop owns every file and all state. Its tasks: intake (watch + scan the
inbox, claim settled files, index them in threads: ``vnpd.daemon.intake``), supervision (health
checks and dispatch), publishing (finalize, verify, atomic rename into the outbox:
``vnpd.daemon.completion``), status (``state/status.json``, sd_notify STATUS, metrics) and the
systemd watchdog.

SIGTERM/SIGINT: stop intake, let the workers finish the batches they hold (bounded by
``drain_timeout_s``), journal the rest, stop the workers, exit 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from vnpd import __version__
from vnpd.daemon.completion import JobCompletion, utc_now
from vnpd.config import EX_CONFIG, Config, ConfigError, load_config
from vnpd.daemon.inbox import InboxWatcher
from vnpd.daemon.intake import Intake
from vnpd.daemon.journal import Journal
from vnpd.log import configure_logging
from vnpd.daemon.metrics import Metrics
from vnpd.daemon.notify import Notifier, WatchdogPinger, scrub_notify_env
from vnpd.daemon.preflight import resolve_devices, validate_config
from vnpd.workers.protocol import WorkerSpec
from vnpd.output.hdf5 import OutputMeta
from vnpd.daemon.scheduler import ActiveJob, Scheduler
from vnpd.daemon.status import write_status
from vnpd.workers.local import Supervisor

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
        self.intake = Intake(cfg, self.journal, self.scheduler, self.supervisor,
                             self.completion, claimed_dir=self.claimed_dir,
                             jobs_dir=self.jobs_dir, stopping=self.stopping, wake=self.wake,
                             spawn=self._spawn, spawn_publish=self._spawn_publish,
                             embed_dim=self._embed_dim)
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
        self.intake.remove_stray_files()
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
        self._spawn(self.intake.run())
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
            self.metrics.queue_depth.set(len(self.scheduler.jobs) + len(self.intake.indexing))
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
        for job_id in self.intake.indexing:
            jobs.append({"job": job_id, "state": "indexing"})
        return {"pid": os.getpid(), "version": __version__, "updated_utc": utc_now(),
                "started_unix": self.started, "stopped": final, "metrics": self.metrics_address,
                "workers": [h.describe() for h in self.supervisor.workers], "jobs": jobs}
