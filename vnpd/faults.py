"""Test-only fault hooks, driven by environment variables that production never sets.

The fault-injection tests (tests/daemon/test_faults.py) run the real daemon and real workers;
these hooks let them put a fault at an exact point that a signal from outside could
only hit by luck. Every hook is inert unless its variable is set, and each one logs
before it acts, so a test log always says which fault was injected.

- ``VNPD_TEST_FAULT=ACTION:RECORD_ID,...`` (read by each worker): when a batch holds
  record RECORD_ID the worker acts: ``crash`` (SIGKILL itself), ``hang`` (stop working
  while heartbeats go on), ``oom`` (behave as a CUDA out-of-memory), ``sticky`` (behave
  as an illegal memory access: report and exit).
- ``VNPD_TEST_CRASH_AT=POINT,...`` (read by the daemon): the daemon SIGKILLs itself the
  first time it reaches a named point of a job's life (:data:`CRASH_POINTS`).
- ``VNPD_TEST_OUTBOX_FULL=FLAG_FILE`` (read by the daemon): while FLAG_FILE exists,
  publishing into the outbox fails with ENOSPC, as on a full disk.

Example::

    VNPD_TEST_CRASH_AT=finalized vnpd run --config test.toml   # dies before the link
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import structlog

log = structlog.get_logger()

# Where VNPD_TEST_CRASH_AT may kill the daemon, in the order of a job's life.
CRASH_POINTS = {
    "claimed": "the input is renamed into state/claimed/, the journal has no job yet",
    "rows_flushed": "rows are flushed to the partial file, their batches not yet journaled",
    "finalized": "the partial file is finalized (and compacted), not yet published",
    "dest_journaled": "the output name is journaled, the file not yet linked",
    "linked": "the output is linked into the outbox, the job not yet marked done",
    "source_moved": "the input is moved to state/done/, the job not yet marked done",
}


class SimulatedOOM(RuntimeError):
    """Raised by ``VNPD_TEST_FAULT=oom:ID``; handled exactly like a CUDA OOM."""


class SimulatedStickyError(RuntimeError):
    """Raised by ``VNPD_TEST_FAULT=sticky:ID``; handled like an illegal memory access."""


# Worker faults ----------------------------------------------------------------------
def parse_faults(text: str) -> dict[str, str]:
    """``"crash:seq3,hang:seq9"`` -> ``{"seq3": "crash", "seq9": "hang"}``."""
    faults: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        action, _, record = item.partition(":")
        faults[record] = action
    return faults


def worker_faults() -> dict[str, str]:
    """The faults ``VNPD_TEST_FAULT`` asks this worker for (usually none)."""
    return parse_faults(os.environ.get("VNPD_TEST_FAULT", ""))


def inject_fault(ids: tuple[str, ...], faults: dict[str, str]) -> None:
    """Act on the first record of ``ids`` that ``faults`` names; see the module doc."""
    if not faults:
        return
    for record in ids:
        action = faults.get(record)
        if action == "crash":
            log.warning("test_fault_crash", record=record)
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "hang":
            log.warning("test_fault_hang", record=record)
            while True:
                time.sleep(3600)
        elif action == "oom":
            raise SimulatedOOM(f"test fault: simulated CUDA out of memory on {record}")
        elif action == "sticky":
            raise SimulatedStickyError(f"test fault: simulated illegal memory access on {record}")


# Daemon faults ----------------------------------------------------------------------
def crash_at(point: str) -> None:
    """SIGKILL this process here if ``VNPD_TEST_CRASH_AT`` names ``point``.

    SIGKILL, not an exception: nothing may run after it (no ``finally``, no atexit, no
    flush), exactly as when the OOM killer or a power cut takes the daemon.
    """
    assert point in CRASH_POINTS, point
    wanted = os.environ.get("VNPD_TEST_CRASH_AT")
    if wanted and point in wanted.split(","):
        log.warning("test_crash", point=point, meaning=CRASH_POINTS[point])
        os.kill(os.getpid(), signal.SIGKILL)


def check_outbox_space(outbox: Path) -> None:
    """Raise ENOSPC, as a full disk does, while ``VNPD_TEST_OUTBOX_FULL``'s flag file exists."""
    flag = os.environ.get("VNPD_TEST_OUTBOX_FULL")
    if flag and os.path.exists(flag):
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (test hook "
                      f"VNPD_TEST_OUTBOX_FULL={flag})", str(outbox))
