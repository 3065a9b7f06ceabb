"""One restart policy for every pool: a slot that crashed restarts after a backoff, and a
slot that crashed too often in a window is degraded and rested (gunicorn-style arbiter).

Example::

    policy = Supervision(heartbeat_timeout_s=30, batch_deadline_base_s=120,
                         batch_deadline_per_1k_tokens_s=5, restart_backoff_s=1,
                         restart_backoff_max_s=60, crash_budget=5, crash_window_s=600,
                         degraded_retry_s=900)
    schedule_restart(slot, policy)   # slot.state: "dead" or "degraded"
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Supervision:
    """How a pool watches its slots and restarts them: ``[workers]`` in the config."""

    heartbeat_timeout_s: float
    batch_deadline_base_s: float
    batch_deadline_per_1k_tokens_s: float
    restart_backoff_s: float
    restart_backoff_max_s: float
    crash_budget: int
    crash_window_s: float
    degraded_retry_s: float

    def batch_deadline(self, tokens: int) -> float:
        """Seconds a batch of ``tokens`` may run before its slot counts as hung."""
        return self.batch_deadline_base_s + self.batch_deadline_per_1k_tokens_s * tokens / 1000


def schedule_restart(slot: Slot, policy: Supervision) -> None:
    """Count a crash of ``slot``: schedule its restart with exponential backoff, or mark it
    degraded (retried after ``degraded_retry_s``) once ``crash_budget`` crashes fall within
    ``crash_window_s``."""
    crash_budget, crash_window_s = policy.crash_budget, policy.crash_window_s
    degraded_retry_s = policy.degraded_retry_s
    backoff_s, backoff_max_s = policy.restart_backoff_s, policy.restart_backoff_max_s
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
