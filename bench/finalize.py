"""Finalize time of one output: the copy of the rows (before) against the in-place marker.

Builds a partial file of N rows of width D as the daemon does, every row written (raw,
at their offsets), then times ``PartialOutput.finalize`` the two ways:

- ``copy``: the file is not prefilled, so finalize takes the ids and lengths from the
  caller and writes every row into a new file (what the daemon did before);
- ``in-place``: the file was prefilled at create (ids, lengths, attributes, placeholders
  for the end-of-job counts), so finalize only rewrites those counts and sets
  ``schema_version`` to 1, each fsynced.

Also times the create of each (the prefill reads N ids, once). Needs about 2 x N x D x 4
bytes of free disk in --workdir.

Usage:
    python bench/finalize.py --rows 1000000 --dim 2560 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vnpd.output.hdf5 import OutputMeta, PartialOutput  # noqa: E402
from vnpd.output.verify import verify_output  # noqa: E402

META = OutputMeta("esm2_t36_3B_UR50D", 36, "bfloat16", 1022, "cudnn", "in.fasta", "0" * 64)
COUNTS = ("computed_sequences", "cache_hits", "duplicate_records")  # the daemon's end-of-job


def fill_rows(out: PartialOutput, n: int, dim: int) -> None:
    block = max(1, (64 << 20) // (dim * 4))
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        out.write_rows(np.arange(lo, hi), np.full((hi - lo, dim), 0.5, dtype=np.float32))
    out.flush()


def drop_caches_hint() -> None:
    try:  # cold cache makes the copy read from disk, as after a long job; best effort
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=2560)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    n, dim = args.rows, args.dim
    root = Path(args.workdir or tempfile.mkdtemp(prefix="vnpd-finalize-"))
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"seq{i}" for i in range(n)]
    lengths = np.full(n, 100)
    counts = {"computed_sequences": n, "cache_hits": 0, "duplicate_records": 0}
    result: dict[str, object] = {"rows": n, "dim": dim, "gb": round(n * dim * 4 / 1e9, 2)}
    try:
        for mode in ("copy", "in-place"):
            path = root / f"{mode}.h5"
            t = time.perf_counter()
            if mode == "copy":
                out = PartialOutput.create(path, n, dim, "float32")
            else:
                out = PartialOutput.create(path, n, dim, "float32", ids=iter(ids),
                                           lengths=lengths, meta=META,
                                           attributes=dict.fromkeys(COUNTS, -1))
            create_s = time.perf_counter() - t
            fill_rows(out, n, dim)
            drop_caches_hint()
            t = time.perf_counter()
            if mode == "copy":
                out.finalize(META, ids=iter(ids), lengths=lengths, attributes=counts)
            else:
                out.finalize(META, attributes=counts)
            finalize_s = time.perf_counter() - t
            t = time.perf_counter()
            verify_output(path)
            verify_s = time.perf_counter() - t
            result[mode] = {"create_s": round(create_s, 2), "finalize_s": round(finalize_s, 3),
                            "verify_s": round(verify_s, 2)}
            print(f"{mode}: create {create_s:.2f} s, finalize {finalize_s:.3f} s, "
                  f"verify {verify_s:.2f} s", flush=True)
            path.unlink()
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
