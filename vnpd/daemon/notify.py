"""systemd service notifications (sd_notify) without libsystemd, and a health-gated watchdog.

systemd hands a ``Type=notify`` service the path of a datagram socket in
``NOTIFY_SOCKET``; the service sends newline-separated ``KEY=value`` assignments
to it (``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``). A path that
starts with ``@`` names a socket in the abstract namespace. Outside systemd the
variable is unset and every call here is a no-op, so the daemon needs no special
case for running in a terminal.

Only the parent process talks to systemd (``NotifyAccess=main``). Workers are
started with :func:`scrub_notify_env` applied to their environment, so a worker
can never send ``READY=1`` or keep the watchdog alive on the parent's behalf.

Example::

    notifier = Notifier()            # reads NOTIFY_SOCKET; disabled outside systemd
    notifier.ready(status="2 workers ready")
    pinger = WatchdogPinger(notifier)
    task = asyncio.create_task(pinger.run(lambda: supervisor.healthy))
    ...
    notifier.stopping()
    pinger.stop()
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, MutableMapping

import structlog

log = structlog.get_logger()

NOTIFY_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def scrub_notify_env(env: MutableMapping[str, str]) -> None:
    """Remove the systemd notification variables from ``env`` in place.

    Used on the environment of every worker, so that only the parent (the unit's
    main process) ever notifies systemd or feeds its watchdog.
    """
    for name in NOTIFY_ENV_VARS:
        env.pop(name, None)


class Notifier:
    """Sends sd_notify datagrams to systemd's notification socket.

    ``socket_path`` defaults to ``$NOTIFY_SOCKET``. A leading ``@`` selects the
    abstract namespace. ``None`` or ``""`` disables the notifier: ``notify``
    returns ``False`` and the helpers do nothing.
    """

    def __init__(self, socket_path: str | None = None) -> None:
        path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
        self._address: str | None = None
        if path:
            self._address = "\0" + path[1:] if path.startswith("@") else path
        self.enabled: bool = self._address is not None
        # Captured now: the daemon scrubs these from os.environ right after
        # construction so that workers never inherit them.
        self._watchdog_usec = os.environ.get("WATCHDOG_USEC", "")
        self._watchdog_pid = os.environ.get("WATCHDOG_PID", "")

    def notify(self, **fields: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; ``True`` if it was sent.

        Never raises on a send error (systemd gone, socket full, bad path): the
        error is logged and ``False`` returned, because a notification must not
        take the daemon down. Newlines inside a value become spaces.

        >>> Notifier("").notify(READY="1")
        False
        """
        if self._address is None or not fields:
            return False
        # A newline would start a new assignment (a STATUS text could forge READY=1),
        # so it is flattened rather than raised: a notification must not crash us.
        payload = "".join(f"{key}={value.replace(chr(10), ' ')}\n"
                          for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, self._address)
        except OSError as exc:
            log.warning("sd_notify_failed", fields=sorted(fields), error=str(exc))
            return False
        return True

    def ready(self, status: str | None = None) -> None:
        """Tell systemd that start-up finished (``READY=1``), with an optional status line."""
        if status is None:
            self.notify(READY="1")
        else:
            self.notify(READY="1", STATUS=status)

    def status(self, text: str) -> None:
        """Set the free-form status line shown by ``systemctl status``."""
        self.notify(STATUS=text)

    def watchdog(self) -> None:
        """Feed the service watchdog (``WATCHDOG=1``)."""
        self.notify(WATCHDOG="1")

    def stopping(self) -> None:
        """Tell systemd that a drain/shutdown began (``STOPPING=1``)."""
        self.notify(STOPPING="1")

    def watchdog_interval_s(self) -> float | None:
        """Seconds between watchdog pings: half of ``$WATCHDOG_USEC``, or ``None``.

        The variables are read when the notifier is constructed (see
        :func:`scrub_notify_env`). ``None`` when the notifier is disabled, when
        ``WATCHDOG_USEC`` is unset or not a positive integer, or when
        ``WATCHDOG_PID`` names another process.
        """
        if not self.enabled:
            return None
        if self._watchdog_pid and self._watchdog_pid != str(os.getpid()):
            return None
        try:
            value = int(self._watchdog_usec)
        except ValueError:
            return None
        return value / 2e6 if value > 0 else None


class WatchdogPinger:
    """Feeds systemd's watchdog while, and only while, the daemon reports itself healthy.

    A ping withheld is how a wedged supervisor gets restarted: systemd kills the
    unit ``WatchdogSec`` after the last ping. ``interval_s`` defaults to the
    notifier's :meth:`Notifier.watchdog_interval_s`; with neither, ``run`` returns
    at once.
    """

    def __init__(self, notifier: Notifier, interval_s: float | None = None) -> None:
        self.notifier = notifier
        self.interval_s = interval_s if interval_s is not None else notifier.watchdog_interval_s()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Make :meth:`run` return after the current wait (cancelling its task works too)."""
        self._stop.set()

    async def run(self, is_healthy: Callable[[], bool]) -> None:
        """Ping every ``interval_s`` while ``is_healthy()`` is true, until stopped.

        A health check that raises counts as unhealthy. The first withheld ping
        after a healthy stretch is logged as a warning, and the recovery as info,
        so a flapping daemon is visible without one line per interval.
        """
        if self.interval_s is None or not self.notifier.enabled:
            return
        withholding = False
        while not self._stop.is_set():
            try:
                healthy = bool(is_healthy())
            except Exception:
                log.exception("watchdog_health_check_failed")
                healthy = False
            if healthy:
                self.notifier.watchdog()
                if withholding:
                    log.info("watchdog_ping_resumed")
                    withholding = False
            elif not withholding:
                log.warning("watchdog_ping_withheld", interval_s=self.interval_s)
                withholding = True
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=self.interval_s)
            except TimeoutError:
                pass
