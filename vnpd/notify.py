"""sd_notify without libsystemd: READY, STATUS, WATCHDOG, STOPPING over $NOTIFY_SOCKET.

A datagram to the AF_UNIX socket systemd names in ``NOTIFY_SOCKET`` (a leading ``@`` means
the abstract namespace). Without the variable every call is a no-op, so the daemon runs
the same outside systemd.

Example::

    notifier = Notifier()
    notifier.ready("workers ready")
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, MutableMapping

import structlog

log = structlog.get_logger()

NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    def __init__(self, socket_path: str | None = None,
                 env: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = socket_path if socket_path is not None else env.get("NOTIFY_SOCKET", "")
        self.address = ("\0" + path[1:]) if path.startswith("@") else path
        self.enabled = bool(path)
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")

    def notify(self, **fields: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; never raises on a send error."""
        if not self.enabled:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(payload, self.address)
            return True
        except OSError as exc:
            log.warning("sd_notify_failed", error=str(exc), fields=list(fields))
            return False

    def ready(self, status: str | None = None) -> None:
        self.notify(READY="1", **({"STATUS": status} if status else {}))

    def status(self, text: str) -> None:
        self.notify(STATUS=text)

    def watchdog(self) -> None:
        self.notify(WATCHDOG="1")

    def stopping(self) -> None:
        self.notify(STOPPING="1")

    def watchdog_interval_s(self) -> float | None:
        """Half of WATCHDOG_USEC, when the watchdog is meant for this process."""
        if not self.enabled or not self._watchdog_usec:
            return None
        if self._watchdog_pid and self._watchdog_pid != str(os.getpid()):
            return None
        return int(self._watchdog_usec) / 1e6 / 2


def scrub_notify_env(env: MutableMapping[str, str]) -> None:
    """Remove the notify variables, so child processes never inherit them."""
    for name in NOTIFY_VARIABLES:
        env.pop(name, None)


class WatchdogPinger:
    """Sends WATCHDOG=1 every half watchdog period, but only while ``is_healthy()``."""

    def __init__(self, notifier: Notifier, interval_s: float | None = None) -> None:
        self.notifier = notifier
        self.interval_s = interval_s if interval_s is not None else notifier.watchdog_interval_s()

    async def run(self, is_healthy: Callable[[], bool]) -> None:
        if self.interval_s is None:
            return
        withheld = False
        while True:
            if is_healthy():
                self.notifier.watchdog()
                if withheld:
                    log.info("watchdog_resumed")
                withheld = False
            elif not withheld:
                withheld = True
                log.error("watchdog_withheld", reason="unhealthy: no worker with a fresh "
                          "heartbeat, or a job stalled")
            await asyncio.sleep(self.interval_s)
