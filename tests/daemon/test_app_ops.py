"""The daemon as systemd and Prometheus see it: sd_notify on a real datagram socket, a
metrics scrape while a job runs, JSON log lines with job and worker context."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
import urllib.request
from io import StringIO
from pathlib import Path

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import random_sequences
from tests.daemon_harness import Daemon, DaemonDirs, drop, fasta_text, write_config
from vnpd.log import configure_logging

pytestmark = pytest.mark.timeout(300)


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def drain(self) -> list[tuple[float, dict[str, str]]]:
        while True:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                return self.messages
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append((time.monotonic(), fields))

    def times(self, key: str) -> list[float]:
        return [t for t, m in self.drain() if key in m]


def test_notify_ready_status_watchdog_and_stopping(tmp_path: Path, tiny_model: Path) -> None:
    dirs = DaemonDirs(tmp_path)
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    daemon = Daemon(write_config(dirs, tiny_model), dirs, env=env)
    stopped: list[int] = []
    try:
        daemon.wait_for(lambda: notify.times("READY"), 120, "READY=1")
        # READY only after every worker loaded its model.
        assert len(daemon.events("worker_ready")) >= 2
        daemon.wait_for(lambda: all(w["state"] == "ready"
                                    for w in (daemon.status() or {"workers": [{}]})["workers"]
                                    if w), 10, "status shows ready workers")
        # Workers never inherit the notify socket.
        for pid in daemon.worker_pids():
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert not any(v.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_USEC=")) for v in environ)
        daemon.wait_for(lambda: len(notify.times("WATCHDOG")) >= 3, 20, "watchdog pings")
        assert any("workers ready" in m.get("STATUS", "") for _, m in notify.drain())

        # Wedge every worker: the pings must stop (heartbeat_timeout is 20 s, so the
        # supervisor does not kill them within this test; the watchdog reacts first).
        pids = daemon.worker_pids()
        stopped.extend(pids)
        notify.drain()  # receive times stamp the datagrams: read everything sent so far
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        wedged_at = time.monotonic()
        while time.monotonic() < wedged_at + 5.0:
            notify.drain()
        pings = notify.times("WATCHDOG")
        late = [t for t in pings if t > wedged_at + 3.5]
        assert not late, "watchdog kept pinging while every worker was wedged"
        assert daemon.events("watchdog_ping_withheld")
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        resumed_at = time.monotonic()
        daemon.wait_for(lambda: [t for t in notify.times("WATCHDOG") if t > resumed_at], 20,
                        "watchdog resumes")
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        code = daemon.terminate()
    assert code == 0
    assert notify.times("STOPPING")


def scrape(address: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_metrics_move_while_a_job_runs(tmp_path: Path, tiny_model: Path) -> None:
    dirs = DaemonDirs(tmp_path)
    daemon = Daemon(write_config(dirs, tiny_model, max_tokens=1024), dirs)
    try:
        daemon.wait_ready()
        address = daemon.wait_for(lambda: (daemon.status() or {}).get("metrics"), 30, "address")
        before = daemon.wait_for(lambda: (lambda v: v if v.get("vnpd_workers_ready") == 2
                                          else None)(scrape(address)), 10, "workers_ready=2")
        assert before.get("vnpd_sequences_total", 0) == 0
        drop(dirs.inbox, "m.fasta", fasta_text(random_sequences([700] * 150, seed=3)))
        mid = daemon.wait_for(lambda: (lambda v: v if v.get("vnpd_sequences_total", 0) > 0
                                       else None)(scrape(address)), 120, "progress")
        assert 0 < mid["vnpd_sequences_total"] <= 150
        daemon.wait_outputs(["m.h5"])
        time.sleep(1.5)  # one status tick
        after = scrape(address)
    finally:
        assert daemon.terminate() == 0
    assert after["vnpd_sequences_total"] == 150
    assert after["vnpd_tokens_total"] == 150 * 702
    assert after['vnpd_jobs_total{outcome=published}'] == 1
    assert after["vnpd_last_publish_timestamp_seconds"] > time.time() - 300
    assert after["vnpd_batch_latency_seconds_count{device=cpu}"] >= 2
    assert 0 < after["vnpd_device_busy_fraction{device=cpu}"] <= 1
    assert after["vnpd_queue_depth"] == 0


def test_json_logs_carry_job_and_worker_context(tmp_path: Path, tiny_model: Path) -> None:
    dirs = DaemonDirs(tmp_path)
    daemon = Daemon(write_config(dirs, tiny_model), dirs)
    try:
        daemon.wait_ready()
        drop(dirs.inbox, "ctx.fasta", fasta_text(random_sequences([40, 80], seed=1)))
        daemon.wait_outputs(["ctx.h5"])
    finally:
        assert daemon.terminate() == 0
    lines = daemon.log_path.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line is JSON
    assert all({"event", "level", "timestamp"} <= e.keys() for e in events)
    published = daemon.events("job_published")[0]
    assert published["job"] == 1 and published["file"] == "ctx.fasta"
    worker_lines = [e for e in events if e.get("logger", "").startswith("vnpd.workers.process")
                    or e.get("event") == "engine_ready"]
    assert worker_lines and all("worker" in e and "device" in e and "pid" in e
                                for e in worker_lines)


def test_stdlib_logs_go_through_the_same_chain() -> None:
    stream = StringIO()
    configure_logging("json", "info", stream=stream, worker=3, device="cuda:3")
    logging.getLogger("torch.something").warning("a torch warning %s", "here")
    structlog.get_logger().info("ours", batch=5)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["event"] == "a torch warning here" and lines[0]["logger"] == "torch.something"
    assert lines[0]["device"] == "cuda:3" and lines[1]["device"] == "cuda:3"
    assert lines[1]["batch"] == 5 and lines[1]["worker"] == 3
