"""sd_notify over a real AF_UNIX datagram socket, as systemd would receive it."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from vnpd.daemon.notify import Notifier, WatchdogPinger, scrub_notify_env


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket in tmp, standing in for systemd's notify socket."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield path, sock
    sock.close()


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on ``sock``, without blocking."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2.0)
    return out


def test_messages_are_exact_datagrams(receiver: tuple[str, socket.socket],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path, sock = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier()
    assert notifier.enabled
    notifier.ready()
    assert sock.recv(4096) == b"READY=1\n"
    notifier.ready(status="2 workers ready")
    assert sock.recv(4096) == b"READY=1\nSTATUS=2 workers ready\n"
    notifier.status("3 jobs active")
    assert sock.recv(4096) == b"STATUS=3 jobs active\n"
    notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1\n"
    notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1\n"
    assert notifier.notify(STATUS="draining", EXTEND_TIMEOUT_USEC="5000000") is True
    assert sock.recv(4096) == b"STATUS=draining\nEXTEND_TIMEOUT_USEC=5000000\n"


def test_abstract_namespace_socket() -> None:
    name = f"vnpd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        notifier = Notifier("@" + name)
        notifier.ready(status="up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up\n"
    finally:
        sock.close()


@pytest.mark.parametrize("path", [None, ""])
def test_disabled_outside_systemd(path: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier(path)
    assert not notifier.enabled
    assert notifier.notify(READY="1") is False
    notifier.ready("x")
    notifier.status("x")
    notifier.watchdog()
    notifier.stopping()
    assert notifier.watchdog_interval_s() is None


def test_send_errors_never_raise(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens.sock"))
    assert notifier.enabled
    assert notifier.notify(READY="1") is False
    notifier.watchdog()  # no exception either


def test_newlines_cannot_forge_assignments(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    Notifier(path).status("file a.fasta\nREADY=1")
    assert sock.recv(4096) == b"STATUS=file a.fasta READY=1\n"


def test_watchdog_interval(receiver: tuple[str, socket.socket],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = receiver
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert Notifier(path).watchdog_interval_s() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier(path).watchdog_interval_s() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert Notifier(path).watchdog_interval_s() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("", "0", "abc"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert Notifier(path).watchdog_interval_s() is None


def test_watchdog_settings_survive_scrub(receiver: tuple[str, socket.socket],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon scrubs os.environ right after building its Notifier."""
    path, sock = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier()
    scrub_notify_env(os.environ)
    assert notifier.watchdog_interval_s() == 1.0
    notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1\n"


def test_scrub_notify_env_removes_only_notify_variables() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "60000000",
           "WATCHDOG_PID": "1", "PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0"}
    scrub_notify_env(env)
    assert env == {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0"}
    scrub_notify_env(env)  # idempotent
    assert env == {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0"}


def test_pinger_follows_health(receiver: tuple[str, socket.socket]) -> None:
    """Pings while healthy, none while unhealthy, pings again after recovery."""
    path, sock = receiver
    pinger = WatchdogPinger(Notifier(path), interval_s=0.02)
    healthy = True

    async def scenario() -> tuple[list[bytes], list[bytes], list[bytes]]:
        nonlocal healthy
        task = asyncio.create_task(pinger.run(lambda: healthy))
        await asyncio.sleep(0.2)
        first = drain(sock)
        healthy = False
        await asyncio.sleep(0.05)  # let a ping already decided on land
        drain(sock)
        await asyncio.sleep(0.2)
        withheld = drain(sock)
        healthy = True
        await asyncio.sleep(0.2)
        resumed = drain(sock)
        pinger.stop()
        await asyncio.wait_for(task, timeout=2)
        return first, withheld, resumed

    with capture_logs() as logs:
        first, withheld, resumed = asyncio.run(scenario())
    events = [entry["event"] for entry in logs]
    assert events == ["watchdog_ping_withheld", "watchdog_ping_resumed"]  # once each, no spam
    assert len(first) >= 3 and set(first) == {b"WATCHDOG=1\n"}
    assert withheld == []
    assert len(resumed) >= 3 and set(resumed) == {b"WATCHDOG=1\n"}


def test_pinger_treats_a_failing_check_as_unhealthy(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    pinger = WatchdogPinger(Notifier(path), interval_s=0.02)

    def broken() -> bool:
        raise RuntimeError("supervisor state unreadable")

    async def scenario() -> None:
        task = asyncio.create_task(pinger.run(broken))
        await asyncio.sleep(0.15)
        pinger.stop()
        await asyncio.wait_for(task, timeout=2)

    asyncio.run(scenario())
    assert drain(sock) == []


def test_pinger_stops_on_cancel(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    pinger = WatchdogPinger(Notifier(path), interval_s=0.02)

    async def scenario() -> None:
        task = asyncio.create_task(pinger.run(lambda: True))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    drain(sock)
    asyncio.run(asyncio.sleep(0.1))
    assert drain(sock) == []


def test_pinger_uses_systemd_interval_and_returns_without_one(
        receiver: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    path, sock = receiver
    monkeypatch.setenv("WATCHDOG_USEC", "40000")  # 40 ms -> ping every 20 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    pinger = WatchdogPinger(Notifier(path))
    assert pinger.interval_s == 0.02
    monkeypatch.delenv("WATCHDOG_USEC")
    idle = WatchdogPinger(Notifier(path))
    assert idle.interval_s is None
    asyncio.run(asyncio.wait_for(idle.run(lambda: True), timeout=1))  # returns at once
    assert drain(sock) == []
