"""The parent's ceiling: the real daemon (`vnpd run`) fed by simulated workers.

Inbox, claim, index, journal, scheduler, pipes, HDF5 writes, finalize and publish are the
real ones; only each worker's engine is replaced (``VNPD_TEST_SIMULATE_DIM``, see
docs/DAEMON.md "Test-only fault hooks"): it answers every batch at once with rows that
depend on the sequence's tokens (:mod:`vnpd.compute.simulated`). So the time from the
drop to the last publish is what the parent costs, and every output row can be checked
against its input sequence.

It writes ORF-length protein FASTA files (30..166 residues, uniform), starts the daemon
with N simulated workers, renames the files into the inbox, and waits for the outputs.
Then it checks every row (ids in input order, rows equal to what the sequence gives),
and reports sequences/s, tokens/s, lost, duplicated, wrong rows, the daemon's peak RSS
(VmHWM), per-phase times from the log, and with ``--profile`` where the parent's time
goes (py-spy, all threads; or cProfile, the event-loop thread only).

``--residues float16`` (or float32) turns on ``[output] per_residue`` with that output
dtype: the simulated workers then send every residue's rows too (not checked; the mean
rows are, cast to that dtype), so the pipes carry what a per-residue job's do.

Usage:
    python bench/parent.py --workers 4 --sequences 100000 --dim 1280 --json OUT.json
    python bench/parent.py --workers 8 --sequences 1000000 --dim 2560 --profile py-spy
    python bench/parent.py --workers 2 --sequences 20000 --dim 1280 --residues float16 --cache off
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vnpd.compute.simulated import simulated_rows  # noqa: E402
from vnpd.compute.tokenizer import BOS_IDX, EOS_IDX, encode  # noqa: E402

AMINO = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)
TOKEN_OF = np.zeros(256, dtype=np.int64)  # residue byte -> token id, from the one encoder
TOKEN_OF[AMINO] = encode(AMINO.tobytes().decode())[1:-1]
ORF_MIN, ORF_MAX = 30, 166


def make_inputs(n: int, files: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(lengths, residues as one uint8 array, per-file global indices)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(ORF_MIN, ORF_MAX + 1, size=n)
    residues = AMINO[rng.integers(0, len(AMINO), size=int(lengths.sum()))]
    return lengths, residues, np.array_split(np.arange(n), files)


def write_fasta(path: Path, idx: np.ndarray, lengths: np.ndarray, starts: np.ndarray,
                residues: np.ndarray) -> None:
    raw = residues.tobytes()
    with open(path, "w") as fh:
        step = 100_000
        for lo in range(0, len(idx), step):
            fh.write("".join(f">s{i}\n{raw[starts[i]:starts[i] + lengths[i]].decode()}\n"
                             for i in idx[lo:lo + step].tolist()))


def expected_rows(idx: np.ndarray, lengths: np.ndarray, starts: np.ndarray,
                  residues: np.ndarray, dim: int) -> np.ndarray:
    """What the simulated engine gives for the sequences ``idx`` (no truncation: <= 166)."""
    lens = lengths[idx]
    cu = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(lens + 2, out=cu[1:])
    tokens = np.empty(int(cu[-1]), dtype=np.int64)
    tokens[cu[:-1]] = BOS_IDX
    tokens[cu[1:] - 1] = EOS_IDX
    body = np.ones(tokens.shape[0], dtype=bool)
    body[cu[:-1]] = False
    body[cu[1:] - 1] = False
    gather = np.concatenate([np.arange(starts[i], starts[i] + lengths[i]) for i in idx]) \
        if len(idx) else np.zeros(0, dtype=np.int64)
    tokens[body] = TOKEN_OF[residues[gather]]
    return simulated_rows(tokens, cu, dim)


def check_outputs(outbox: Path, per_file: list[np.ndarray], lengths: np.ndarray,
                  starts: np.ndarray, residues: np.ndarray, dim: int) -> dict[str, int]:
    """lost, duplicated and wrong rows over every file in the outbox."""
    expected_names = {f"part{k}.h5" for k in range(len(per_file))}
    extra = [p for p in outbox.iterdir() if p.name not in expected_names]
    seen = np.zeros(len(lengths), dtype=np.int64)
    wrong = 0
    duplicated = 0
    for p in extra:
        with h5py.File(p, "r") as f:
            duplicated += int(f["embeddings"].shape[0])
    for k, idx in enumerate(per_file):
        path = outbox / f"part{k}.h5"
        if not path.exists():
            continue
        with h5py.File(path, "r") as f:
            ids = f["ids"].asstr()[:]
            got = np.array([int(i[1:]) for i in ids], dtype=np.int64)
            np.add.at(seen, got, 1)
            emb = f["embeddings"]
            if len(got) != len(idx) or not np.array_equal(got, idx):
                wrong += int(np.sum(got[:min(len(got), len(idx))] != idx[:len(got)]))
            step = max(1, (64 << 20) // (dim * 4))
            for lo in range(0, len(got), step):
                rows = emb[lo:lo + step]
                want = expected_rows(got[lo:lo + step], lengths, starts, residues, dim)
                wrong += int(np.sum(np.any(rows != want.astype(rows.dtype), axis=1)))
    lost = int(np.sum(seen == 0))
    duplicated += int(np.sum(np.maximum(seen - 1, 0)))
    return {"lost": lost, "duplicated": duplicated, "wrong_rows": wrong}


def vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def phases(log_path: Path) -> dict[str, float]:
    """Per-phase seconds summed over jobs, from the JSON log."""
    events: dict[int, dict[str, float]] = collections.defaultdict(dict)
    head_taken = [0]
    for line in log_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        ev, ts = rec.get("event"), rec.get("timestamp")
        if ts is None:
            continue
        t = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
        job = rec.get("job")
        if ev in ("job_claimed", "job_started", "job_published") and job is not None:
            events[job][ev] = t
        if ev == "output_finalized":
            job = int(Path(rec["path"]).parent.name) if rec.get("path") else -1
            events[job]["output_finalized"] = t
        if ev == "finalize_started" and job is not None:
            events[job]["finalize_started"] = t
        if ev == "head_start_queued" and job is not None:
            events[job]["head_start_queued"] = t
        if ev == "head_rows_taken":  # rows a head start computed before the job's start
            head_taken[0] += rec.get("sequences", 0)
    out = collections.Counter()
    for e in events.values():
        if "job_claimed" in e and "job_started" in e:
            out["index_and_create_s"] += e["job_started"] - e["job_claimed"]
        if "job_started" in e and "finalize_started" in e:
            out["compute_s"] += e["finalize_started"] - e["job_started"]
        if "finalize_started" in e and "output_finalized" in e:
            out["finalize_s"] += e["output_finalized"] - e["finalize_started"]
        if "output_finalized" in e and "job_published" in e:
            out["verify_publish_s"] += e["job_published"] - e["output_finalized"]
    claimed = [e["job_claimed"] for e in events.values() if "job_claimed" in e]
    started = [e["job_started"] for e in events.values() if "job_started" in e]
    if claimed and started:  # the head: how long after the first claim jobs started
        out["first_job_started_s"] = min(started) - min(claimed)
        out["last_job_started_s"] = max(started) - min(claimed)
    queued = [e["head_start_queued"] for e in events.values() if "head_start_queued" in e]
    if claimed and queued:  # a head start: its first proteins queued for head batches
        out["first_head_queued_s"] = min(queued) - min(claimed)
        out["head_rows_taken"] = head_taken[0]
    computed = [e["finalize_started"] for e in events.values() if "finalize_started" in e]
    published = [e["job_published"] for e in events.values() if "job_published" in e]
    if claimed and computed and published:  # the tail: last rows done to last publish
        out["last_computed_s"] = max(computed) - min(claimed)
        out["last_published_s"] = max(published) - min(claimed)
    return {k: round(v, 3) for k, v in out.items()}


PROCESSES = re.compile(r'(?:process \d+:"[^"]*";)+')
IDLE_LEAVES = ("Condition.wait", "_worker (concurrent/futures/thread.py:81)",
               "EpollSelector.select", "InotifyFD._check_inotify_fd", "Event.wait",
               "select (selectors.py", "Queue.get (queue.py:171)")


def summarise_pyspy(raw: Path, top: int = 20) -> list[str]:
    """Where the parent's threads spend their time, from py-spy's collapsed stacks
    (``--threads``; with ``--subprocesses`` too, the children's threads are named with
    their pid, and the daemon's are as without it).

    Samples whose innermost frame is a wait (a condition, an idle thread pool, the
    selector, inotify) are left out. The event-loop thread (MainThread) is serial: its
    busy share bounds the parent; the others (pipe reader/writer threads, asyncio_N
    thread-pool workers: indexing, finalize) compete with it for the GIL.
    """
    def kind(thread: str) -> str:
        name = thread.split(": ", 1)[-1]
        return name.rstrip("0123456789").rstrip("_-") or name

    busy: collections.Counter[str] = collections.Counter()
    main_self: collections.Counter[str] = collections.Counter()
    main_incl: collections.Counter[str] = collections.Counter()
    other_self: collections.Counter[str] = collections.Counter()
    total = idle = 0
    root: str | None = None  # with --subprocesses: the process py-spy started
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        process = ""
        if chain := PROCESSES.match(stack):  # 'process PID:"command";' each (commands hold ';')
            pids = re.findall(r'process (\d+):', chain.group(0))
            root = root or pids[0]
            process = "" if pids[-1] == root else f"pid {pids[-1]}: "
            stack = stack[chain.end():]
        frames = stack.split(";")
        total += n
        if any(frames[-1].startswith(leaf) for leaf in IDLE_LEAVES):
            idle += n
            continue
        thread = process + kind(frames[0])
        busy[thread] += n
        if thread == "MainThread":
            main_self[frames[-1]] += n
            for fr in set(frames[1:]):
                main_incl[fr] += n
        else:
            other_self[f"[{thread}] {frames[-1]}"] += n
    main = busy["MainThread"] or 1
    lines = [f"py-spy: {total} samples, {idle} idle (waits) left out; busy samples by thread:"]
    lines += [f"  {c:6d}  {t}" for t, c in busy.most_common(10)]
    lines.append("event-loop thread, self (share of its busy samples):")
    lines += [f"  {100 * c / main:5.1f}%  {f}" for f, c in main_self.most_common(top)]
    lines.append("event-loop thread, inclusive:")
    lines += [f"  {100 * c / main:5.1f}%  {f}" for f, c in main_incl.most_common(top + 15)
              if c < main]
    lines.append("other threads, self (samples):")
    lines += [f"  {c:6d}  {f}" for f, c in other_self.most_common(top)]
    return lines


def summarise_cprofile(path: Path, top: int = 25) -> list[str]:
    import io

    buf = io.StringIO()
    stats = pstats.Stats(str(path), stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return buf.getvalue().splitlines()


def run(args: argparse.Namespace) -> dict[str, object]:
    root = Path(args.workdir or tempfile.mkdtemp(prefix="vnpd-parent-"))
    shutil.rmtree(root, ignore_errors=True)
    for d in ("inbox", "outbox", "state", "failed", "stage"):
        (root / d).mkdir(parents=True)
    t = time.monotonic()
    lengths, residues, per_file = make_inputs(args.sequences, args.files, args.seed)
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    for k, idx in enumerate(per_file):
        write_fasta(root / "stage" / f"part{k}.fasta", idx, lengths, starts, residues)
    print(f"inputs: {args.sequences} sequences in {args.files} files "
          f"({time.monotonic() - t:.1f} s to write)", flush=True)
    model = root / "simulated.pt"
    model.write_text("no model: VNPD_TEST_SIMULATE_DIM workers\n")
    config = root / "config.toml"
    config.write_text(f"""
[paths]
inbox = "{root / 'inbox'}"
outbox = "{root / 'outbox'}"
state = "{root / 'state'}"
failed = "{root / 'failed'}"
[model]
checkpoint = "{model}"
dtype = "float32"
output_dtype = "{'float32' if args.residues == 'none' else args.residues}"
max_tokens_per_batch = {args.max_tokens}
[workers]
devices = {json.dumps(['cpu'] * args.workers)}
[inbox]
settle_s = 0.2
rescan_interval_s = 1.0
[metrics]
listen = ""
[logging]
format = "json"
level = "info"
[cache]
enabled = {"true" if args.cache == "on" else "false"}
[output]
per_residue = {"false" if args.residues == "none" else "true"}
""" + ("" if args.index_processes is None else
       f"[jobs]\nindex_processes = {args.index_processes}\n"))
    env = dict(os.environ, VNPD_TEST_SIMULATE_DIM=str(args.dim))
    cmd = [sys.executable, "-m", "vnpd", "run", "--config", str(config)]
    prof_out = root / ("profile.txt" if args.profile == "py-spy" else "profile.pstats")
    if args.profile == "py-spy":
        cmd = ["py-spy", "record", "--format", "raw", "--rate", str(args.rate), "--threads",
               "-o", str(prof_out), "--"] + cmd
    elif args.profile == "cprofile":
        env["VNPD_TEST_PROFILE"] = str(prof_out)
    log_path = root / "daemon.log"
    total_tokens = int((lengths + 2).sum())
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        pid = None
        while True:
            text = log_path.read_text()
            if '"daemon_ready"' in text:
                break
            if proc.poll() is not None:
                raise RuntimeError("daemon exited:\n" + text[-3000:])
            time.sleep(0.1)
        for line in text.splitlines():
            if '"daemon_start"' in line:
                pid = int(json.loads(line)["pid"])
        assert pid is not None
        t0 = time.monotonic()
        for k in range(args.files):
            os.rename(root / "stage" / f"part{k}.fasta", root / "inbox" / f"part{k}.fasta")
        expected = {f"part{k}.h5" for k in range(args.files)}
        rss_samples = []
        while not expected.issubset({p.name for p in (root / "outbox").iterdir()}):
            if proc.poll() is not None:
                raise RuntimeError("daemon exited:\n" + log_path.read_text()[-3000:])
            rss_samples.append(vm_hwm_mb(pid))
            time.sleep(0.02)
        elapsed = time.monotonic() - t0
        # The last job is published once its output is linked; wait for its summary.
        while log_path.read_text().count('"job_published"') < args.files:
            time.sleep(0.02)
        peak = vm_hwm_mb(pid)
        os.kill(pid, signal.SIGTERM)
        code = proc.wait(300)
    checks = check_outputs(root / "outbox", per_file, lengths, starts, residues, args.dim)
    result: dict[str, object] = {
        "workers": args.workers, "sequences": args.sequences, "dim": args.dim,
        "files": args.files, "max_tokens": args.max_tokens, "tokens": total_tokens,
        "residues": args.residues, "cache": args.cache, "index_processes": args.index_processes,
        "seconds": round(elapsed, 3), "seq_per_s": round(args.sequences / elapsed, 1),
        "tok_s": round(total_tokens / elapsed, 1), **checks,
        "peak_rss_mb": round(peak or 0, 1), "exit_code": code,
        "phases_summed_over_jobs": phases(log_path), "cpus": os.cpu_count(),
        "loadavg_before": args.loadavg, "loadavg_after": list(os.getloadavg()),
        "workdir": str(root)}
    if args.profile != "none" and prof_out.exists():
        summary = (summarise_pyspy(prof_out) if args.profile == "py-spy"
                   else summarise_cprofile(prof_out))
        result["profile"] = str(prof_out)
        result["profile_summary"] = summary
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--sequences", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=131072,
                    help="token budget per batch (131072: a 3B model on an H200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", choices=("on", "off"), default="on",
                    help="the daemon's embedding cache (on by default, as in production)")
    ap.add_argument("--index-processes", type=int, default=None,
                    help="[jobs] index_processes (default: the daemon's default)")
    ap.add_argument("--residues", choices=("none", "float16", "float32"), default="none",
                    help="per-residue rows in this dtype (also the mean rows' output dtype)")
    ap.add_argument("--profile", choices=("none", "py-spy", "cprofile"), default="none")
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", default=None)
    ap.add_argument("--summarise", metavar="RAW", default=None,
                    help="only print the summary of a py-spy raw file (bench/daemon.py's "
                         "VNPD_BENCH_PYSPY writes them) and exit")
    args = ap.parse_args()
    if args.summarise:
        print("\n".join(summarise_pyspy(Path(args.summarise))))
        return
    args.loadavg = list(os.getloadavg())
    result = run(args)
    for line in result.get("profile_summary", []):
        print(line)
    print(json.dumps(result, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if not args.keep:
        shutil.rmtree(result["workdir"], ignore_errors=True)
    ok = result["lost"] == 0 and result["duplicated"] == 0 and result["wrong_rows"] == 0
    sys.exit(0 if ok and result["exit_code"] == 0 else 1)


if __name__ == "__main__":
    main()
