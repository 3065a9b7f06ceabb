"""Daemon end-to-end benchmark: drop FASTA files into a running `vnpd run`, time to publish.

In one run, on the same data:
1. engine only: the workload through :class:`vnpd.compute.engine.Engine` in this process (the
   ceiling the daemon is compared with);
2. for each device set given (e.g. ``cuda:0`` then ``cuda:0,cuda:1``): a fresh daemon is
   started and left to load its models; then the files are dropped (rename into the inbox)
   and the clock runs from the first drop to the last published output.

Usage (on the GPU machine):
    python bench/daemon.py --workload 3b-uniprot --sequences 12000 --files 4 \
        --device-sets cuda:0 --json $OUT/daemon.json

Compute once (``--repeat-fraction``, ``--cache``): that share of the sequences are copies
of others, spread over the files; each daemon run starts with an empty cache, and is run
with ``[cache] enabled`` on, off, or both (repeats within a file are computed once either
way; the cache also serves repeats across files). Each run reports the sequences computed.
    # the Ray backend (one GPU actor, a daemon-owned Ray) against the local one:
    python bench/daemon.py --workload 3b-uniprot --device-sets cuda:0 --backends local,ray
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.engine import (DEVICE, WORKLOADS, device_name, free_device_memory,  # noqa: E402
                          make_sequences, run_engine, sync, workload_lengths)
from bench.parent import phases  # noqa: E402
from vnpd.compute.engine import Engine  # noqa: E402
from vnpd.compute.families.esm2_checkpoint import save_esm2_checkpoint  # noqa: E402
from vnpd.compute.tokenizer import tokens_for  # noqa: E402


def write_checkpoint(workload: str, root: Path) -> Path:
    """A random-weight checkpoint of ``workload``'s architecture under ``root/model``,
    written once: benches given the same ``--workdir`` in one GPU call share it (a 3B
    checkpoint takes about a minute to make and write)."""
    from esm.data import Alphabet
    from esm.model.esm2 import ESM2

    arch = WORKLOADS[workload]  # named by architecture: 3b-orf and 3b-uniprot share one
    out = root / "model" / f"esm2_t{arch['layers']}_{arch['dim']}.pt"
    done = out.with_suffix(".done")
    if done.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with torch.device(DEVICE):  # random init on the GPU: minutes faster than on the CPU
        model = ESM2(num_layers=arch["layers"], embed_dim=arch["dim"],
                     attention_heads=arch["heads"], alphabet=Alphabet.from_architecture("ESM-1b"))
    save_esm2_checkpoint(model, out, seed=0)
    del model
    free_device_memory()
    done.touch()
    return out


def engine_only(checkpoint: Path, seqs: list[str], lengths: np.ndarray, dtype: str) -> float:
    engine = Engine.load(str(checkpoint), device=DEVICE, dtype=dtype)
    go = run_engine(engine, seqs, lengths)
    engine.warmup()
    go(limit=3)
    sync()
    t0 = time.perf_counter()
    go()
    sync()
    seconds = time.perf_counter() - t0
    del engine, go
    free_device_memory()
    return float(tokens_for(lengths).sum()) / seconds


def daemon_run(root: Path, checkpoint: Path, files: list[tuple[str, str]], devices: list[str],
               dtype: str, total_tokens: int, backend: str = "local",
               cache: bool = True, sequential: bool = False, extra_config: str = ""
               ) -> dict[str, object]:
    run = root / ("run-" + backend + "-" + "-".join(d.replace(":", "") for d in devices)
                  + ("" if cache else "-nocache"))
    shutil.rmtree(run, ignore_errors=True)
    for d in ("inbox", "outbox", "state", "failed", "stage"):
        (run / d).mkdir(parents=True)
    config = run / "config.toml"
    config.write_text(f"""
