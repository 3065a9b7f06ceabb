"""Retrying work that a full or failing disk interrupts: one backoff, two ways to use it.

- :func:`with_disk_retry` runs an async step until it succeeds (publishing, saving an
  index, failing a job).
- :class:`Backoff` alone is a gate for work that must not block the loop: the scheduler
  skips its commits and window reads until :attr:`Backoff.retry_at`.

Delays double from 1 s up to a maximum (``jobs.publish_retry_max_s``). A library such as
tenacity covers the first use but not the second (a non-blocking "not before" gate), and
one small class serving both keeps the two from drifting apart again.

Example::

    dest = await with_disk_retry(lambda: publish(job), "publish_retry", 300.0, job=7)
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog

log = structlog.get_logger()

T = TypeVar("T")

DISK_ERRORS = (OSError, sqlite3.OperationalError)
"""What a full, read-only or failing disk raises: from files, and from SQLite's journal."""


class Backoff:
    """Exponential delays from 1 s up to ``max_s``; :meth:`reset` after a success."""

    def __init__(self, max_s: float) -> None:
        self.max_s = max_s
        self.delay = 0.0
        self.retry_at = 0.0  # time.monotonic() before which the gated work waits

    def failed(self) -> float:
        """Record a failure; returns the delay before the next try."""
        self.delay = min(max(1.0, 2 * self.delay), self.max_s)
        self.retry_at = time.monotonic() + self.delay
        return self.delay

    def reset(self) -> None:
        self.delay = 0.0

    def waiting(self) -> bool:
        return time.monotonic() < self.retry_at


async def with_disk_retry(step: Callable[[], Awaitable[T]], event: str, max_delay_s: float,
                          **fields: Any) -> T:
    """Run ``step`` until it succeeds, retrying disk errors with :class:`Backoff`.

    Each failure is logged as ``event`` (an error, with ``fields``, the error and the
    delay). ``step`` must be safe to run again after a failure. Other exceptions propagate.
    """
    backoff = Backoff(max_delay_s)
    while True:
        try:
            return await step()
        except DISK_ERRORS as exc:
            delay = backoff.failed()
            log.error(event, error=str(exc), retry_in_s=delay, **fields)
            await asyncio.sleep(delay)
