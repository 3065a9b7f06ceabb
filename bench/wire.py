"""Worker -> parent pipe throughput: the old framing against vnpd.workers.wire.

A spawned process (the worker's side) sends copies of one ``ResultMsg`` (``--mb`` of
array data in all, at least 2 messages) to
the parent through a ``multiprocessing`` duplex Pipe (an AF_UNIX socketpair), the way a
local worker sends its results:

- ``old``: ``conn.send``/``conn.recv`` (the whole message pickled, arrays in-band) and the
  socket's default buffers, as vnpd did before wire.py;
- ``wire``: :func:`vnpd.workers.wire.send_message`/``recv_message`` (pickle protocol 5,
  the arrays' bytes sent raw and read from the socket into fresh arrays) on sockets widened
  with :func:`vnpd.workers.wire.widen`.

Payloads (D = ``--dim``, 2560 at 3B): per-residue float16 rows of 64 MB and of 8 MB with
their (n, D) float32 mean rows and counts, and a mean-rows-only message of (1300, D)
float32 (a 131072-token batch of ORF-length sequences). The two framings alternate, a
fresh process each, for ``--rounds`` rounds; the timer starts when the sender has built
its message and stops when the parent has received the last one. MB = 2**20 bytes of
array data. Both processes pin glibc's mmap threshold as the daemon's do
(:mod:`vnpd.malloc`), so every large buffer is a fresh mapping, as there.

Usage:
    python bench/wire.py --rounds 3 --mb 1024 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vnpd.log import configure_logging  # noqa: E402
from vnpd.malloc import pin_mmap_threshold  # noqa: E402
from vnpd.workers.protocol import ResultMsg  # noqa: E402
from vnpd.workers.wire import recv_message, send_message, widen  # noqa: E402

MB = 1 << 20
FRAMINGS = ("old", "wire")
MEAN_ROWS = 1300      # sequences in a 131072-token batch of ORF-length proteins
RESIDUES_PER_SEQ = 330


def build_message(payload: str, dim: int) -> ResultMsg:
    """The ResultMsg of ``payload``: "residues-64MB", "residues-8MB" or "means"."""
    if payload == "means":
        rows = np.random.default_rng(0).standard_normal((MEAN_ROWS, dim), dtype=np.float32)
        return ResultMsg(1, rows, 0.0, 1.0)
    n_res = int(payload.removeprefix("residues-").removesuffix("MB")) * MB // (dim * 2)
    n = max(1, n_res // RESIDUES_PER_SEQ)
    counts = np.full(n, n_res // n, dtype=np.int64)
    counts[-1] += n_res - int(counts.sum())
    residues = np.random.default_rng(1).standard_normal((n_res, dim), dtype=np.float32)
    return ResultMsg(1, residues[:n].copy(), 0.0, 1.0, residues.astype(np.float16), counts)


def array_bytes(msg: ResultMsg) -> int:
    return sum(a.nbytes for a in (msg.embeddings, msg.residues, msg.residue_counts)
               if a is not None)


def sender(conn: Connection, framing: str, payload: str, dim: int, count: int) -> None:
    """The worker's side: build the message, say ready, send it ``count`` times."""
    configure_logging("auto", "info")
    pin_mmap_threshold()
    msg = build_message(payload, dim)
    if framing == "wire":
        widen(conn)
    conn.send_bytes(b"ready")
    for _ in range(count):
        send_message(conn, msg) if framing == "wire" else conn.send(msg)
    conn.close()


def measure(framing: str, payload: str, dim: int, mb: int) -> float:
    """MB/s of array data from a fresh spawned sender to this process."""
    count = max(2, -(-mb * MB // array_bytes(build_message(payload, dim))))
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=True)
    process = ctx.Process(target=sender, args=(child, framing, payload, dim, count))
    process.start()
    child.close()
    if framing == "wire":
        widen(parent)
    parent.recv_bytes()  # the sender has built its message
    started, total = time.perf_counter(), 0
    for _ in range(count):
        msg = recv_message(parent) if framing == "wire" else parent.recv()
        total += array_bytes(msg)
    elapsed = time.perf_counter() - started
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"sender exited {process.exitcode}")
    return total / MB / elapsed


def run(payloads: list[str], dim: int, mb: int, rounds: int) -> dict[str, Any]:
    runs: dict[str, dict[str, list[float]]] = {p: {f: [] for f in FRAMINGS} for p in payloads}
    for r in range(rounds):
        for payload in payloads:
            for framing in (FRAMINGS if r % 2 == 0 else FRAMINGS[::-1]):
                mbps = measure(framing, payload, dim, mb)
                runs[payload][framing].append(mbps)
                print(f"round {r + 1} {payload:>14} {framing:>4}: {mbps:7.0f} MB/s", flush=True)
    return {p: summary(runs[p]) for p in payloads}


def summary(runs: dict[str, list[float]]) -> dict[str, Any]:
    old, wire = statistics.median(runs["old"]), statistics.median(runs["wire"])
    return {"runs_mb_s": runs, "old_mb_s": round(old), "wire_mb_s": round(wire),
            "ratio": round(wire / old, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=2560)
    ap.add_argument("--mb", type=int, default=1024, help="MB of arrays per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--payloads", default="residues-64MB,residues-8MB,means")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    configure_logging("auto", "info")
    pin_mmap_threshold()
    results = run(args.payloads.split(","), args.dim, args.mb, args.rounds)
    for payload, s in results.items():
        print(f"{payload:>14}: old {s['old_mb_s']} MB/s, wire {s['wire_mb_s']} MB/s, "
              f"x{s['ratio']} (median of {args.rounds})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dim": args.dim, "mb": args.mb, "rounds": args.rounds,
                       "cpus": os.cpu_count(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
