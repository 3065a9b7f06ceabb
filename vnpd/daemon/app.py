"""`vnpd run`: the daemon's event loop, which ties inbox, jobs, workers and outbox together.

One asyncio loop owns every file and all state. Its tasks: intake (watch + scan the
inbox, claim settled files, index them in index processes: ``vnpd.daemon.intake``), supervision (health
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
from vnpd.config import EX_CONFIG, Config, ConfigError, load_config, parse_listen
from vnpd.daemon.cache_writer import CacheWriter
from vnpd.daemon.completion import JobCompletion
from vnpd.daemon.head_start import HeadStart
from vnpd.daemon.inbox import InboxWatcher
from vnpd.daemon.intake import Intake
from vnpd.daemon.jobs import ActiveJob
from vnpd.daemon.journal import Journal
from vnpd.daemon.metrics import Metrics
from vnpd.daemon.notify import Notifier, WatchdogPinger, scrub_notify_env
from vnpd.daemon.preflight import resolve_devices, validate_config
from vnpd.daemon.reuse import RowCache, checkpoint_digest, open_row_cache
from vnpd.daemon.scheduler import Scheduler
from vnpd.daemon.specs import worker_specs
from vnpd.daemon.status import utc_now, write_status
from vnpd.daemon.window_rows import configured_stride
from vnpd.faults import FaultPlan
from vnpd.inputs.kinds import SOURCE_KINDS
from vnpd.log import configure_logging
from vnpd.malloc import pin_mmap_threshold
from vnpd.workers.pool import ModelInfo, WorkerPool
from vnpd.workers.protocol import WorkerSpec
from vnpd.workers.restarts import Supervision

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
        _check_test_hooks(cfg)
    except ConfigError as exc:
        configure_logging("auto", "info", stream=sys.stderr)
        log.error("config_invalid", config=str(config_path), problems=exc.problems)
        sys.stderr.write(f"vnpd run: {config_path}: invalid configuration\n{exc}\n")
        return EX_CONFIG
    configure_logging(cfg.logging.format, cfg.logging.level, stream=sys.stdout)
    pin_mmap_threshold()  # rows move in buffers of MBs: give them back when freed
    profile_path = os.environ.get("VNPD_TEST_PROFILE")
    if not profile_path:
        return asyncio.run(Daemon(cfg).run())
    # Test-only: the parent's own profile (bench/parent.py), dumped at a clean exit.
    import cProfile

    profiler = cProfile.Profile()
    try:
        return profiler.runcall(asyncio.run, Daemon(cfg).run())
    finally:
        profiler.dump_stats(profile_path)


def _check_test_hooks(cfg: Config) -> None:
    """Refuse the simulated workers of ``VNPD_TEST_SIMULATE_DIM`` on anything but CPU
    devices: a GPU server must never publish simulated rows."""
    try:
        faults = FaultPlan.from_env()
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    if faults.simulate_dim and any(d != "cpu" for d in resolve_devices(cfg.workers.devices)):
        raise ConfigError(["VNPD_TEST_SIMULATE_DIM (test-only simulated workers) requires "
                           'workers.devices = ["cpu", ...]'])


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
        # A Ray pool's "auto" means the cluster's GPUs, which only the pool can count.
        self.devices = ["auto"] if cfg.workers.backend == "ray" and cfg.workers.devices == \
            "auto" else resolve_devices(cfg.workers.devices)
        self.faults = FaultPlan.from_env()  # empty unless a fault test asks for faults
        self.scheduler = Scheduler(self.journal, truncation=cfg.model.truncation,
                                   max_tokens=cfg.model.max_tokens_per_batch or 0,
                                   on_poison=cfg.jobs.on_poison, metrics=self.metrics,
                                   disk_retry_max_s=cfg.jobs.publish_retry_max_s,
                                   faults=self.faults)
        if cfg.output.per_residue:  # a loan is the pooled row only: no sharing then
            self.scheduler.sharing = None
        elif cfg.jobs.head_start == "on" or (cfg.jobs.head_start == "auto" and gpu_workers(
                cfg, self.devices)):  # CPU workers would take the indexer's cores
            self.scheduler.head = HeadStart(cfg.model.truncation, self.scheduler.sharing,
                                            slots=len(self.devices), metrics=self.metrics)
        self.pool: WorkerPool = make_pool(cfg, worker_specs(cfg, self.devices, self.faults), self.metrics)
        self.completion = JobCompletion(cfg, self.journal, self.metrics, self.jobs_dir,
                                        self.done_dir, self.pool.ready, self.faults)
        self.intake = Intake(cfg, self.journal, self.scheduler, self.completion,
                             claimed_dir=self.claimed_dir, jobs_dir=self.jobs_dir,
                             stopping=self.stopping, wake=self.wake,
                             work_added=self.pool.changed, spawn=self._spawn,
                             spawn_publish=self._spawn_publish, model=self._ready_for_jobs,
                             faults=self.faults, source_type=SOURCE_KINDS[cfg.input.kind])
        self.publishing: set[asyncio.Task[Any]] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.cache: RowCache | None = None
        self.cache_settled = asyncio.Event()
        self.last_progress = time.monotonic()
        self.started = time.time()
        self.ready_sent = False
        self.metrics_address: str | None = None

    # Main ---------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        log.info("daemon_start", version=__version__, pid=os.getpid(), devices=self.devices,
                 model=self.cfg.model.checkpoint, inbox=str(self.cfg.paths.inbox),
                 outbox=str(self.cfg.paths.outbox))
        if self.faults.simulate_dim:
            log.warning("test_simulated_workers", dim=self.faults.simulate_dim,
                        meaning="workers compute no model: outputs are test data")
        self.intake.remove_stray_files()
        listen = self.metrics.start_server(parse_listen(self.cfg.metrics.listen))
        if listen:
            self.metrics_address = f"{listen[0]}:{listen[1]}"
            log.info("metrics_listening", address=self.metrics_address)
        self.pool.start(loop)
        watcher = InboxWatcher(self.cfg.paths.inbox, loop, self.wake,
                               polling=self.cfg.inbox.polling)
        watcher.start()
        self._spawn(self._model_ready())
        self._spawn(self._open_cache())
        self._spawn(self._supervise())
        self._spawn(self._complete_jobs())
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
        log.info("draining", inflight=sum(self.pool.inflight().values()))
        stop = asyncio.ensure_future(self.pool.stop(DRAIN_TIMEOUT_S))
        while not stop.done():  # results arriving meanwhile are written
            self._apply_outcomes()
            await asyncio.wait([stop], timeout=0.05)
        await stop
        self._apply_outcomes()
        await self.scheduler.commit(wait=True)
        for task in list(self.tasks - self.publishing):
            task.cancel()
        self.intake.indexer.close()  # a file half indexed is indexed again at the next start
        if self.publishing:
            # A publish left unfinished here (a full outbox, say) resumes after the restart:
            # every step of it is journaled or idempotent.
            _, unfinished = await asyncio.wait(list(self.publishing), timeout=30)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        for job in list(self.scheduler.jobs.values()):
            job.partial.close()
        if self.cache is not None:
            self.scheduler.cache = None
            await asyncio.to_thread(self.cache.close)
        self.metrics.stop_server()
        self._write_status(self._status(final=True))
        self.journal.close()
        code = getattr(self, "exit_code", 0)
        if self.pool.all_degraded():
            code = 1
        log.info("daemon_exit", code=code)
        return code

    # Supervision --------------------------------------------------------------------
    async def _supervise(self) -> None:
        last_ping = last_commit = 0.0
        while not self.stopping.is_set():
            self.pool.check_workers()
            if self.pool.all_degraded():
                log.critical("all_devices_degraded", devices=self.devices)
                self.exit_code = 1
                self.stopping.set()
                return
            if not self.ready_sent and self.pool.all_ready():
                self.ready_sent = True
                self.notifier.ready("workers ready")
                log.info("daemon_ready", workers=len(self.pool.describe()))
            # Dispatch before writing rows: the devices get their next batch sooner.
            if self.pool.dispatch(self.scheduler):
                self.last_progress = time.monotonic()
            self._apply_outcomes()
            now = time.monotonic()
            # A job's last rows are committed at once: its publish need not wait.
            if now - last_commit > COMMIT_INTERVAL_S or any(
                    job.awaits_commit() for job in self.scheduler.jobs.values()):
                self._spawn(self.scheduler.commit())  # its fsync runs in a thread
                last_commit = now
            if now - last_ping > self.cfg.workers.heartbeat_interval_s:
                self.pool.ping_workers()
                last_ping = now
            self.pool.changed.clear()
            try:
                await asyncio.wait_for(self.pool.changed.wait(), CHECK_INTERVAL_S)
            except TimeoutError:
                pass

    def _healthy(self) -> bool:
        """Watchdog condition: a worker with a fresh heartbeat and no stalled job."""
        # Fresh = a few heartbeat intervals: a wedged worker stops the watchdog pings well
        # before the supervisor's kill timeout, so systemd sees the trouble too.
        w = self.cfg.workers
        if not self.pool.healthy(min(w.heartbeat_timeout_s, 5 * w.heartbeat_interval_s)):
            return False
        busy = any(job.inflight for job in self.scheduler.jobs.values())
        return not busy or time.monotonic() - self.last_progress < STALL_TIMEOUT_S

    def _apply_outcomes(self) -> None:
        """Hand what the pool reported (rows, failures, lost batches) to the scheduler."""
        for outcome in self.pool.take_outcomes():
            self.scheduler.apply(outcome)

    async def _open_cache(self) -> None:
        """Open the embedding cache: the checkpoint is hashed while the workers load, and
        the store opens once the model's resolved layers are known. Jobs start only after
        this (``_ready_for_jobs``), so that every row they compute is stored."""
        c, m = self.cfg.cache, self.cfg.model
        try:
            if not c.enabled or self.cfg.output.per_residue:
                # Per-residue rows are not cached (an entry holds the pooled rows only);
                # repeats within a file are still computed once.
                return
            directory = Path(c.path) if c.path else self.cfg.paths.state / "cache"
            writer: CacheWriter | None = None
            try:
                # The writer process starts while the checkpoint is hashed and the model loads.
                writer = CacheWriter.spawn(directory, self.cfg.logging.format,
                                           self.cfg.logging.level)
                digest = await asyncio.to_thread(checkpoint_digest, directory, m.checkpoint)
                info = await self.pool.ready()
                self.cache = await asyncio.to_thread(
                    open_row_cache, directory, c.max_gb, digest,
                    list(info.layers or (info.layer,)), m.dtype, m.output_dtype, m.truncation,
                    configured_stride(m), writer)
            except Exception as exc:  # a cache that cannot open costs speed, never results
                log.error("cache_unavailable", path=str(directory), error=str(exc))
                return
            finally:
                if self.cache is None and writer is not None:
                    writer.close()  # never opened (or cancelled): it ends at once
            self.scheduler.cache = self.cache
        finally:
            self.cache_settled.set()

    async def _ready_for_jobs(self) -> ModelInfo:
        """The model's facts, once the cache (if any) is open too."""
        info = await self.pool.ready()
        await self.cache_settled.wait()
        return info

    async def _model_ready(self) -> None:
        """Pack for the budget the devices chose, once the model is known."""
        info = await self.pool.ready()
        if not self.cfg.model.max_tokens_per_batch:
            self.scheduler.max_tokens = info.max_tokens

    # Completion ---------------------------------------------------------------------
    async def _complete_jobs(self) -> None:
        """Publish each job the scheduler finished, or fail it; the queue is the handover."""
        while True:
            job = await self.scheduler.finished.get()
            self.last_progress = time.monotonic()
            if job.failed:
                job.partial.close()
                self._spawn(self.completion.fail_job(job.job_id, job.name, job.source.path,
                                                     {"reason": job.failed}, job.failed))
                continue
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
            for device, held in self.pool.inflight().items():
                self.metrics.batches_inflight.labels(device=device).set(held)
            self.metrics.update_busy(time.time())
            if self.cache is not None:
                reads, writes = await asyncio.to_thread(self.cache.stats)
                self.metrics.update_cache(reads.hits, reads.misses, writes.evictions,
                                          writes.file_bytes)
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
                "workers": self.pool.describe(), "jobs": jobs}


