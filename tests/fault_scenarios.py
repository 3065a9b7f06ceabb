"""Fault scenarios end to end: the real daemon, real worker processes, real signals.

Shared by tests/daemon/test_faults.py (each scenario once, asserted clean) and
bench/reliability.py (each N times, for the matrix in docs/RELIABILITY.md). A plain module
beside tests/daemon_harness.py, which it builds on: pytest does not collect it, and it
holds no fixtures, so the benchmark imports it without importing a test file.

Every scenario runs `vnpd run` as a subprocess with two CPU workers and a tiny random
ESM-2 (tests/daemon_harness.py), injects one kind of fault, and then checks what a user
would check: every input has exactly one output; its ``ids`` are the input ids in input
order minus the quarantined ones; no id appears twice; every row equals a clean run of
``vnpd embed`` on the same file; nothing partial or temporary ever shows in the outbox
(an :class:`OutboxReader` thread opens and verifies every file it sees, the whole time).
Each scenario is a plain function returning an :class:`Outcome`.

Faults are injected with real signals (SIGKILL, SIGSTOP) and with the test-only hooks
that production never sets (docs/DAEMON.md, "Test-only fault hooks"):
``VNPD_TEST_FAULT`` (a worker crashes, hangs or fakes an OOM on one record),
``VNPD_TEST_CRASH_AT`` (the daemon SIGKILLs itself at a named point of a job's life) and
``VNPD_TEST_OUTBOX_FULL`` (publishing fails with ENOSPC while a flag file exists).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tests.conftest import random_sequences
from tests.daemon_harness import Daemon, DaemonDirs, drop, fasta_text, write_config
from vnpd.output.outbox import output_name_for
from vnpd.output.verify import IncompleteOutputError, read_output, verify_output
from vnpd.lifeline import alive as is_alive


# Short timeouts and backoffs, so that a fault costs seconds, not minutes. The worker
# restart itself (a new Python process importing torch) is the slow part: ~3 s here.
FAST_WORKERS: dict[str, Any] = {"restart_backoff_s": 0.2, "restart_backoff_max_s": 1.0,
                                "crash_budget": 50, "crash_window_s": 600.0}
SETTLE = {"settle_s": 0.1, "rescan_interval_s": 1.0}


# Reference embeddings -------------------------------------------------------------------
class Reference:
    """Clean-run embeddings of a FASTA text: ``vnpd embed`` (same engine, one process)."""

    def __init__(self, model: Path, workdir: Path) -> None:
        self.model, self.workdir = model, workdir
        self._engine: Any = None
        self._cache: dict[str, tuple[list[str], np.ndarray]] = {}

    def get(self, text: str) -> tuple[list[str], np.ndarray]:
        """(ids, embeddings) of every record of ``text``, in input order."""
        import hashlib

        from vnpd.embed import embed_file
        from vnpd.compute.engine import Engine

        key = hashlib.sha256(text.encode()).hexdigest()
        if key not in self._cache:
            if self._engine is None:
                self._engine = Engine.load(str(self.model), device="cpu", dtype="float32",
                                           max_tokens=2048)
            self.workdir.mkdir(parents=True, exist_ok=True)
            src, out = self.workdir / f"{key}.fasta", self.workdir / f"{key}.h5"
            src.write_text(text)
            embed_file(src, out, self._engine)
            emb, ids, _, _ = read_output(out)
            self._cache[key] = (ids, emb)
            src.unlink()
            out.unlink()
        return self._cache[key]


# What a scenario reports ----------------------------------------------------------------
# The counts that add up over scenarios and runs (bench/reliability.py sums them too).
OUTCOME_COUNTS = ("sequences", "quarantined", "lost", "duplicated", "wrong_rows",
                  "reader_checks")


@dataclass
class Outcome:
    """Sequence accounting of one scenario run; ``ok`` when nothing is wrong."""

    scenario: str
    sequences: int = 0          # input sequences, all files
    quarantined: int = 0        # expected to be quarantined (and found so)
    lost: int = 0               # expected in an output, not found there
    duplicated: int = 0         # found more than once (same file or extra output files)
    wrong_rows: int = 0         # present, but the embedding differs from the clean run
    reader_checks: int = 0      # outbox files opened and verified by the concurrent reader
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    skipped: str = ""           # why the scenario could not run here (nothing was checked)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.wrong_rows or self.problems
                    or self.skipped)

    def add(self, other: Outcome) -> None:
        for name in OUTCOME_COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.problems += other.problems

    def report(self) -> str:
        return (f"{self.scenario}: {self.sequences} sequences, lost {self.lost}, duplicated "
                f"{self.duplicated}, wrong rows {self.wrong_rows}, quarantined "
                f"{self.quarantined}; problems: {self.problems}")


class OutboxReader(threading.Thread):
    """Polls the outbox all the time, as a user's pipeline would, and opens every file.

    Any file it can see must be complete: open, and pass ``verify_output``. A hidden or
    temporary name is a problem too (partial files never appear in the outbox, not even
    under a temporary name).
    """

    def __init__(self, outbox: Path, interval_s: float = 0.02) -> None:
        super().__init__(daemon=True, name="outbox-reader")
        self.outbox, self.interval_s = outbox, interval_s
        self.stop_event = threading.Event()
        self.checked: dict[str, int] = {}
        self.problems: list[str] = []

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.scan()
            time.sleep(self.interval_s)
        self.scan()

    def scan(self) -> None:
        try:
            names = os.listdir(self.outbox)
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith(".") or ".tmp" in name or ".part" in name or \
                    not name.endswith(".h5"):
                self.problems.append(f"outbox shows a non-output name {name!r}")
                continue
            try:
                verify_output(self.outbox / name)
            except IncompleteOutputError as exc:
                self.problems.append(f"reader saw an incomplete output: {exc}")
            self.checked[name] = self.checked.get(name, 0) + 1

    def finish(self) -> list[str]:
        self.stop_event.set()
        self.join(10)
        return self.problems


def fasta_ids(text: str) -> list[str]:
    return [line[1:].split()[0] for line in text.splitlines() if line.startswith(">")]


def check_outbox(dirs: DaemonDirs, inputs: dict[str, str], reference: Reference,
                 quarantined: dict[str, set[str]] | None = None,
                 failed: set[str] = frozenset()) -> Outcome:  # type: ignore[assignment]
    """Account for every input sequence in the outbox; see :class:`Outcome`.

    ``inputs``: input file name -> FASTA text. ``quarantined``: per input, the ids that
    must be quarantined (absent from ``ids``, listed in ``quarantined_ids``). ``failed``:
    inputs that must have gone to failed/ instead of the outbox.
    """
    quarantined = quarantined or {}
    out = Outcome("check")
    expected_names = {output_name_for(name): name for name in inputs if name not in failed}
    present = sorted(p.name for p in dirs.outbox.iterdir())
    for extra in sorted(set(present) - set(expected_names)):
        try:
            _, ids, _, _ = read_output(dirs.outbox / extra)
            out.duplicated += len(ids)
        except OSError:
            pass
        out.problems.append(f"unexpected output {extra!r} (a duplicate publish?)")
    for name, text in inputs.items():
        all_ids = fasta_ids(text)
        out.sequences += len(all_ids)
        if name in failed:
            if not (dirs.failed / name).exists() or \
                    not (dirs.failed / f"{name}.error.json").exists():
                out.problems.append(f"{name} is not in failed/ with its report")
            continue
        path = dirs.outbox / output_name_for(name)
        if not path.exists():
            out.lost += len(all_ids)
            out.problems.append(f"no output for {name}")
            continue
        try:
            verify_output(path)
            emb, ids, lengths, attrs = read_output(path)
        except (OSError, ValueError) as exc:
            out.lost += len(all_ids)
            out.problems.append(f"{path.name} does not read: {exc}")
            continue
        q = quarantined.get(name, set())
        want = [i for i in all_ids if i not in q]
        out.quarantined += len(q)
        counts: dict[str, int] = {}
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
        out.duplicated += sum(c - 1 for c in counts.values())
        out.lost += sum(1 for i in want if i not in counts)
        if sorted(attrs["quarantined_ids"]) != sorted(q):
            out.problems.append(f"{path.name}: quarantined_ids {attrs['quarantined_ids']} "
                                f"!= expected {sorted(q)}")
        if ids != want:
            out.problems.append(f"{path.name}: ids are not the input ids in input order")
            continue
        ref_ids, ref_emb = reference.get(text)
        keep = [k for k, i in enumerate(ref_ids) if i not in q]
        diff = np.abs(emb - ref_emb[keep]).max(axis=1) if len(keep) else np.zeros(0)
        out.wrong_rows += int((diff > 1e-5).sum())
        if attrs["num_sequences"] != len(want) or attrs["source_name"] != name:
            out.problems.append(f"{path.name}: attrs {attrs['num_sequences']}, "
                                f"{attrs['source_name']!r}")
    return out


def check_no_strays(dirs: DaemonDirs) -> list[str]:
    """After a clean stop: no job state, no claimed input, no temp file anywhere."""
    problems = []
    for sub in ("jobs", "claimed"):
        left = sorted(p.name for p in (dirs.state / sub).iterdir())
        if left:
            problems.append(f"state/{sub} not empty: {left}")
    for root in (dirs.state, dirs.outbox, dirs.failed, dirs.inbox):
        for path in root.rglob("*"):
            if ".tmp" in path.name or ".compact" in path.name or ".part" in path.name:
                problems.append(f"stray temp file {path}")
    return problems


def job_text(n: int, seed: int, prefix: str, lo: int = 30, hi: int = 200) -> str:
    rng = np.random.default_rng(seed)
    return fasta_text(random_sequences([int(x) for x in rng.integers(lo, hi, n)], seed=seed),
                      prefix=prefix)


def wait_pids_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    """Wait for processes (orphaned workers) to exit; return those still alive."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if is_alive(p)]
        time.sleep(0.1)
    return alive