[paths]
inbox = "{run / 'inbox'}"
outbox = "{run / 'outbox'}"
state = "{run / 'state'}"
failed = "{run / 'failed'}"
[model]
checkpoint = "{checkpoint}"
dtype = "{dtype}"
[workers]
devices = {json.dumps(devices)}
backend = "{backend}"
[ray]
address = ""
[inbox]
settle_s = 0.2
rescan_interval_s = 1.0
[metrics]
listen = ""
[logging]
format = "json"
level = "info"
[cache]
enabled = {"true" if cache else "false"}
{extra_config}""")
    for name, text in files:  # staged on the same filesystem: a drop is one rename
        (run / "stage" / name).write_text(text)
    log_path = run / "daemon.log"
    with open(log_path, "w") as log_file:
        cmd = [sys.executable, "-m", "vnpd", "run", "--config", str(config)]
        if os.environ.get("VNPD_BENCH_PYSPY"):  # a folder: sample the daemon and its workers
            cmd = ["py-spy", "record", "--format", "raw", "--rate", "50", "--threads",
                   "--subprocesses", "-o",
                   str(Path(os.environ["VNPD_BENCH_PYSPY"]) / f"{root.name}-{run.name}.txt"),
                   "--"] + cmd
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        t_start = time.monotonic()
        while '"daemon_ready"' not in log_path.read_text():
            if proc.poll() is not None:
                raise RuntimeError("daemon exited:\n" + log_path.read_text()[-3000:])
            time.sleep(0.2)
        ready_s = time.monotonic() - t_start
        t0 = time.monotonic()
        for name, _ in files:
            os.rename(run / "stage" / name, run / "inbox" / name)
            while sequential and not (run / "outbox" / output_name(name)).exists():
                if proc.poll() is not None:
                    raise RuntimeError("daemon exited:\n" + log_path.read_text()[-3000:])
                time.sleep(0.02)
        expected = {output_name(name) for name, _ in files}
        while not expected.issubset({p.name for p in (run / "outbox").iterdir()}):
            if proc.poll() is not None:
                raise RuntimeError("daemon exited:\n" + log_path.read_text()[-3000:])
            time.sleep(0.02)
        elapsed = time.monotonic() - t0
        daemon_pid = next((int(json.loads(line)["pid"]) for line in log_path.read_text()
                           .splitlines() if '"daemon_start"' in line), proc.pid)
        os.kill(daemon_pid, signal.SIGTERM)  # the daemon, not py-spy around it
        code = proc.wait(300)
    computed = hits = 0
    for out in (run / "outbox").glob("*.h5"):
        with h5py.File(out, "r") as f:
            computed += int(f.attrs.get("computed_sequences", 0))
            hits += int(f.attrs.get("cache_hits", 0))
    return {"devices": devices, "backend": backend, "cache": cache, "seconds": elapsed,
            "tok_s": total_tokens / elapsed, "ready_s": ready_s, "exit_code": code,
            "computed_sequences": computed, "cache_hits": hits, "log": str(log_path),
            "phases": phases(log_path)}  # where the head and the tail went


def output_name(name: str) -> str:
    return Path(name).stem + ".h5"


def nucleotide_workload(args: argparse.Namespace) -> tuple[list[tuple[str, str]], list[str], str]:
    """``--kind nucleotide``: phage-like coding contigs of 5-50 kbp in ``--files`` files,
    the proteins the daemon makes of them (in the same order, for the engine alone), and
    the daemon's config for that input kind."""
    import random

    from bench.nucleotide import coding_contig
    from vnpd.inputs.nucleotide import gene_proteins, make_gene_finder, six_frame_proteins

    rng = random.Random(args.seed)
    contigs = [coding_contig(rng, rng.randint(5000, 50000), rng.uniform(0.4, 0.6))
               for _ in range(args.contigs)]
    finder = make_gene_finder() if args.proteins == "genes" else None
    seqs = [p.sequence for i, c in enumerate(contigs)
            for p in (six_frame_proteins(f"contig{i}", c, args.chunk_length) if finder is None
                      else gene_proteins(f"contig{i}", c, finder))]
    per_file = np.array_split(np.arange(len(contigs)), args.files)
    files = [(f"part{k}.fna", "".join(f">contig{i}\n{contigs[i]}\n" for i in idx))
             for k, idx in enumerate(per_file)]
    config = (f'[input]\nkind = "nucleotide"\n[nucleotide]\nproteins = "{args.proteins}"\n'
              f"chunk_length = {args.chunk_length}\n")
    return files, seqs, config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", choices=list(WORKLOADS), default="3b-uniprot")
    ap.add_argument("--kind", choices=["protein", "nucleotide"], default="protein",
                    help="nucleotide: --contigs coding contigs, embedded as --proteins")
    ap.add_argument("--contigs", type=int, default=400)
    ap.add_argument("--proteins", choices=["six_frame", "genes"], default="six_frame")
    ap.add_argument("--chunk-length", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sequences", type=int, default=12000)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device-sets", default="cuda:0",
                    help="semicolon list of comma lists, e.g. 'cuda:0;cuda:0,cuda:1'")
    ap.add_argument("--backends", default="local",
                    help="comma list of worker backends to run each device set with, e.g. "
                         "'local,ray' (ray: a daemon-owned local Ray, one actor per device)")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--repeat-fraction", type=float, default=0.0,
                    help="share of the sequences that repeat another one (compute once)")
    ap.add_argument("--sequential", action="store_true",
                    help="drop each file once the previous one is published (a later file "
                         "can then be served from the cache)")
    ap.add_argument("--cache", choices=["on", "off", "both"], default="on",
                    help="run the daemon with the embedding cache on, off, or both")
    ap.add_argument("--head-start", choices=["on", "off", "both"], default="on",
                    help="run the daemon with [jobs] head_start \"on\", \"off\", or both (off first)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="vnpd-bench-"))
    extra_config = ""
    if args.kind == "nucleotide" and args.repeat_fraction:
        ap.error("--repeat-fraction is for protein input")
    if args.kind == "nucleotide":
        files, seqs, extra_config = nucleotide_workload(args)
    else:
        seqs = make_sequences(workload_lengths(args.workload, args.sequences))
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    if args.repeat_fraction:
        rng = np.random.default_rng(2)
        copies = rng.choice(len(seqs), int(args.repeat_fraction * len(seqs)), replace=False)
        sources = rng.choice(np.setdiff1d(np.arange(len(seqs)), copies), len(copies))
        for c, s in zip(copies.tolist(), sources.tolist()):
            seqs[c] = seqs[s]
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    total_tokens = int(tokens_for(lengths).sum())
    if args.kind == "protein":
        per_file = np.array_split(np.arange(len(seqs)), args.files)
        files = [(f"part{k}.fasta", "".join(f">s{i}\n{seqs[i]}\n" for i in idx))
                 for k, idx in enumerate(per_file)]
    checkpoint = write_checkpoint(args.workload, root)
    result: dict[str, object] = {"workload": args.workload, "kind": args.kind,
                                 "sequences": len(seqs), "distinct": len(set(seqs)),
                                 "tokens": total_tokens, "files": args.files,
                                 "gpu": device_name(), "torch": torch.__version__}
    if args.kind == "nucleotide":
        result |= {"contigs": args.contigs, "proteins": args.proteins,
                   "chunk_length": args.chunk_length,
                   "fasta_bytes": sum(len(text) for _, text in files)}
    print(json.dumps(result), flush=True)
    if not args.skip_engine:
        result["engine_tok_s"] = engine_only(checkpoint, seqs, lengths, args.dtype)
        print(f"engine only (1 GPU): {result['engine_tok_s']:,.0f} tok/s", flush=True)
    runs = []
    caches = {"on": [True], "off": [False], "both": [False, True]}[args.cache]
    heads = {"on": [True], "off": [False], "both": [False, True]}[args.head_start]
    for device_set, backend, cache, head in itertools.product(
            args.device_sets.split(";"), args.backends.split(","), caches, heads):
        r = daemon_run(root, checkpoint, files, device_set.split(","), args.dtype, total_tokens,
                       backend, cache, args.sequential,
                       extra_config + '[jobs]\nhead_start = "%s"\n' % ("on" if head else "off"))
        r["head_start"] = head
        runs.append(r)
        ratio = (f", {r['tok_s'] / result['engine_tok_s']:.3f} of engine-only"
                 if "engine_tok_s" in result else "")
        print(f"daemon {backend} {device_set} cache {'on' if cache else 'off'} head start "
              f"{'on' if head else 'off'}: "
              f"{r['seconds']:.1f} s from drop to last publish, {r['tok_s']:,.0f} tok/s{ratio}, "
              f"computed {r['computed_sequences']}, cache hits {r['cache_hits']} (workers ready "
              f"after {r['ready_s']:.0f} s, exit {r['exit_code']})", flush=True)
        print(f"  phases (s, from the first claim; sums over jobs): {r['phases']}", flush=True)
    result["daemon_runs"] = runs
    by_backend = {}
    for r in runs:
        by_backend.setdefault(r["backend"], []).append(r)
    if "ray" in by_backend and "local" in by_backend:
        result["ray_vs_local"] = [ray["tok_s"] / local["tok_s"]
                                  for ray, local in zip(by_backend["ray"], by_backend["local"])]
        print(f"ray / local tok/s: {', '.join(f'{x:.3f}' for x in result['ray_vs_local'])}",
              flush=True)
    local_runs = by_backend.get("local", runs)
    if len(args.device_sets.split(";")) > 1:
        result["scaling"] = local_runs[-1]["tok_s"] / local_runs[0]["tok_s"]
        print(f"scaling {local_runs[-1]['devices']} vs {local_runs[0]['devices']}: "
              f"{result['scaling']:.3f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