def make_pool(cfg: Config, specs: list[WorkerSpec], metrics: Any = None) -> WorkerPool:
    """The pool of ``cfg.workers.backend`` with one slot per spec (ray: a spec with device
    "auto" stands for every GPU of the cluster)."""
    w = cfg.workers
    supervision = Supervision(
        heartbeat_timeout_s=w.heartbeat_timeout_s, batch_deadline_base_s=w.batch_deadline_base_s,
        batch_deadline_per_1k_tokens_s=w.batch_deadline_per_1k_tokens_s,
        restart_backoff_s=w.restart_backoff_s, restart_backoff_max_s=w.restart_backoff_max_s,
        crash_budget=w.crash_budget, crash_window_s=w.crash_window_s,
        degraded_retry_s=w.degraded_retry_s)
    credit = w.batches_in_flight + 1
    if w.backend == "ray":
        from vnpd.workers.ray_actor import EngineActor
        from vnpd.workers.ray_pool import RayPool

        return RayPool(specs, supervision, address=cfg.ray.address, actor=EngineActor,
                       credit=credit, metrics=metrics, auto_device=cfg.ray.auto_device,
                       placement_timeout_s=cfg.ray.placement_timeout_s)
    from vnpd.workers.local import LocalPool

    return LocalPool(specs, supervision, credit=credit, metrics=metrics)


def gpu_workers(cfg: Config, devices: list[str]) -> bool:
    """Whether every worker runs on a GPU (``devices`` resolved; ["auto"]: a Ray cluster's)."""
    if devices == ["auto"]:
        return cfg.ray.auto_device == "gpu"
    return "cpu" not in devices
