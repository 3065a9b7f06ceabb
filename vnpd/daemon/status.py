"""The daemon's status snapshot: written atomically to ``state/status.json`` every second
by the daemon, read by ``vnpd status`` (no socket needed: the state directory is shared).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"


def utc_now() -> str:
    """The time now as ISO 8601 UTC, to the second: ``2026-12-02T11:01:02Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_status(state_dir: Path, status: dict[str, Any]) -> None:
    """Replace ``state/status.json`` atomically (readers never see half a file)."""
    tmp = state_dir / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps(status, indent=1))
    os.replace(tmp, state_dir / STATUS_FILE)


def read_status(state_dir: Path) -> dict[str, Any] | None:
    """The last snapshot, or None when no daemon has written one."""
    try:
        return json.loads((state_dir / STATUS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def format_status(status: dict[str, Any]) -> str:
    """A human-readable table of workers and jobs."""
    lines = [f"vnpd {status.get('version', '?')}  pid {status.get('pid')}  "
             f"updated {status.get('updated_utc')}" + ("  (stopped)" if status.get("stopped") else ""),
             "", "WORKER  DEVICE    PID      STATE      HEARTBEAT  BATCHES  INFLIGHT  RESTARTS"]
    for w in status.get("workers", []):
        age = w.get("last_heartbeat_age_s")
        lines.append(f"{w['worker']:<7} {w['device']:<9} {str(w.get('pid') or '-'):<8} "
                     f"{w['state']:<10} {(f'{age:.1f}s ago' if age is not None else '-'):<10} "
                     f"{w['batches_done']:<8} {w['inflight']:<9} {w['restarts']}"
                     # Ray actors: where the cluster placed them.
                     + (f"  {w['node']} gpu {w.get('gpu') or '-'}" if w.get("node") else ""))
    lines += ["", "JOB     FILE                              PROGRESS            TOK/S      ETA"]
    jobs = status.get("jobs", [])
    for j in jobs:
        if j.get("state") == "indexing":
            lines.append(f"{j['job']:<7} {'(indexing)':<33}")
            continue
        pct = 100 * j["sequences_done"] / max(1, j["sequences"])
        eta = f"{j['eta_s']:.0f}s" if j.get("eta_s") is not None else "-"
        lines.append(f"{j['job']:<7} {j['file'][:33]:<33} {j['sequences_done']}/{j['sequences']} "
                     f"({pct:.0f}%)".ljust(69) + f" {j['tokens_per_s']:<10.0f} {eta}")
    if not jobs:
        lines.append("(no active jobs)")
    return "\n".join(lines) + "\n"
