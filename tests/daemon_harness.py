"""Run the real daemon (`python -m vnpd run`) as a subprocess for end-to-end tests.

Nothing of vnpd is mocked: real worker processes, real files, a real watchdog observer,
real HDF5. The harness only writes the config, starts and signals the process, and reads
what a user would read: the outbox, failed/, `state/status.json` and the JSON log lines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass
class DaemonDirs:
    root: Path
    inbox: Path = field(init=False)
    outbox: Path = field(init=False)
    state: Path = field(init=False)
    failed: Path = field(init=False)

    def __post_init__(self) -> None:
        self.inbox, self.outbox = self.root / "inbox", self.root / "outbox"
        self.state, self.failed = self.root / "state", self.root / "failed"


def _toml_items(defaults: dict[str, Any], overrides: dict[str, Any] | None) -> str:
    """``key = value`` lines for one section: the harness defaults, then ``overrides``."""
    items = {**defaults, **(overrides or {})}
    return "\n".join(f"{key} = {json.dumps(value)}" for key, value in items.items())


def write_config(dirs: DaemonDirs, model: Path, *, devices: tuple[str, ...] = ("cpu", "cpu"),
                 extra: str = "", max_tokens: int = 2048, workers: dict[str, Any] | None = None,
                 inbox: dict[str, Any] | None = None, jobs: dict[str, Any] | None = None,
                 path: Path | None = None) -> Path:
    """Write ``config.toml`` (in ``dirs.root``, or at ``path``) for a test daemon.
    ``workers``, ``inbox`` and ``jobs`` add or override keys of those sections (TOML
    forbids a section twice, so ``extra`` cannot)."""
    worker_keys = _toml_items({"devices": list(devices), "heartbeat_interval_s": 0.5,
                               "heartbeat_timeout_s": 20.0}, workers)
    inbox_keys = _toml_items({"settle_s": 0.3, "rescan_interval_s": 2.0}, inbox)
    jobs_section = f"[jobs]\n{_toml_items({}, jobs)}\n" if jobs else ""
    cfg = path or dirs.root / "config.toml"
    cfg.write_text(f"""
[paths]
inbox = "{dirs.inbox}"
outbox = "{dirs.outbox}"
state = "{dirs.state}"
failed = "{dirs.failed}"

[model]
checkpoint = "{model}"
dtype = "float32"
max_tokens_per_batch = {max_tokens}

[workers]
{worker_keys}

[inbox]
{inbox_keys}

{jobs_section}
[metrics]
listen = "127.0.0.1:0"

[logging]
format = "json"
level = "debug"
{extra}
""")
    return cfg


class Daemon:
    """A `vnpd run` subprocess with its JSON log captured to a file."""

    def __init__(self, config: Path, dirs: DaemonDirs, env: dict[str, str] | None = None,
                 log_dir: Path | None = None) -> None:
        self.config, self.dirs = config, dirs
        self.log_path = (log_dir or dirs.root) / f"daemon-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "vnpd", "run", "--config", str(config)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=str(REPO))

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if name is None or event.get("event") == name:
                out.append(event)
        return out

    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.dirs.state / "status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def wait_for(self, predicate: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) waiting for {what}:\n"
                                     + self.log_path.read_text()[-4000:])
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n"
                             + self.log_path.read_text()[-4000:])

    def wait_ready(self, timeout: float = 120) -> None:
        self.wait_for(lambda: self.events("daemon_ready"), timeout, "workers ready")

    def wait_outputs(self, names: list[str], timeout: float = 180) -> list[Path]:
        return self.wait_for(
            lambda: [self.dirs.outbox / n for n in names]
            if all((self.dirs.outbox / n).exists() for n in names) else None,
            timeout, f"outputs {names}")

    def terminate(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        finally:
            self._log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()

    def worker_pids(self) -> list[int]:
        status = self.status() or {}
        return [w["pid"] for w in status.get("workers", []) if w.get("pid")]


def drop(inbox: Path, name: str, text: str) -> Path:
    """Write a file the way a careful user does: hidden temp name, then rename."""
    tmp = inbox / f".{name}.part"
    tmp.write_text(text)
    final = inbox / name
    os.rename(tmp, final)
    return final


def fasta_text(sequences: list[str], prefix: str = "seq") -> str:
    return "".join(f">{prefix}{i} description {i}\n{s}\n" for i, s in enumerate(sequences))