def busy_worker_pid(daemon: Daemon, exclude: set[int] = frozenset()) -> int:  # type: ignore[assignment]
    """A ready worker's pid, preferring one that holds batches, from state/status.json."""
    def pick() -> int | None:
        workers = [w for w in (daemon.status() or {}).get("workers", [])
                   if w.get("pid") and w["state"] == "ready" and w["pid"] not in exclude]
        workers.sort(key=lambda w: -w["inflight"])
        return workers[0]["pid"] if workers else None
    return daemon.wait_for(pick, 60, "a ready worker in status.json")


class Run:
    """One scenario's daemon(s) in one directory, with the outbox reader running."""

    def __init__(self, root: Path, model: Path, *, workers: dict[str, Any] | None = None,
                 jobs: dict[str, Any] | None = None, max_tokens: int = 1024,
                 data_dir: Path | None = None) -> None:
        """The daemon's directories go in ``data_dir`` (default ``root``); its config
        and log files always in ``root``, as journald holds a real daemon's log."""
        self.root = root
        self.dirs = DaemonDirs(data_dir or root)
        root.mkdir(parents=True, exist_ok=True)
        self.config = write_config(self.dirs, model, max_tokens=max_tokens,
                                   workers={**FAST_WORKERS, **(workers or {})},
                                   inbox=SETTLE, jobs=jobs, path=root / "config.toml")
        self.reader = OutboxReader(self.dirs.outbox)
        self.daemons: list[Daemon] = []
        self.started = time.monotonic()

    def start(self, env: dict[str, str] | None = None) -> Daemon:
        daemon = Daemon(self.config, self.dirs, env=env, log_dir=self.root)
        self.daemons.append(daemon)
        if not self.reader.is_alive() and not self.reader.stop_event.is_set():
            self.reader.start()
        daemon.wait_ready()
        return daemon

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for d in self.daemons for e in d.events(name)]

    def sigkill(self, daemon: Daemon) -> list[str]:
        """SIGKILL the daemon; its workers must notice and exit on their own."""
        pids = daemon.worker_pids()
        daemon.kill()
        alive = wait_pids_gone(pids)
        for pid in alive:  # don't leave them running into the next scenario
            os.kill(pid, signal.SIGKILL)
        return [f"worker {pid} outlived its killed daemon" for pid in alive]

    def finish(self, outcome: Outcome, inputs: dict[str, str], reference: Reference, *,
               quarantined: dict[str, set[str]] | None = None,
               failed: set[str] = frozenset()) -> Outcome:  # type: ignore[assignment]
        """Stop the last daemon (must exit 0), then account for every sequence.

        After a problem already found (a failed wait, say) it only kills what still runs
        and returns ``outcome`` as it is: the daemon's state is unknown then.
        """
        if outcome.problems or not self.daemons:
            self.close()
            return outcome
        daemon = self.daemons[-1]
        code = daemon.terminate()
        if code != 0:
            outcome.problems.append(f"daemon exited {code}")
        for d in self.daemons:
            crashed = d.events("task_crashed")
            if crashed:
                outcome.problems.append(f"task_crashed: {crashed[0].get('error')}")
        outcome.problems += self.reader.finish()
        outcome.reader_checks = sum(self.reader.checked.values())
        outcome.add(check_outbox(self.dirs, inputs, reference, quarantined, failed))
        outcome.problems += check_no_strays(self.dirs)
        outcome.seconds = round(time.monotonic() - self.started, 1)
        return outcome

    def close(self) -> None:
        """Kill whatever is still running (after a failed wait)."""
        for d in self.daemons:
            if d.proc.poll() is None:
                self.sigkill(d)
        self.reader.finish()


