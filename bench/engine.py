"""Engine benchmark: vanilla fair-esm vs the vnpd packed engine, same data, one run.

Vanilla is fair-esm extract.py-style: sequences sorted by length, 4096-token padded
batches (fair-esm's own ``get_batch_indices``), ``repr_layers=[last]``, mean of the residue
slice. It runs in fp32 and fp16; its fp32 rows are also the fidelity reference for the
engine's bf16 and fp16 rows (cosine per sequence).

Workloads (random weights; speed does not depend on the values):
  3b-uniprot  esm2_t36_3B architecture, lognormal lengths (median 300, 20..1022)
  650m-orf    esm2_t33_650M architecture, six-frame ORF lengths (uniform 30..166)

Usage (on the GPU machine):
    python bench/engine.py --workload 3b-uniprot --sequences 2000 --json $OUT/3b.json
Prints a table: tokens/s, ratio to vanilla fp32, fraction of the FLOP limit, min cosine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vnpd.compute.engine import Engine  # noqa: E402
from vnpd.compute.packing import build_batch, pack_batches  # noqa: E402
from vnpd.compute.tokenizer import tokens_for  # noqa: E402

WORKLOADS = {
    "3b-uniprot": dict(layers=36, dim=2560, heads=40),
    "3b-orf": dict(layers=36, dim=2560, heads=40),   # VirNucPro's workload: six-frame ORFs
    "650m-orf": dict(layers=33, dim=1280, heads=20),
    "tiny-orf": dict(layers=2, dim=64, heads=4),     # a CPU smoke test of the scripts
}
DEVICE = os.environ.get("VNPD_BENCH_DEVICE", "cuda:0")
"""Where the benches run their engines: ``cpu`` (with tiny-orf) checks a script here."""


def sync() -> None:
    """Wait for the device's queued work, so that a clock read after it is honest."""
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def free_device_memory() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.empty_cache()


def device_name() -> str:
    return torch.cuda.get_device_name(0) if DEVICE.startswith("cuda") else DEVICE
RESIDUES = np.array(list("ACDEFGHIKLMNPQRSTVWY"))


def workload_lengths(name: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if name == "3b-uniprot":
        return np.clip(np.round(rng.lognormal(np.log(300), 0.6, n)), 20, 1022).astype(np.int64)
    return rng.integers(30, 167, n).astype(np.int64)


def make_sequences(lengths: np.ndarray, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(RESIDUES, int(n))) for n in lengths]


def flops_per_token(layers: int, dim: int, lengths: np.ndarray) -> float:
    """Matmul FLOPs per token: 24·L·D² for the projections and FFN, plus attention 4·L·D·len."""
    toks = tokens_for(lengths)
    attn = 4 * layers * dim * float((toks.astype(np.float64) ** 2).sum() / toks.sum())
    return 24 * layers * dim * dim + attn


@dataclass
class Row:
    name: str
    tokens: int
    seconds: float
    tok_s: float
    ratio_vs_fp32: float = 0.0
    flop_fraction: float = 0.0
    min_cosine: float | None = None
    mean_cosine: float | None = None


def time_it(fn, *, warm: bool = True) -> tuple[float, object]:
    if warm:
        fn(limit=2)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def run_vanilla(model, alphabet, seqs: list[str]):
    """extract.py's loop over ``model`` in whatever dtype it has."""
    from esm.data import FastaBatchedDataset

    dataset = FastaBatchedDataset([str(i) for i in range(len(seqs))], seqs)
    batches = dataset.get_batch_indices(4096, extra_toks_per_seq=1)
    converter = alphabet.get_batch_converter(1022)
    last = model.num_layers

    def go(limit: int | None = None) -> np.ndarray:
        out = np.zeros((len(seqs), model.embed_dim), dtype=np.float32)
        for idx in batches[:limit]:
            _, strs, toks = converter([(str(i), seqs[i]) for i in idx])
            with torch.no_grad():
                reps = model(toks.cuda(non_blocking=True), repr_layers=[last])["representations"][last]
            for j, i in enumerate(idx):
                n = min(len(strs[j]), 1022)
                out[i] = reps[j, 1:n + 1].float().mean(0).cpu().numpy()
        return out

    return go


def run_engine(engine: Engine, seqs: list[str], lengths: np.ndarray, in_flight: int = 2):
    plan = pack_batches(lengths, engine.max_tokens)
    batches = [build_batch(p, [seqs[i] for i in p]) for p in plan]  # host work done up front

    def go(limit: int | None = None) -> np.ndarray:
        out = np.zeros((len(seqs), engine.embed_dim), dtype=np.float32)
        pending = []
        for b in batches[:limit]:
            pending.append(engine.submit(b))
            if len(pending) > in_flight:
                p = pending.pop(0)
                out[p.positions] = p.result()
        for p in pending:
            out[p.positions] = p.result()
        return out

    return go


