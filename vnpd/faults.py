"""The test-only fault plan: faults that the fault-injection tests ask for, in one object.

The fault tests (tests/daemon/test_faults.py, bench/reliability.py) run the real daemon
and real workers; a :class:`FaultPlan` puts a fault at an exact point that a signal from
outside could only hit by luck. The daemon reads it once from the environment
(:meth:`FaultPlan.from_env`, variables that production never sets) and hands it to the
parts that act on it; each worker gets its part in its spawn spec. An empty plan, the
default everywhere, does nothing. Every fault logs before it acts.

- ``VNPD_TEST_FAULT=ACTION:RECORD_ID,...`` (acted on in the workers): when a batch holds
  record RECORD_ID the worker acts: ``crash`` (SIGKILL itself), ``hang`` (stop working
  while heartbeats go on), ``oom`` (raise a CUDA out-of-memory error), ``sticky`` (raise
  the error of an illegal memory access).
- ``VNPD_TEST_CRASH_AT=POINT,...``: the daemon SIGKILLs itself the first time it reaches
  a named point of a job's life (:data:`CRASH_POINTS`).
- ``VNPD_TEST_OUTBOX_FULL=FLAG_FILE``: while FLAG_FILE exists, publishing into the outbox
  fails with ENOSPC, as on a full disk.
- ``VNPD_TEST_INDEX_DELAY_S=SECONDS`` (acted on where a file is indexed,
  :func:`vnpd.daemon.indexing.build_source`): every index waits this long first, so that
  a test sees what happens while a file is being indexed (the head start).
- ``VNPD_TEST_SIMULATE_DIM=D`` (for benchmarks of the parent, bench/parent.py): every
  worker runs :class:`vnpd.compute.simulated.SimulatedEngine` (rows of width D computed
  from the tokens, no model) instead of loading the model. Only allowed when every
  configured device is ``"cpu"``; the daemon refuses to start otherwise.

Example::

    VNPD_TEST_CRASH_AT=finalized vnpd run --config test.toml   # dies before the link
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
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
WORKER_ACTIONS = ("crash", "hang", "oom", "sticky")


def parse_worker_faults(text: str) -> dict[str, str]:
    """``"crash:seq3,hang:seq9"`` -> ``{"seq3": "crash", "seq9": "hang"}``."""
    faults: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        action, _, record = item.partition(":")
        faults[record] = action
    return faults


@dataclass(frozen=True)
class FaultPlan:
    """Which faults to inject; the empty default injects none."""

    worker: dict[str, str] = field(default_factory=dict)  # record id -> action
    crash_points: frozenset[str] = frozenset()
    outbox_full_flag: Path | None = None
    simulate_dim: int = 0  # > 0: workers run the simulated engine of this width

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "FaultPlan":
        points = frozenset(filter(None, environ.get("VNPD_TEST_CRASH_AT", "").split(",")))
        flag = environ.get("VNPD_TEST_OUTBOX_FULL")
        simulate = environ.get("VNPD_TEST_SIMULATE_DIM", "").strip()
        if simulate and (not simulate.isdigit() or int(simulate) < 1):
            raise ValueError(f"VNPD_TEST_SIMULATE_DIM must be a positive width, not {simulate!r}")
        return cls(parse_worker_faults(environ.get("VNPD_TEST_FAULT", "")), points,
                   Path(flag) if flag else None, int(simulate or 0))

    # Daemon faults ------------------------------------------------------------------
    def crash_at(self, point: str) -> None:
        """SIGKILL this process here if the plan names ``point``.

        SIGKILL, not an exception: nothing may run after it (no ``finally``, no atexit,
        no flush), exactly as when the OOM killer or a power cut takes the daemon.
        """
        assert point in CRASH_POINTS, point
        if point in self.crash_points:
            log.warning("test_crash", point=point, meaning=CRASH_POINTS[point])
            os.kill(os.getpid(), signal.SIGKILL)

    def check_outbox_space(self, outbox: Path) -> None:
        """Raise ENOSPC, as a full disk does, while the plan's flag file exists."""
        flag = self.outbox_full_flag
        if flag is not None and flag.exists():
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (test fault "
                          f"VNPD_TEST_OUTBOX_FULL={flag})", str(outbox))

    # Worker faults ------------------------------------------------------------------
    def inject(self, ids: tuple[str, ...]) -> None:
        """In a worker: act on the first record of ``ids`` that the plan names.

        ``oom`` and ``sticky`` raise the errors that the device itself would raise, so
        the worker handles them by the same rules as real ones.
        """
        if not self.worker:
            return
        for record in ids:
            action = self.worker.get(record)
            if action == "crash":
                log.warning("test_fault_crash", record=record)
                os.kill(os.getpid(), signal.SIGKILL)
            elif action == "hang":
                log.warning("test_fault_hang", record=record)
                parent = os.getppid()
                while os.getppid() == parent:  # hung, but not past its daemon's SIGKILL
                    time.sleep(1)
                os._exit(1)
            elif action == "oom":
                import torch

                raise torch.cuda.OutOfMemoryError(
                    f"CUDA out of memory (test fault on {record})")
            elif action == "sticky":
                raise RuntimeError(f"CUDA error: an illegal memory access was encountered "
                                   f"(test fault on {record})")