# Scenarios ------------------------------------------------------------------------------
def scenario_worker_sigkill(root: Path, model: Path, reference: Reference) -> Outcome:
    """1. A worker is SIGKILLed mid-batch, twice (one of each): restart, requeue, complete."""
    run, outcome = Run(root, model), Outcome("worker SIGKILL")
    try:
        daemon = run.start()
        text = job_text(3000, seed=1, prefix="k")
        drop(run.dirs.inbox, "big.fasta", text)
        killed = []
        for after in (15, 120):
            daemon.wait_for(lambda: len(daemon.events("batch_done")) >= after, 120,
                            f"{after} batches")
            pid = busy_worker_pid(daemon, exclude=set(killed))
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        daemon.wait_outputs(["big.h5"], timeout=180)
        died = {e["pid"] for e in run.events("worker_died")}
        if not set(killed) <= died:
            outcome.problems.append(f"killed {killed}, worker_died for {sorted(died)}")
        if len(run.events("worker_started")) < 4:
            outcome.problems.append("the killed workers were not restarted")
    except AssertionError as exc:
        outcome.problems.append(str(exc)[:2000])
    return run.finish(outcome, {"big.fasta": text}, reference)


def scenario_worker_sigstop(root: Path, model: Path, reference: Reference) -> Outcome:
    """2. A worker is SIGSTOPped: silent past heartbeat_timeout_s, killed, restarted."""
    timeout_s = 2.0
    run = Run(root, model, workers={"heartbeat_timeout_s": timeout_s})
    outcome = Outcome("worker SIGSTOP")
    try:
        daemon = run.start()
        text = job_text(3000, seed=2, prefix="s")
        drop(run.dirs.inbox, "stopped.fasta", text)
        daemon.wait_for(lambda: len(daemon.events("batch_done")) >= 20, 120, "20 batches")
        pid = busy_worker_pid(daemon)
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        kill = daemon.wait_for(lambda: [e for e in daemon.events("worker_kill")
                                        if e.get("pid") == pid], 30, "the stopped worker killed")
        detected_s = time.monotonic() - stopped_at
        if kill[0]["reason"] != "heartbeat":
            outcome.problems.append(f"kill reason {kill[0]['reason']!r}, not 'heartbeat'")
        # Detection takes heartbeat_timeout_s, plus one supervisor check (0.25 s), plus
        # this test's own 0.1 s polling of the log file; the rest of the 3 s margin is for
        # a loaded CI machine (the kill reason above already tells heartbeat from others).
        if detected_s > timeout_s + 3.0:
            outcome.problems.append(f"detected after {detected_s:.1f} s (timeout {timeout_s})")
        daemon.wait_outputs(["stopped.h5"], timeout=180)
        if not [e for e in daemon.events("worker_died") if e.get("pid") == pid]:
            outcome.problems.append("no worker_died for the stopped worker")
    except AssertionError as exc:
        outcome.problems.append(str(exc)[:2000])
    return run.finish(outcome, {"stopped.fasta": text}, reference)


