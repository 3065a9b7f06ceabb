"""Benchmark of issue 16's outputs: several layers, per-residue rows, window mode.

Cases (random weights; speed does not depend on the values), each in one run:
  layers    the engine with one layer vs several in the same pass (target: < 3% slower);
            also the bf16 per-residue rows against an fp32 engine (min cosine per residue).
  residues  per-residue rows (float16) off vs on: engine alone, then the daemon, drop to
            last publish (target: daemon >= 0.9 of the engine, per-residue on).
  window    `vnpd embed` (in-process embed_file) on a workload with 10% of the sequences
            over 1022 residues: truncate vs window mode.

Usage (on the GPU machine):
    python bench/outputs.py --case layers --workload 3b-uniprot --json $OUT/layers.json
    python bench/outputs.py --case residues --workload 3b-uniprot --sequences 6000 \
        --json $OUT/residues.json
    python bench/outputs.py --case window --workload 3b-uniprot --json $OUT/window.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.daemon import daemon_run, write_checkpoint  # noqa: E402
from bench.engine import (DEVICE, WORKLOADS, cosine, device_name,  # noqa: E402
                          free_device_memory, make_sequences, sync, workload_lengths)
from vnpd.compute.engine import Engine  # noqa: E402
from vnpd.compute.packing import build_batch, pack_batches, tokens_for  # noqa: E402


def engine_rate(engine: Engine, seqs: list[str], lengths: np.ndarray,
                residues: str | None = None, in_flight: int = 2) -> float:
    """Tokens/s of the engine on ``seqs``, consuming results (and residue rows) as a
    worker does: the oldest batch is read once more than ``in_flight`` are launched."""
    plan = pack_batches(lengths, engine.max_tokens, engine.truncation)
    batches = [build_batch(p, [seqs[i] for i in p], engine.truncation) for p in plan]

    def go(limit: int | None = None) -> None:
        pending = []
        for b in batches[:limit]:
            pending.append(engine.submit(b, residues=residues))
            if len(pending) > in_flight:
                p = pending.pop(0)
                p.result()
                p.residues()
        for p in pending:
            p.result()
            p.residues()

    go(limit=3)
    sync()
    t0 = time.perf_counter()
    go()
    sync()
    return float(tokens_for(lengths, engine.truncation).sum()) / (time.perf_counter() - t0)


def case_layers(ckpt: Path, args: argparse.Namespace, seqs: list[str], lengths: np.ndarray
                ) -> dict:
    layers = WORKLOADS[args.workload]["layers"]
    sets = {"one": (-1,), "four": (-1, layers // 2, 2 * layers // 3, layers - 3)}
    out: dict = {}
    engine = Engine.load(str(ckpt), device=DEVICE, dtype="bfloat16")
    engine.warmup()
    for name, chosen in list(sets.items()) * 2:  # twice, interleaved: the second counts
        engine.layers = _resolve(chosen, layers)
        out[name] = engine_rate(engine, seqs, lengths)
    out["cost_of_several"] = 1 - out["four"] / out["one"]
    # bf16 per-residue rows against fp32, on a few sequences.
    engine.layers = _resolve(sets["four"], layers)
    few = np.arange(min(200, len(seqs)))
    batch = build_batch(few, [seqs[i] for i in few], engine.truncation)
    got = engine.submit(batch, residues="float32").residues()
    del engine
    free_device_memory()
    ref_engine = Engine.load(str(ckpt), device=DEVICE, dtype="float32",
                             layers=sets["four"])
    want = ref_engine.submit(batch, residues="float32").residues()
    cos = cosine(got, want)
    out["residue_min_cosine_bf16_vs_fp32"] = float(cos.min())
    return out


def _resolve(chosen: tuple[int, ...], layers: int) -> tuple[int, ...]:
    from vnpd.compute.families.esm2 import resolve_layers

    return resolve_layers(chosen, layers)


def case_residues(ckpt: Path, args: argparse.Namespace, seqs: list[str], lengths: np.ndarray,
                  root: Path) -> dict:
    out: dict = {}
    engine = Engine.load(str(ckpt), device=DEVICE, dtype="bfloat16")
    engine.warmup()
    for residues in (None, "float16", None, "float16"):
        out[f"engine_{residues or 'off'}"] = engine_rate(engine, seqs, lengths, residues)
    del engine
    free_device_memory()
    per_file = -(-len(seqs) // args.files)
    files = [(f"f{i}.fasta", "".join(f">s{i}_{j}\n{seqs[j]}\n"
                                    for j in range(i * per_file,
                                                   min(len(seqs), (i + 1) * per_file))))
             for i in range(args.files)]
    total = int(tokens_for(lengths).sum())
    os.environ["VNPD_MODEL_OUTPUT_DTYPE"] = "float16"
    for per_residue in ("false", "true"):
        os.environ["VNPD_OUTPUT_PER_RESIDUE"] = per_residue
        run = daemon_run(root / f"residues-{per_residue}", ckpt, files, [DEVICE],
                         "bfloat16", total)
        out[f"daemon_{'float16' if per_residue == 'true' else 'off'}"] = run["tok_s"]
    out["daemon_over_engine_per_residue"] = out["daemon_float16"] / out["engine_float16"]
    out["daemon_over_engine_off"] = out["daemon_off"] / out["engine_off"]
    return out


def case_window(ckpt: Path, args: argparse.Namespace, root: Path) -> dict:
    """10% of the sequences over 1022 residues: `vnpd embed` truncate vs window (twice,
    interleaved), the daemon in window mode (drop to last publish), and the bf16
    per-residue rows of long sequences in window mode against an fp32 engine's."""
    import h5py

    from vnpd.embed import EmbedOptions, embed_file

    rng = np.random.default_rng(3)
    lengths = workload_lengths(args.workload, args.sequences)
    long = rng.random(len(lengths)) < 0.10
    lengths[long] = rng.integers(1023, 3001, int(long.sum()))
    seqs = make_sequences(lengths)
    src = root / "window.fasta"
    src.write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(seqs)))
    engine = Engine.load(str(ckpt), device=DEVICE, dtype="bfloat16")
    engine.warmup()
    out: dict = {"long_fraction": float(long.mean()), "residues": int(lengths.sum())}
    for mode in ("truncate", "window", "truncate", "window"):
        t0 = time.perf_counter()
        embed_file(src, root / f"{mode}.h5", engine, options=EmbedOptions(long_sequences=mode))
        seconds = time.perf_counter() - t0
        out[f"{mode}_seconds"] = seconds
        out[f"{mode}_residues_per_s"] = float(lengths.sum()) / seconds
    # Fidelity: a few long sequences, every residue's rows, bf16 against fp32.
    few = root / "window-few.fasta"
    picked = np.flatnonzero(long)[:12]
    few.write_text("".join(f">s{i}\n{seqs[i]}\n" for i in picked))
    rows = {}
    for dtype in ("bfloat16", "float32"):
        if dtype == "float32":
            del engine
            free_device_memory()
            engine = Engine.load(str(ckpt), device=DEVICE, dtype="float32")
        path = root / f"window-few-{dtype}.h5"
        embed_file(few, path, engine, options=EmbedOptions(per_residue=True,
                                                            long_sequences="window"))
        with h5py.File(path, "r") as f:
            rows[dtype] = f["residues"][:].astype(np.float64)
    got, want = rows["bfloat16"], rows["float32"]
    cos = cosine(got, want)
    out["window_residue_min_cosine_bf16_vs_fp32"] = float(cos.min())
    out["window_fidelity_residues"] = int(cos.size)
    del engine
    free_device_memory()
    # The daemon in window mode on the same file (four parts), drop to last publish.
    parts = np.array_split(np.arange(len(seqs)), args.files)
    files = [(f"w{k}.fasta", "".join(f">s{i}\n{seqs[i]}\n" for i in idx))
             for k, idx in enumerate(parts)]
    os.environ["VNPD_MODEL_LONG_SEQUENCES"] = "window"
    run = daemon_run(root / "window-daemon", ckpt, files, [DEVICE], "bfloat16",
                     int(lengths.sum()))
    del os.environ["VNPD_MODEL_LONG_SEQUENCES"]
    out["daemon_window_seconds"] = run["seconds"]
    out["daemon_window_residues_per_s"] = float(lengths.sum()) / run["seconds"]
    out["daemon_over_embed_window"] = out["window_seconds"] / run["seconds"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=["layers", "residues", "window"], required=True)
    ap.add_argument("--workload", choices=list(WORKLOADS), default="3b-uniprot")
    ap.add_argument("--sequences", type=int, default=4000)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="vnpd-outputs-"))
    root.mkdir(parents=True, exist_ok=True)
    ckpt = write_checkpoint(args.workload, root)
    lengths = workload_lengths(args.workload, args.sequences)
    seqs = make_sequences(lengths)
    if args.case == "layers":
        result = case_layers(ckpt, args, seqs, lengths)
    elif args.case == "residues":
        result = case_residues(ckpt, args, seqs, lengths, root)
    else:
        result = case_window(ckpt, args, root)
    result.update(case=args.case, workload=args.workload, sequences=args.sequences,
                  gpu=device_name())
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
