"""Embedding cache benchmark: lookup cost per key for misses and hits (vnpd/cache).

Fills a fresh cache with ``--keys`` entries (one mean row of ``--dim`` float32 each),
then times, in batches of ``--batch`` keys as the daemon would call it:
  key    sequence_key() of ORF-length residue strings (the hashing the caller adds)
  put    put_many, per entry (one transaction per batch)
  miss   get_many of keys that are not in the cache
  hit    get_many of keys that are, shuffled (includes checksum, decode, LRU bookkeeping)
The OS page cache is warm (the file was just written): this is the steady state of a
daemon whose cache fits in memory, not a cold disk.

Usage:
    python bench/cache.py [--keys 100000] [--batch 1000] [--dim 1280] [--dir DIR] [--json OUT]
Prints one line per measurement: microseconds per key.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vnpd.cache.key import cache_namespace, sequence_key  # noqa: E402
from vnpd.cache.store import EmbeddingCache  # noqa: E402

RESIDUES = np.array(list("ACDEFGHIKLMNPQRSTVWY"))


def batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def per_key_us(fn, groups: list[list]) -> float:
    """Microseconds per key of ``fn(group)`` over all groups."""
    n = sum(len(g) for g in groups)
    t0 = time.perf_counter()
    for g in groups:
        fn(g)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--dir", default="", help="where to build the cache (default: a temp dir)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    lengths = rng.integers(30, 167, args.keys)  # six-frame ORF lengths
    seqs = ["".join(rng.choice(RESIDUES, int(n))) for n in lengths]
    absent = [s + "W" for s in seqs]  # same lengths, none of them in the cache
    ns = cache_namespace("0" * 64, [-1], "bfloat16", "float32", 1022, "truncate", 511, False)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="vnpd-cache-bench-"))
    res: dict = {"keys": args.keys, "batch": args.batch, "dim": args.dim,
                 "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
                 "cpu": platform.processor() or platform.machine(), "us_per_key": {}}
    try:
        t = per_key_us(lambda g: [sequence_key(s) for s in g], batches(seqs, args.batch))
        res["us_per_key"]["key"] = t
        keys = [sequence_key(s) for s in seqs]
        missing = [sequence_key(s) for s in absent]
        row = rng.standard_normal(args.dim).astype(np.float32)
        with EmbeddingCache.open(work, 64 << 30, ns) as cache:
            res["us_per_key"]["put"] = per_key_us(
                lambda g: cache.put_many((k, {"mean": row}) for k in g), batches(keys, args.batch))
            res["us_per_key"]["miss"] = per_key_us(cache.get_many, batches(missing, args.batch))
            order = list(rng.permutation(len(keys)))
            hit_groups = batches([keys[i] for i in order], args.batch)
            res["us_per_key"]["hit"] = per_key_us(cache.get_many, hit_groups)
            stats = cache.stats()
            assert stats.hits == args.keys and stats.misses == args.keys, stats
            res["file_bytes"] = stats.file_bytes
            res["payload_bytes"] = stats.payload_bytes
        for name, us in res["us_per_key"].items():
            print(f"{name:5s} {us:8.2f} us/key", flush=True)
        print(f"file  {res['file_bytes'] / 2**20:8.1f} MiB for {args.keys} entries "
              f"({res['payload_bytes'] / 2**20:.1f} MiB payload)", flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