def profile(go) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        go(limit=3)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70),
          flush=True)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row (the last axis) of ``a`` with the same row of ``b``."""
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def matmul_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", choices=list(WORKLOADS), required=True)
    ap.add_argument("--sequences", type=int, default=2000)
    ap.add_argument("--runs", default="bfloat16:fused:0,float16:fused:0",
                    help="engine runs, comma list of dtype:variant:budget[:attention]; variant "
                         "is a [model] compile_mode (fused, fused-torch-gemm, ops, layer, layer-autotune), compiled "
                         "(= ops) or eager (no compilation); budget 0 = sized from free memory; "
                         "attention forces a backend (cudnn, torch_varlen, flash_attn), "
                         "else the engine's own choice")
    ap.add_argument("--skip-vanilla-fp16", action="store_true")
    ap.add_argument("--skip-vanilla", action="store_true",
                    help="engine runs only: no vanilla rows, no cosine (quick experiments)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="after the runs, profile the last engine over 3 batches and print "
                         "the kernels that take the most device time")
    args = ap.parse_args()

    from esm.data import Alphabet
    from esm.model.esm2 import ESM2

    arch = WORKLOADS[args.workload]
    lengths = workload_lengths(args.workload, args.sequences)
    seqs = make_sequences(lengths)
    total_tokens = int(tokens_for(lengths).sum())
    fpt = flops_per_token(arch["layers"], arch["dim"], lengths)
    peak = matmul_peak()
    print(f"workload {args.workload}: {len(seqs)} sequences, {total_tokens} tokens, "
          f"{fpt / 1e9:.2f} GFLOP/token, measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s, "
          f"FLOP limit {peak / fpt:,.0f} tok/s", flush=True)

    torch.manual_seed(0)
    alphabet = Alphabet.from_architecture("ESM-1b")
    with torch.device("cuda"):
        model = ESM2(num_layers=arch["layers"], embed_dim=arch["dim"],
                     attention_heads=arch["heads"], alphabet=alphabet).eval()
    rows: list[Row] = []
    reference = None
    if not args.skip_vanilla:
        seconds, reference = time_it(run_vanilla(model, alphabet, seqs))
        rows.append(Row("vanilla fair-esm fp32", total_tokens, seconds, total_tokens / seconds))
        print(rows[-1], flush=True)
    if not (args.skip_vanilla or args.skip_vanilla_fp16):
        half = copy.deepcopy(model).half()
        seconds, out16 = time_it(run_vanilla(half, alphabet, seqs))
        del half
        cos = cosine(out16, reference)
        rows.append(Row("vanilla fair-esm fp16", total_tokens, seconds, total_tokens / seconds,
                        min_cosine=float(cos.min()), mean_cosine=float(cos.mean())))
        print(rows[-1], flush=True)

    for spec in args.runs.split(","):
        dtype, variant, budget, *forced = spec.split(":")
        # variant: eager (compile_mode "off") | compiled (= compile_mode "ops") | fused |
        # fused-torch-gemm | layer | layer-autotune
        compile_mode = {"eager": "off", "compiled": "ops"}.get(variant, variant)
        try:
            # A fresh copy of the fp32 weights: the reference stays untouched.
            engine = Engine(copy.deepcopy(model), model_name=args.workload,
                            device=torch.device("cuda"), dtype=getattr(torch, dtype), layer=-1,
                            max_tokens=int(budget), compile_mode=compile_mode,
                            attention=forced[0] if forced else None)
            t0 = time.perf_counter()
            engine.warmup()
            go = run_engine(engine, seqs, lengths)
            go(limit=3)  # compile for the shapes of real batches
            warm_s = time.perf_counter() - t0
            seconds, out = time_it(go, warm=False)
        except Exception as exc:  # one broken variant must not cost the rest of the run
            print(f"run {spec} failed: {exc!r}", flush=True)
            torch.cuda.empty_cache()
            continue
        cos = cosine(out, reference) if reference is not None else None
        rows.append(Row(f"vnpd {dtype} {variant} {engine.attention_backend} "
                        f"gemm={engine.packed.gemm} budget={engine.max_tokens}",
                        total_tokens, seconds, total_tokens / seconds,
                        min_cosine=float(cos.min()) if cos is not None else None,
                        mean_cosine=float(cos.mean()) if cos is not None else None))
        print(rows[-1], f"(warm-up {warm_s:.1f}s)", flush=True)
        if args.profile and spec == args.runs.split(",")[-1]:
            profile(go)
        del engine, go
        torch.cuda.empty_cache()

    base = rows[0].tok_s if reference is not None else float("nan")
    for r in rows:
        r.ratio_vs_fp32 = r.tok_s / base
        r.flop_fraction = r.tok_s * fpt / peak
    print(f"\n{'run':<56} {'tok/s':>10} {'x fp32':>7} {'FLOP%':>6} {'min cos':>9}")
    for r in rows:
        cos = f"{r.min_cosine:.6f}" if r.min_cosine is not None else "ref"
        print(f"{r.name:<56} {r.tok_s:>10,.0f} {r.ratio_vs_fp32:>7.2f} "
              f"{100 * r.flop_fraction:>5.1f}% {cos:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": args.workload, "sequences": len(seqs),
                       "tokens": total_tokens, "gflop_per_token": fpt / 1e9,
                       "matmul_peak_tflops": peak / 1e12, "gpu": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "rows": [asdict(r) for r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
