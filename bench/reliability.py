"""Reliability matrix: repeat every fault scenario of tests/fault_scenarios.py N times.

Each scenario runs the real daemon (two CPU workers, a tiny random ESM-2), injects its
fault, and accounts for every input sequence against a clean `vnpd embed` run (see the
module docstring of tests/fault_scenarios.py). The daemon-SIGKILL scenario is split into one
row per kill point, with a different random delay on each run. The matrix gives, per
row: runs, clean runs, sequences, lost, duplicated, wrong rows, quarantined (expected
and found), outbox files checked by the concurrent reader, and seconds per run.

Usage (CPU only; about 3 minutes per round on 2 cores):
    python bench/reliability.py --runs 10 --json bench/results/reliability.json \
        --markdown bench/results/reliability.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.fault_scenarios import (KILL_POINTS, OUTCOME_COUNTS, SCENARIOS, Outcome,  # noqa: E402
                                   Reference, run_kill_point)
from vnpd.log import configure_logging  # noqa: E402
from vnpd.compute.families.esm2_checkpoint import make_test_model  # noqa: E402

Case = Callable[[Path, Path, Reference, int], Outcome]


def cases() -> dict[str, Case]:
    """Every row of the matrix: the scenarios, with daemon_sigkill split by kill point."""
    out: dict[str, Case] = {}
    for name, scenario in SCENARIOS.items():
        if name == "daemon_sigkill":
            for point in KILL_POINTS:
                out[f"daemon_sigkill: {point.name}"] = (
                    lambda root, model, ref, run, point=point:
                    run_kill_point(root, model, ref, point, random.Random(run)))
        else:
            out[name] = lambda root, model, ref, run, scenario=scenario: scenario(root, model, ref)
    return out


@dataclass
class Row:
    """The runs of one case, summed."""

    case: str
    runs: int = 0
    clean: int = 0
    sequences: int = 0
    lost: int = 0
    duplicated: int = 0
    wrong_rows: int = 0
    quarantined: int = 0
    reader_checks: int = 0
    seconds: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, outcome: Outcome, run: int) -> None:
        self.runs += 1
        self.clean += outcome.ok
        for key in OUTCOME_COUNTS:
            setattr(self, key, getattr(self, key) + getattr(outcome, key))
        self.seconds.append(outcome.seconds)
        self.problems += [f"run {run}: {p[:500]}" for p in outcome.problems]


def markdown(rows: list[Row]) -> str:
    head = ("| scenario | runs | clean | sequences | lost | duplicated | wrong rows | "
            "quarantined | reader checks | s/run (mean, max) |\n|---|---:|---:|---:|---:|---:|"
            "---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        mean = sum(r.seconds) / max(1, len(r.seconds))
        lines.append(f"| {r.case} | {r.runs} | {r.clean} | {r.sequences} | {r.lost} | "
                     f"{r.duplicated} | {r.wrong_rows} | {r.quarantined} | {r.reader_checks} "
                     f"| {mean:.1f}, {max(r.seconds, default=0):.1f} |")
    total = Row("**all**")
    for r in rows:
        for key in ("runs", "clean", *OUTCOME_COUNTS):
            setattr(total, key, getattr(total, key) + getattr(r, key))
    lines.append(f"| **all** | {total.runs} | {total.clean} | {total.sequences} | {total.lost} "
                 f"| {total.duplicated} | {total.wrong_rows} | {total.quarantined} | "
                 f"{total.reader_checks} | |")
    return head + "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="repeats of each scenario")
    parser.add_argument("--only", default="", help="comma list of case names (substrings)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where runs happen (default: a temp dir); failed runs are kept")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    configure_logging("console", "warning")  # the reference runs' info lines are noise here

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vnpd-reliability-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model, _ = make_test_model(workdir / "esm2_tiny.pt", layers=2, dim=64, heads=4, seed=7)
    reference = Reference(model, workdir / "reference")
    selected = {name: case for name, case in cases().items()
                if not args.only or any(s in name for s in args.only.split(","))}
    rows = {name: Row(name) for name in selected}
    started = time.monotonic()
    # Round by round, so an interrupted run still has every scenario repeated evenly.
    for run in range(args.runs):
        for name, case in selected.items():
            root = workdir / f"run{run}" / name.replace(": ", "-").replace(" ", "_").replace(",", "")
            outcome = case(root, model, reference, run)
            rows[name].add(outcome, run)
            print(f"[{time.monotonic() - started:7.0f}s] run {run} {name}: "
                  f"{'clean' if outcome.ok else 'PROBLEMS'} ({outcome.sequences} sequences, "
                  f"lost {outcome.lost}, duplicated {outcome.duplicated}, wrong "
                  f"{outcome.wrong_rows}, {outcome.seconds} s)"
                  + ("" if outcome.ok else f" {outcome.problems}"), flush=True)
            if outcome.ok:
                shutil.rmtree(root, ignore_errors=True)
    table = markdown(list(rows.values()))
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        args.json.write_text(json.dumps({
            "runs": args.runs, "seconds": round(time.monotonic() - started, 1),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "cpu_count": os.cpu_count(), "rows": [asdict(r) for r in rows.values()]}, indent=1))
    return 0 if all(r.clean == r.runs for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
