"""One restart policy for every pool: a slot that crashed restarts after a backoff, and a
slot that crashed too often in a window is degraded and rested (gunicorn-style arbiter).

Example::

    schedule_restart(slot, crash_budget=5, crash_window_s=600, degraded_retry_s=900,
                     backoff_s=1, backoff_max_s=60)   # slot.state: "dead" or "degraded"
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Protocol

import structlog

log = structlog.get_logger()


class Slot(Protocol):
    spec: Any
    state: str
    crashes: deque[float]
    next_start_at: float

    @property
    def device(self) -> str: ...


def schedule_restart(slot: Slot, *, crash_budget: int, crash_window_s: float,
                     degraded_retry_s: float, backoff_s: float, backoff_max_s: float) -> None:
    """Count a crash of ``slot``: schedule its restart with exponential backoff, or mark it
    degraded (retried after ``degraded_retry_s``) once ``crash_budget`` crashes fall within
    ``crash_window_s``."""
    now = time.monotonic()
    slot.crashes.append(now)
    while slot.crashes and now - slot.crashes[0] > crash_window_s:
        slot.crashes.popleft()
    if len(slot.crashes) >= crash_budget:
        slot.state = "degraded"
        slot.next_start_at = now + degraded_retry_s
        log.error("device_degraded", worker=slot.spec.worker_id, device=slot.device,
                  crashes=len(slot.crashes), window_s=crash_window_s,
                  retry_in_s=degraded_retry_s)
        return
    delay = min(backoff_max_s, backoff_s * 2 ** (len(slot.crashes) - 1))
    slot.state = "dead"
    slot.next_start_at = now + delay
    log.info("worker_restart_scheduled", worker=slot.spec.worker_id, device=slot.device,
             delay_s=delay)