BYSTANDER = ("bystander.fasta", 60, 99)  # name, sequences, seed


def _poison_run(root: Path, model: Path, action: str, name: str,
                workers: dict[str, Any] | None = None, jobs: dict[str, Any] | None = None,
                n: int = 400, max_tokens: int = 1024
                ) -> tuple[Run, Outcome, dict[str, str], str, Daemon | None]:
    """Start a daemon whose workers ``action`` on one record of a job, and drop the job
    and a small bystander file (which must not be held up or harmed).

    Returns the run, its outcome, the input texts by name, the bad record's id, and the
    daemon (None if it did not start: the outcome then says why).
    """
    run = Run(root, model, workers=workers, jobs=jobs, max_tokens=max_tokens)
    outcome = Outcome(f"{action} poison")
    bystander, count, seed = BYSTANDER
    texts = {name: job_text(n, seed=zlib.crc32(action.encode()) % 1000, prefix="p"),
             bystander: job_text(count, seed=seed, prefix="b")}
    bad = f"p{n // 2 + 7}"
    daemon = None
    try:
        daemon = run.start(env={"VNPD_TEST_FAULT": f"{action}:{bad}"})
        for file_name, text in texts.items():
            drop(run.dirs.inbox, file_name, text)
    except AssertionError as exc:
        outcome.problems.append(str(exc)[:2000])
    return run, outcome, texts, bad, daemon


def _quarantine_scenario(root: Path, model: Path, reference: Reference, action: str,
                         name: str, checks: Callable[[Daemon, str, Outcome], None], *,
                         workers: dict[str, Any] | None = None, max_tokens: int = 1024
                         ) -> Outcome:
    """A record that ``action``s on every try must end quarantined, named in the job
    summary, with everything else published; ``checks`` looks at how it got there."""
    run, outcome, texts, bad, daemon = _poison_run(root, model, action, name, workers=workers,
                                                   max_tokens=max_tokens)
    try:
        assert daemon is not None
        daemon.wait_outputs([output_name_for(n) for n in texts], timeout=240)
        _check_summary(daemon, name, bad, outcome)
        checks(daemon, bad, outcome)
    except AssertionError as exc:
        outcome.problems.append(str(exc)[:2000])
    return run.finish(outcome, texts, reference, quarantined={name: {bad}})


