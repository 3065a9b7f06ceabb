"""Where the engine's device time goes, on the GPU machine.

Three measurements on the benchmark workloads (random weights, real shapes):
1. ceilings: each of the layer's four GEMMs alone at the batch's token count (cuBLAS
   through ``F.linear`` with bias), varlen attention alone on a real pack, and a large
   device copy (memory bandwidth);
2. the packed forward per compile mode: median seconds per batch over real batches;
3. a kernel profile of one batch per mode, grouped into GEMM / attention / other,
   with the top kernels.

Usage (on the GPU machine):
    python bench/profile_engine.py --workload 3b-uniprot --modes ops,layer
    python bench/profile_engine.py --workload 650m-orf --modes layer \
        --inductor max_autotune_gemm=1
``--inductor key=value`` sets ``torch._inductor.config`` for the modes named after it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.engine import WORKLOADS, make_sequences, workload_lengths  # noqa: E402
from vnpd.compute.attention import select_attention  # noqa: E402
from vnpd.compute.families.esm2 import PackedESM2  # noqa: E402
from vnpd.compute.packing import build_batch, pack_batches  # noqa: E402

GEMM_MARKERS = ("gemm", "xmma", "cutlass", "nvjet", "sm90", "cublas", "triton_tem")
ATTN_MARKERS = ("flash", "fmha", "attention")


def time_cuda(fn, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def ceilings(dim: int, tokens: int, batch: tuple[torch.Tensor, torch.Tensor, int],
             heads: int, attention: str | None = None) -> dict[str, float]:
    """TFLOP/s of each GEMM alone, attention alone, and copy bandwidth (GB/s)."""
    out: dict[str, float] = {}
    x = torch.randn(tokens, 4 * dim, device="cuda", dtype=torch.bfloat16)
    for name, k, n in (("qkv", dim, 3 * dim), ("out_proj", dim, dim), ("fc1", dim, 4 * dim),
                       ("fc2", 4 * dim, dim)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        a = x[:, :k].contiguous()
        s = time_cuda(lambda: F.linear(a, w, b))
        out[f"gemm_{name}_tflops"] = 2 * tokens * k * n / s / 1e12
        out[f"gemm_{name}_ms"] = s * 1e3
        h = F.linear(a, w, b)
        s = time_cuda(lambda: F.gelu(h))
        out[f"gelu_{name}_ms"] = s * 1e3
    tok, cu, max_len = batch
    hd = dim // heads
    q, k, v = (torch.randn(tok.shape[0], heads, hd, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    backend = select_attention(torch.device("cuda"), torch.bfloat16, prefer=attention)
    s = time_cuda(lambda: backend.attend(q, k, v, cu, max_len))
    lens = (cu[1:] - cu[:-1]).double()
    flops = 4 * float((lens ** 2).sum()) * dim
    out["attention_ms"] = s * 1e3
    out["attention_tflops"] = flops / s / 1e12
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(big)
    s = time_cuda(lambda: dst.copy_(big))
    out["copy_gbs"] = 2 * big.numel() / s / 1e9
    return out


def kernel_profile(fn) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Device ms per group (gemm/attention/other) and the top kernels of one call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    groups: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = evt.device_time / 1000 if hasattr(evt, "device_time") else evt.cuda_time / 1000
        name = evt.name
        low = name.lower()
        group = ("gemm" if any(m in low for m in GEMM_MARKERS) else
                 "attention" if any(m in low for m in ATTN_MARKERS) else "other")
        groups[group] += ms
        kernels[name[:90]] += ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:18]
    return dict(groups), top


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", choices=list(WORKLOADS), required=True)
    ap.add_argument("--sequences", type=int, default=3000)
    ap.add_argument("--budget", type=int, default=131072)
    ap.add_argument("--modes", default="ops,layer",
                    help="comma list of eager | ops | layer | layer-autotune; a mode may "
                         "carry inductor settings as mode+key=value+key=value")
    ap.add_argument("--no-ceilings", action="store_true")
    ap.add_argument("--attention", default=None,
                    help="force an attention backend (cudnn, torch_varlen, flash_attn)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from esm.data import Alphabet
    from esm.model.esm2 import ESM2

    arch = WORKLOADS[args.workload]
    lengths = workload_lengths(args.workload, args.sequences)
    seqs = make_sequences(lengths)
    plan = pack_batches(lengths, args.budget)
    batches = []
    for p in plan[:4]:
        b = build_batch(p, [seqs[i] for i in p])
        batches.append((torch.from_numpy(b.tokens).cuda(), torch.from_numpy(b.cu_seqlens).cuda(),
                        b.max_len))
    tokens = int(batches[0][0].shape[0])
    report: dict[str, object] = {"workload": args.workload, "tokens_per_batch": tokens,
                                 "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(f"{args.workload}: batches of {tokens} tokens; {torch.cuda.get_device_name()}",
          flush=True)
    if not args.no_ceilings:
        c = ceilings(arch["dim"], tokens, batches[0], arch["heads"], args.attention)
        report["ceilings"] = c
        print(json.dumps(c, indent=1), flush=True)
        gemm_ms = sum(c[f"gemm_{n}_ms"] for n in ("qkv", "out_proj", "fc1", "fc2"))
        floor = arch["layers"] * (gemm_ms + c["attention_ms"]) / 1e3
        print(f"GEMM+attention floor per batch: {floor:.3f}s = {tokens / floor:,.0f} tok/s",
              flush=True)

    torch.manual_seed(0)
    alphabet = Alphabet.from_architecture("ESM-1b")
    with torch.device("cuda"):
        model = ESM2(num_layers=arch["layers"], embed_dim=arch["dim"],
                     attention_heads=arch["heads"], alphabet=alphabet).eval()
    model = model.to(torch.bfloat16)
    backend = select_attention(torch.device("cuda"), torch.bfloat16, prefer=args.attention)
    report["attention"] = backend.name
    results = {}
    for spec in args.modes.split(","):
        mode, *settings = spec.split("+")
        torch._dynamo.reset()
        import torch._inductor.config as inductor_config

        saved = {}
        for item in settings:
            key, value = item.split("=")
            saved[key] = getattr(inductor_config, key)
            setattr(inductor_config, key, type(saved[key])(int(value)) if value.isdigit()
                    else value)
        packed = PackedESM2(model, backend, compile_mode="off" if mode == "eager" else mode)
        layer = model.num_layers
        t0 = time.perf_counter()
        for tok, cu, ml in batches[:2]:
            packed.embed(tok, cu, ml, layer)
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        per_batch = []
        for tok, cu, ml in batches:
            per_batch.append(time_cuda(lambda: packed.embed(tok, cu, ml, layer), repeats=3,
                                       warmup=1) / tok.shape[0])
        sec_per_token = statistics.median(per_batch)
        groups, top = kernel_profile(lambda: packed.embed(*batches[0][:3], layer))
        total = sum(groups.values())
        results[spec] = {"tok_s": 1 / sec_per_token, "warmup_s": warm, "groups_ms": groups}
        print(f"\n== {spec}: {1 / sec_per_token:,.0f} tok/s (warm-up {warm:.0f}s); "
              f"profile of one batch: " + ", ".join(
                  f"{g} {ms:.0f} ms ({100 * ms / total:.0f}%)" for g, ms in groups.items()),
              flush=True)
        for name, ms in top:
            print(f"  {ms:9.2f} ms  {name}", flush=True)
        for key, value in saved.items():
            setattr(inductor_config, key, value)
        del packed
    report["modes"] = results
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
