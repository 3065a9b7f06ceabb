"""How a job ends: published into the outbox exactly once, or moved to failed/.

Each step below is journaled or idempotent, so the daemon may die between any two of
them (tests/daemon/test_faults.py kills it at each with ``VNPD_TEST_CRASH_AT``) and the restart
finishes the job with one output, never a second ``sample.1.h5``:

1. **finalize** the partial file: it was prefilled at create (ids, lengths, row fields,
   attributes: :func:`create_partial`), so this writes the end-of-job counts and marks it
   finalized in place; with quarantined rows it writes it anew without them. A finalized
   file carries the marker, so a restart sees that and does not finalize (or compact) it
   twice.
2. **verify** it: every row written, every id readable.
3. **journal the output name** (state ``publishing``) before linking: a restart links to
   that same name, where the link is idempotent, instead of picking a fresh one.
4. **link** it into the outbox (:func:`vnpd.output.outbox.publish_atomically`).
5. **move the input** to done/ (or delete it) *before* marking the job done, so that a
   done job never leaves a claimed file behind for the restart to take as a new job.
6. **mark done**, remove the job's state, log the one-line summary.

A full or unwritable disk (an OSError, or a journal that cannot grow) is retried with
exponential backoff up to ``jobs.publish_retry_max_s`` (``vnpd.daemon.retry``); the
result waits in state/ meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import structlog

from vnpd import __version__
from vnpd.daemon.jobs import ActiveJob
from vnpd.daemon.journal import Journal, JobRow
from vnpd.daemon.metrics import Metrics
from vnpd.daemon.retry import with_disk_retry
from vnpd.daemon.status import utc_now
from vnpd.daemon.window_rows import configured_stride, write_long_rows
from vnpd.faults import FaultPlan
from vnpd.inputs.fasta import FastaError
from vnpd.inputs.index import sha256_file
from vnpd.inputs.source import SequenceSource
from vnpd.output.hdf5 import OutputMeta, PartialOutput
from vnpd.output.outbox import output_name_for, publish_atomically, unique_destination
from vnpd.output.verify import verify_output
from vnpd.workers.pool import ModelInfo

if TYPE_CHECKING:  # annotations only: the daemon hands in the loaded configuration
    from vnpd.compute.windows import PieceIndex
    from vnpd.config import Config

log = structlog.get_logger()
# The end-of-job attributes (``reuse_counts``): create writes placeholders (-1) that
# finalize rewrites in place, so that finalize allocates no file metadata.
REUSE_ATTRIBUTES = ("computed_sequences", "cache_hits", "duplicate_records")


def create_partial(path: Path, source: SequenceSource, meta: OutputMeta, dim: int,
                   output_dtype: str, **layout: Any) -> PartialOutput:
    """Create a job's partial file, prefilled with everything but the embeddings: ids
    (one pass over the input), lengths, the row fields and attributes of its input kind,
    ``meta``, and placeholders for the end-of-job counts; so finalize copies nothing
    (:class:`PartialOutput`). ``layout``: the rest of ``PartialOutput.create``'s options.

    Raises ``FastaError`` if ``source`` no longer reads as it was indexed.
    """
    return PartialOutput.create(
        path, source.num_rows, dim, output_dtype, ids=source.ids(),
        lengths=source.lengths, meta=meta, row_fields=source.row_fields(),
        attributes={**source.attributes(), **dict.fromkeys(REUSE_ATTRIBUTES, -1)}, **layout)


def finalize_partial(partial: PartialOutput, source: SequenceSource, meta: OutputMeta,
                     quarantined: list[int], reuse: dict[str, int] | None = None) -> None:
    """Finalize the partial file with ``reuse`` (how many rows were computed, served from
    the cache, or copies of an earlier row): in place if it was prefilled
    (:func:`create_partial`), else (a partial file of an earlier version) with its ids and
    lengths read from ``source``, and the row fields and attributes of its input kind.

    Raises ``FastaError`` if ``source`` no longer reads as it was indexed.
    """
    if partial.prefilled:
        partial.finalize(meta, quarantined=quarantined, attributes=reuse)
        return
    ids = source.ids()
    partial.finalize(meta, quarantined=quarantined, ids=ids, lengths=source.lengths,
                     row_fields=source.row_fields(),
                     attributes={**source.attributes(), **(reuse or {})})


def reuse_counts(journal: Journal, job_id: int, duplicate_records: int,
                 pieces: PieceIndex | None = None) -> dict[str, int]:
    """The output attributes that account for compute-once: ``computed_sequences`` (run
    through the model for this job), ``cache_hits`` and ``duplicate_records`` (rows that
    repeat an earlier row of the file). ``pieces``: what the batches held (a long row
    counts once, with its last window)."""
    computed, hits = journal.reuse_counts(
        job_id, len if pieces is None else (lambda p: int(pieces.is_last(p).sum())))
    return {"computed_sequences": computed, "cache_hits": hits,
            "duplicate_records": duplicate_records}


class JobCompletion:
    """Publishes finished jobs and fails bad ones; owned by the daemon's event loop."""

    def __init__(self, cfg: Config, journal: Journal, metrics: Metrics, jobs_dir: Path,
                 done_dir: Path, model: Callable[[], Awaitable[ModelInfo]],
                 faults: FaultPlan = FaultPlan()) -> None:
        self.cfg, self.journal, self.metrics = cfg, journal, metrics
        self.jobs_dir, self.done_dir = jobs_dir, done_dir
        self.model = model  # waits for a ready worker (resolved layer, backend)
        self.faults = faults
        self.failing: set[Path] = set()  # failed/ destinations being written now

    # Create and publish ---------------------------------------------------------------
    # The intake creates a job's partial file through this (:func:`create_partial`).
    create_partial = staticmethod(create_partial)

    async def publish(self, job: ActiveJob) -> None:
        """Steps 1-6 for a job whose rows are all written (or whose file is finalized)."""
        quarantined = [q.position for q in self.journal.quarantined(job.job_id)]
        max_delay = self.cfg.jobs.publish_retry_max_s
        try:
            # Disk full or unwritable outbox: keep the result, retry with backoff.
            dest = await with_disk_retry(lambda: self._publish_once(job, quarantined),
                                         "publish_retry", max_delay, job=job.job_id,
                                         file=job.name)
        except FastaError as exc:
            # Its writer went on writing after the claim: the ids read now may not be
            # those of the rows computed. The job fails, not the daemon.
            log.error("job_input_changed", job=job.job_id, file=job.name, error=str(exc))
            job.partial.close()
            await self.fail_job(job.job_id, job.name, job.source.path, exc.to_dict(), str(exc))
            return
        seconds = time.monotonic() - job.started

        async def finish() -> None:
            self.finish_done(self.journal.job(job.job_id), dest, job.total_tokens, seconds)
        await with_disk_retry(finish, "finish_retry", max_delay, job=job.job_id, file=job.name)

    async def _publish_once(self, job: ActiveJob, quarantined: list[int]) -> Path:
        partial, outbox = job.partial, self.cfg.paths.outbox
        if not partial.closed:
            if partial.finalized:
                partial.close()  # finalized before a crash: never compact it twice
            else:
                meta = await self.output_meta(job.name, job.source)
                dups = job.duplicates.duplicate_rows if job.duplicates is not None else 0
                reuse = reuse_counts(self.journal, job.job_id, dups, job.pieces)
                log.info("finalize_started", job=job.job_id, quarantined=len(quarantined))
                if job.pieces is not None and job.pieces.windows:
                    # Every window is done: make the long rows (again, after a crash).
                    long_rows = await asyncio.to_thread(write_long_rows, partial, job.pieces,
                                                        job.duplicates, quarantined)
                    log.info("window_rows_written", job=job.job_id, rows=long_rows)
                await asyncio.to_thread(finalize_partial, partial, job.source, meta, quarantined,
                                        reuse)
                self.faults.crash_at("finalized")
        row = self.journal.job(job.job_id)
        dest = Path(row.output) if row.output else None
        if dest is not None and _same_file(partial.path, dest):
            # Linked before a crash: publish_atomically only removes the state/ name.
            await asyncio.to_thread(publish_atomically, partial.path, dest)
            return dest
        await asyncio.to_thread(verify_output, partial.path)
        while True:
            if dest is None or os.path.lexists(dest):
                dest = unique_destination(outbox, output_name_for(job.name))
                self.journal.set_state(job.job_id, "publishing", output=str(dest))
                self.faults.crash_at("dest_journaled")
            self.faults.check_outbox_space(outbox)
            try:
                await asyncio.to_thread(publish_atomically, partial.path, dest)
            except FileExistsError:
                continue  # another file took the name since: journal a free one
            self.faults.crash_at("linked")
            return dest

    async def output_meta(self, name: str, source: SequenceSource) -> OutputMeta:
        """What produced the output: the configuration and the loaded model's facts."""
        info, m = await self.model(), self.cfg.model
        return OutputMeta(model=m.checkpoint, layer=info.layer, layers=info.layers, dtype=m.dtype,
                          truncation=m.truncation, attention_backend=info.attention_backend,
                          source_name=name, source_sha256=source.sha256,
                          long_sequences=m.long_sequences,
                          window_stride=configured_stride(m) or 0)

    def finish_done(self, row: JobRow, dest: Path, tokens: int, seconds: float) -> None:
        """Steps 5 and 6: the output is in the outbox; retire the input and the job."""
        source = row.claimed_path
        if source.exists():
            if self.cfg.inbox.after_done == "delete":
                source.unlink()
            else:
                os.replace(source, self.done_dir / source.name)
            self.faults.crash_at("source_moved")
        self.journal.set_state(row.id, "done", output=str(dest))
        shutil.rmtree(self.jobs_dir / str(row.id), ignore_errors=True)
        self.metrics.jobs_total.labels(outcome="published").inc()
        self.metrics.last_publish_timestamp_seconds.set(time.time())
        reuse = self._reuse_summary(dest)
        self.metrics.duplicate_records_total.inc(reuse.get("duplicate_records", 0))
        log.info("job_published", job=row.id, file=row.name, output=str(dest),
                 sequences=row.num_records, tokens=tokens, seconds=round(seconds, 3),
                 tokens_per_s=round(tokens / seconds, 1) if seconds > 0 and tokens else None,
                 quarantined=[q.record for q in self.journal.quarantined(row.id)],
                 **reuse)

    def _reuse_summary(self, dest: Path) -> dict[str, int]:
        """The compute-once counts of a published output, for its summary log line."""
        try:
            with h5py.File(dest, "r") as f:
                return {name: int(f.attrs[name]) for name in
                        ("computed_sequences", "cache_hits", "duplicate_records")
                        if name in f.attrs}
        except OSError:
            return {}

    def published_before_crash(self, row: JobRow) -> Path | None:
        """The output of a job that a crash stopped after step 4, else None."""
        partial = self.jobs_dir / str(row.id) / "partial.h5"
        if row.state == "publishing" and row.output and Path(row.output).is_file() \
                and not partial.exists():
            return Path(row.output)
        return None

    async def copy_duplicate(self, job_id: int, previous: JobRow, name: str) -> Path:
        """Copy an earlier output of the same content as this job's finalized partial file.

        The copy is built under a temp name and renamed into place, so a restart finds
        either no partial file (and computes) or a finalized one (and publishes it).
        """
        partial = self.jobs_dir / str(job_id) / "partial.h5"
        tmp = partial.with_name("copy.h5.tmp")
        await asyncio.to_thread(shutil.copyfile, previous.output or "", tmp)
        await asyncio.to_thread(_retitle_output, tmp, name)
        os.replace(tmp, partial)
        log.info("job_duplicate_content", job=job_id, file=name, same_as_job=previous.id,
                 copied_from=previous.output)
        self.metrics.jobs_total.labels(outcome="duplicate").inc()
        return partial

    # Fail ---------------------------------------------------------------------------
    async def fail_job(self, job_id: int, name: str, source: Path, details: dict[str, Any],
                       message: str) -> None:
        """Move the input to failed/ with <name>.error.json; the daemon goes on.

        The hash and the moves run in a thread, since a refused file may be large; a full
        or unwritable disk is retried with backoff, as a publish is.
        """
        failed_dir = self.cfg.paths.failed
        dest = failed_dir / name
        i = 0
        while (dest in self.failing or dest.exists()
               or dest.with_name(dest.name + ".error.json").exists()):
            i += 1
            dest = failed_dir / f"{name}.{i}"
        max_delay = self.cfg.jobs.publish_retry_max_s
        self.failing.add(dest)  # two failures of one name at once get two destinations
        try:
            await with_disk_retry(
                lambda: asyncio.to_thread(_move_to_failed, job_id, name, source, dest, details),
                "fail_retry", max_delay, job=job_id, file=name)
        finally:
            self.failing.discard(dest)
        shutil.rmtree(self.jobs_dir / str(job_id), ignore_errors=True)

        async def journal() -> None:
            self.journal.set_state(job_id, "failed", error=message)
        await with_disk_retry(journal, "fail_journal_retry", max_delay, job=job_id, file=name)
        self.metrics.jobs_total.labels(outcome="failed").inc()
        log.error("job_failed", job=job_id, file=name, moved_to=str(dest), error=message)


def _move_to_failed(job_id: int, name: str, source: Path, dest: Path,
                    details: dict[str, Any]) -> None:
    """Write ``dest``.error.json (with the input's SHA-256), then move the input to
    ``dest``. Safe to run again: both steps replace what an earlier try left."""
    report: dict[str, Any] = {"file": name, "job": job_id, **details, "sha256": None}
    try:
        report["sha256"] = sha256_file(source) if source.exists() else None
    except OSError as exc:  # unreadable: the report says so, and the move still happens
        report["sha256_error"] = str(exc)
    report.update(vnpd_version=__version__, failed_utc=utc_now())
    report_path = dest.with_name(dest.name + ".error.json")
    tmp = report_path.with_name("." + report_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, report_path)
    if source.exists():
        os.replace(source, dest)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except FileNotFoundError:
        return False


def _retitle_output(path: Path, source_name: str) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs["source_name"] = source_name
        f.attrs["created_utc"] = utc_now()