def scenario_batch_hang(root: Path, model: Path, reference: Reference) -> Outcome:
    """3. A batch hangs while heartbeats go on: the deadline kills it ("hang"), and the
    record, which hangs again on every retry, ends quarantined; the rest is published."""
    def checks(daemon: Daemon, bad: str, outcome: Outcome) -> None:
        reasons = [e["reason"] for e in daemon.events("worker_kill")]
        if not reasons or set(reasons) != {"hang"}:
            outcome.problems.append(f"worker_kill reasons {reasons}, expected only 'hang'")
    return _quarantine_scenario(
        root, model, reference, "hang", "hang.fasta", checks,
        workers={"batch_deadline_base_s": 2.0, "batch_deadline_per_1k_tokens_s": 0.0})


def scenario_oom(root: Path, model: Path, reference: Reference) -> Outcome:
    """4. A record "runs out of memory" every time: its batch is split and the device's
    budget lowered, with no worker restart; alone, it still does not fit: quarantined."""
    def checks(daemon: Daemon, bad: str, outcome: Outcome) -> None:
        if daemon.events("worker_died") or daemon.events("worker_kill"):
            outcome.problems.append("a worker was restarted for an OOM")
        splits = [e for e in daemon.events("batch_split") if e["reason"] == "out of memory"]
        if not splits:
            outcome.problems.append("no batch_split for the OOM")
        def budgets() -> list[int]:
            return [w["max_tokens"] for w in (daemon.status() or {}).get("workers", [])]
        # status.json is a snapshot rewritten every second: give it a few.
        try:
            daemon.wait_for(lambda: budgets() and min(budgets()) < 2048, 5, "a lower budget")
        except AssertionError:
            outcome.problems.append(f"no device budget was lowered: {budgets()}")
    return _quarantine_scenario(root, model, reference, "oom", "oom.fasta", checks,
                                max_tokens=2048)


def scenario_sticky_error(root: Path, model: Path, reference: Reference) -> Outcome:
    """4b. A record raises a sticky CUDA error (an illegal memory access, simulated): the
    worker reports it and exits, since its context is poisoned for good; it is restarted,
    and the record, which does it again on every retry, ends quarantined."""
    def checks(daemon: Daemon, bad: str, outcome: Outcome) -> None:
        reasons = {e["reason"] for e in daemon.events("worker_died")}
        if reasons != {"sticky_error"}:
            outcome.problems.append(f"worker_died reasons {reasons}, expected sticky_error")
        if not [e for e in daemon.events("worker_error") if e.get("kind") == "fatal"]:
            outcome.problems.append("no worker_error of kind 'fatal' was reported")
    return _quarantine_scenario(root, model, reference, "sticky", "sticky.fasta", checks)


def scenario_poison_quarantine(root: Path, model: Path, reference: Reference) -> Outcome:
    """5a. A record crashes its worker every time: isolated down to it, quarantined."""
    def checks(daemon: Daemon, bad: str, outcome: Outcome) -> None:
        poisoned = [e["record"] for e in daemon.events("sequence_poisoned")]
        if poisoned != [bad]:
            outcome.problems.append(f"sequence_poisoned for {poisoned}")
    return _quarantine_scenario(root, model, reference, "crash", "poison.fasta", checks)


def scenario_poison_fail(root: Path, model: Path, reference: Reference) -> Outcome:
    """5b. on_poison = "fail": the file goes to failed/ with a report naming the record."""
    run, outcome, texts, bad, daemon = _poison_run(root, model, "crash", "fails.fasta",
                                                   jobs={"on_poison": "fail"})
    try:
        assert daemon is not None
        daemon.wait_outputs(["bystander.h5"], timeout=240)
        report = run.dirs.failed / "fails.fasta.error.json"
        daemon.wait_for(report.exists, 240, "the error report")
        reason = json.loads(report.read_text())["reason"]
        if repr(bad) not in reason or "on_poison" not in reason:
            outcome.problems.append(f"error report does not name {bad!r}: {reason!r}")
        if (run.dirs.failed / "fails.fasta").read_text() != texts["fails.fasta"]:
            outcome.problems.append("failed/fails.fasta is not the input")
    except AssertionError as exc:
        outcome.problems.append(str(exc)[:2000])
    return run.finish(outcome, texts, reference, failed={"fails.fasta"})


def _journal(dirs: DaemonDirs, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{dirs.state / 'journal.sqlite3'}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def scenario_attempts_survive_restart(root: Path, model: Path, reference: Reference
                                      ) -> Outcome:
    """5c. The daemon is SIGKILLed after a poison record killed a worker once; the attempt
    is in the journal and survives the restart: the restarted daemon, whose workers no
    longer crash, still runs that batch alone as a suspect, and publishes everything."""
    run, outcome, texts, bad, daemon = _poison_run(root, model, "crash", "again.fasta")
    position = int(bad[1:])
    try:
        assert daemon is not None

        def attempts() -> int:
            rows = _journal(run.dirs, "SELECT positions, attempts FROM batches WHERE job_id=1")
            return max([a for blob, a in rows
                        if position in np.frombuffer(blob, dtype=np.int64)] or [0])
        daemon.wait_for(lambda: attempts() >= 1, 120, "an attempt journaled")
        outcome.problems += run.sigkill(daemon)
        before = attempts()
        second = run.start()  # no fault hook: the attempt count alone must carry over
        resumed = second.events("job_resume")
        if not resumed:
            outcome.problems.append("the job was not resumed")
        # Without the hook the record no longer crashes: the restarted daemon must still
        # treat its batch as a suspect (it runs alone), and publish everything.
        second.wait_outputs(["again.h5", "bystander.h5"], timeout=240)
        if before < 1:
            outcome.problems.append(f"attempts were {before} after the restart")
        if not second.events("batch_isolated"):
            outcome.problems.append("the suspect batch did not run alone after the restart")
    except AssertionError as exc:
        outcome.problems.append(str(exc)[:2000])
    return run.finish(outcome, texts, reference)


def scenario_all_devices_degraded(root: Path, model: Path, reference: Reference) -> Outcome:
    """5d. crash_budget = 1, so one worker death degrades its device. A poison record
    kills both workers; with every device degraded the daemon exits 1, for systemd to
    restart it and alert. The restart (the record no longer crashes) publishes
    everything exactly once."""
    run, outcome, texts, bad, daemon = _poison_run(root, model, "crash", "degraded.fasta",
                                                   workers={"crash_budget": 1})
    try:
        assert daemon is not None
        daemon.wait_for(lambda: daemon.proc.poll() is not None, 120, "the daemon to give up")
        if daemon.proc.returncode != 1:
            outcome.problems.append(f"exit {daemon.proc.returncode} with every device "
                                    "degraded, expected 1")
        degraded = sorted(e["worker"] for e in daemon.events("device_degraded"))
        if degraded != [0, 1] or not daemon.events("all_devices_degraded"):
            outcome.problems.append(f"device_degraded for workers {degraded}")
        outcome.problems += run.sigkill(daemon)  # reaps it; its workers died already
        second = run.start()
        second.wait_outputs(["degraded.h5", "bystander.h5"], timeout=240)
    except AssertionError as exc:
        outcome.problems.append(str(exc)[:2000])
    return run.finish(outcome, texts, reference)


def _check_summary(daemon: Daemon, name: str, bad: str, outcome: Outcome) -> None:
    # The summary is logged just after the output is linked into the outbox: wait for it.
    summary = daemon.wait_for(lambda: [e for e in daemon.events("job_published")
                                       if e.get("file") == name], 30, f"job_published {name}")
    if summary[0].get("quarantined") != [bad]:
        outcome.problems.append(f"job_published quarantined={summary[0].get('quarantined')}")


# Daemon SIGKILL at many points -------------------------------------------------------------
@dataclass(frozen=True)
class KillPoint:
    """Where the daemon dies: ``after_batches`` batch_done events (plus a random delay,
    so commits are hit too), a log ``event``, or a ``crash_at`` point of the test hook."""

    name: str
    after_batches: int = 0
    event: str = ""
    crash_at: str = ""
    poison: bool = False     # a record is quarantined, so publishing compacts the file


KILL_POINTS = (
    KillPoint("indexing a big file", event="job_claimed"),
    KillPoint("claimed, not journaled", crash_at="claimed"),
    KillPoint("early batches", after_batches=3),
    KillPoint("mid-job", after_batches=80),  # of ~170: the random delay must not reach the end
    KillPoint("rows flushed, batches not journaled", crash_at="rows_flushed"),
    KillPoint("finalized (compacted), not linked", crash_at="finalized", poison=True),
    KillPoint("output name journaled, not linked", crash_at="dest_journaled"),
    KillPoint("linked into the outbox, not journaled", crash_at="linked"),
    KillPoint("input moved to done/, job not marked done", crash_at="source_moved"),
)


def big_index_text() -> str:
    """A file that takes a while to index but little to compute: long records are
    validated in full (~25 MB here) but embedded truncated to 1022 residues."""
    seqs = random_sequences([900_000] * 28, seed=77, rare_every=0)
    return "".join(f">long{i}\n" + "\n".join(s[j:j + 80] for j in range(0, len(s), 80)) + "\n"
                   for i, s in enumerate(seqs))


def run_kill_point(root: Path, model: Path, reference: Reference, point: KillPoint,
                   rng: random.Random) -> Outcome:
    """Kill the daemon at ``point``, restart it, and check the job is done exactly once."""
    run = Run(root, model)
    outcome = Outcome(f"daemon SIGKILL: {point.name}")
    texts = {"job.fasta": big_index_text() if point.event == "job_claimed" else
             job_text(1500 if point.after_batches else 120, seed=rng.randrange(1000),
                      prefix="j")}
    quarantined: dict[str, set[str]] = {}
    env: dict[str, str] = {}
    if point.crash_at:
        env["VNPD_TEST_CRASH_AT"] = point.crash_at
    if point.poison:
        env["VNPD_TEST_FAULT"] = "crash:j60"
        quarantined["job.fasta"] = {"j60"}
    try:
        daemon = run.start(env=env)
        drop(run.dirs.inbox, "job.fasta", texts["job.fasta"])
        if point.crash_at:
            daemon.wait_for(lambda: daemon.proc.poll() is not None, 120,
                            f"the crash at {point.crash_at}")
            if daemon.proc.returncode != -signal.SIGKILL:
                outcome.problems.append(f"exit {daemon.proc.returncode} at {point.crash_at}")
            outcome.problems += run.sigkill(daemon)
        else:
            if point.event:
                daemon.wait_for(lambda: daemon.events(point.event), 120, point.event)
            else:
                daemon.wait_for(lambda: len(daemon.events("batch_done")) >= point.after_batches,
                                120, f"{point.after_batches} batches")
                time.sleep(rng.uniform(0, 0.6))  # anywhere in a commit interval
            if (run.dirs.outbox / "job.h5").exists():
                outcome.problems.append("the job finished before the kill point")
            outcome.problems += run.sigkill(daemon)
        # The restart must not need the hooks: the faults are over.
        second = run.start(env={"VNPD_TEST_FAULT": env["VNPD_TEST_FAULT"]}
                           if point.poison else None)
        second.wait_outputs(["job.h5"], timeout=240)
        # Nothing happens later either (a late duplicate publish, say).
        time.sleep(0.5)
    except AssertionError as exc:
        outcome.problems.append(str(exc)[:2000])
    return run.finish(outcome, texts, reference, quarantined=quarantined)


def scenario_daemon_sigkill(root: Path, model: Path, reference: Reference,
                            points: tuple[KillPoint, ...] = KILL_POINTS,
                            seed: int = 0) -> Outcome:
    """6. The daemon is SIGKILLed at each point in turn; every restart finishes the job
    exactly once (one output, no `job.1.h5`), and no temp file is left."""
    total = Outcome("daemon SIGKILL")
    rng = random.Random(seed)
    started = time.monotonic()
    for i, point in enumerate(points):
        one = run_kill_point(root / f"k{i}", model, reference, point, rng)
        one.problems = [f"[{point.name}] {p}" for p in one.problems]
        total.add(one)
    total.seconds = round(time.monotonic() - started, 1)
    return total


# Disk full ----------------------------------------------------------------------------------
def scenario_outbox_full(root: Path, model: Path, reference: Reference) -> Outcome:
    """7. The outbox is full (ENOSPC, injected) and then unwritable (``chattr +i``, a real
    EPERM from the kernel): jobs wait and retry with backoff, and publish when it clears."""
    flag = root / "outbox-full.flag"
    run = Run(root, model, jobs={"publish_retry_max_s": 2.0})
    outcome = Outcome("outbox full / unwritable")
    texts = {"full.fasta": job_text(200, seed=5, prefix="f"),
             "frozen.fasta": job_text(100, seed=6, prefix="z")}
    try:
        flag.write_text("")
        daemon = run.start(env={"VNPD_TEST_OUTBOX_FULL": str(flag)})
        drop(run.dirs.inbox, "full.fasta", texts["full.fasta"])
        daemon.wait_for(lambda: len(daemon.events("publish_retry")) >= 3, 60, "3 retries")
        retries = [e for e in daemon.events("publish_retry") if e.get("file") == "full.fasta"]
        delays = [e["retry_in_s"] for e in retries]
        if delays[:3] != [1.0, 2.0, 2.0]:
            outcome.problems.append(f"retry delays {delays}, expected 1, 2, 2 (capped)")
        if "No space left" not in retries[0]["error"]:
            outcome.problems.append(f"retry error {retries[0]['error']!r}")
        if list(run.dirs.outbox.iterdir()):
            outcome.problems.append("something reached the full outbox")
        flag.unlink()  # space is back
        daemon.wait_outputs(["full.h5"], timeout=30)
        if shutil.which("chattr") and _chattr(run.dirs.outbox, "+i"):
            try:
                drop(run.dirs.inbox, "frozen.fasta", texts["frozen.fasta"])
                daemon.wait_for(lambda: [e for e in daemon.events("publish_retry")
                                         if e.get("file") == "frozen.fasta"], 60,
                                "a retry on the immutable outbox")
            finally:
                _chattr(run.dirs.outbox, "-i")
            daemon.wait_outputs(["frozen.h5"], timeout=30)
        else:
            del texts["frozen.fasta"]  # no chattr here: the injected ENOSPC case stands alone
        if daemon.proc.poll() is not None:
            outcome.problems.append("the daemon did not survive")
    except AssertionError as exc:
        outcome.problems.append(str(exc)[:2000])
    return run.finish(outcome, texts, reference)


def scenario_disk_full(root: Path, model: Path, reference: Reference) -> Outcome:
    """7b. A real full disk: the daemon's directories live on a small tmpfs, which a
    filler file fills up, twice: (1) completely, while a job computes: commits and
    window reads fail; (2) before a job comes in, all but its input and half of what its
    output needs: the output takes its space when the job starts (its partial file is
    allocated in full and prefilled), since finalize no longer copies it, so the
    partial file cannot be created. Each time the daemon stays up and logs what fails,
    and once the filler is removed it publishes everything, exactly once. Needs root
    (mount); skipped without it."""
    outcome = Outcome("disk full (small tmpfs)")
    fs = root / "fs"
    fs.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(fs)],
                      capture_output=True).returncode != 0:
        outcome.skipped = "cannot mount a tmpfs here (needs root)"
        return outcome
    try:
        run = Run(root, model, jobs={"publish_retry_max_s": 2.0}, data_dir=fs)
        texts = {"compute.fasta": job_text(3000, seed=8, prefix="c"),
                 "publish.fasta": job_text(20000, seed=9, prefix="p", lo=10, hi=30)}
        filler = fs / "filler"
        try:
            daemon = run.start()
            drop(run.dirs.inbox, "compute.fasta", texts["compute.fasta"])
            daemon.wait_for(lambda: len(daemon.events("batch_done")) >= 10, 120, "10 batches")
            _fill_up(filler, leave=0)
            errors = ("commit_failed", "window_read_failed")
            daemon.wait_for(lambda: [e for name in errors for e in daemon.events(name)], 60,
                            "an error logged for the full disk")
            time.sleep(3)  # the daemon must stay up while the disk stays full
            filler.unlink()
            daemon.wait_outputs(["compute.h5"], timeout=120)

            # Filled before the drop, so that no window or row races the filler: left free
            # is the input and half of its output, which the partial file (allocated in
            # full at create) does not fit in.
            per_row = (run.dirs.outbox / "compute.h5").stat().st_size / 3000
            _fill_up(filler, leave=len(texts["publish.fasta"]) + int(0.5 * 20000 * per_row))
            drop(run.dirs.inbox, "publish.fasta", texts["publish.fasta"])
            retries = daemon.wait_for(lambda: [e for e in daemon.events("partial_create_retry")
                                               if e["file"] == "publish.fasta"], 120,
                                      "a retry to create the output on the nearly full disk")
            if "No space left" not in retries[0]["error"]:
                outcome.problems.append(f"partial_create_retry error {retries[0]['error']!r}")
            filler.unlink()
            daemon.wait_outputs(["publish.h5"], timeout=120)
        except AssertionError as exc:
            outcome.problems.append(str(exc)[:2000])
        return run.finish(outcome, texts, reference)
    finally:
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)


def _fill_up(path: Path, leave: int) -> None:
    """Write ``path`` until its filesystem has ``leave`` bytes free, or none (ENOSPC)."""
    stat = os.statvfs(path.parent)
    size = max(0, stat.f_bavail * stat.f_frsize - leave)
    with open(path, "wb", buffering=0) as fh:
        try:
            while size > 0:
                size -= fh.write(b"\0" * min(size, 1 << 20))
            if not leave:
                while True:
                    fh.write(b"\0" * 4096)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


def _chattr(path: Path, flag: str) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


SCENARIOS: dict[str, Callable[[Path, Path, Reference], Outcome]] = {
    "worker_sigkill": scenario_worker_sigkill,
    "worker_sigstop": scenario_worker_sigstop,
    "batch_hang": scenario_batch_hang,
    "oom": scenario_oom,
    "sticky_error": scenario_sticky_error,
    "poison_quarantine": scenario_poison_quarantine,
    "poison_fail": scenario_poison_fail,
    "attempts_survive_restart": scenario_attempts_survive_restart,
    "all_devices_degraded": scenario_all_devices_degraded,
    "daemon_sigkill": scenario_daemon_sigkill,
    "outbox_full": scenario_outbox_full,
    "disk_full": scenario_disk_full,
}
