"""One-off experiment, 2026-11-23 (H100): cuBLASLt epilogues for the 3B projections.

1. Is cuBLASLt's GELU epilogue the exact erf GELU (fair-esm's, which vnpd must match, is erf) or tanh's?
2. The residual add: torch's F.linear + our add+LN kernel, against cuBLASLt with the
   residual read in the epilogue + the norm-only kernel (vnpd/compute/cublaslt.py), per shape.

An earlier version of this script (results in
bench/results/2026-11-23-h100-gemm-candidates.json, GPU clocks and power in
...-gemm-candidates-smi.csv) timed all 8 algorithms of cuBLASLt's heuristic list per
shape: the first (torch's) was the fastest or within the 5% call-to-call noise, and the
GPU ran at its 700 W power cap at 1.23-1.40 GHz during the GEMMs.

Findings (bench/results/2026-11-23-h100-gemm-epilogue-lt.json): cuBLASLt's GELU epilogue
is the tanh approximation (5.6e-6 from tanh GELU, 4.7e-4 from erf), so it cannot be used.
The residual read in the epilogue costs no GEMM time, and with the norm-only kernel the
out-projection step took 2.87-3.18 ms against 3.11-3.31 ms, fc2 9.89-11.6 against
10.2-11.2 (noisy: the GPU runs at its power cap). End to end it gave +0.5 to +2.3%
(bench/results/2026-11-23-h100-3b-cublaslt-ab*.log), and became the fused path's default.

    PYTHONPATH=. python bench/experiments/gemm_algos.py --json $OUT/gemm_epilogues_lt.json
"""
import json
import os
import sys

sys.path.insert(0, os.getcwd())
import torch
import torch.nn.functional as F

from bench.experiments.common import experiment_args, rounded, save
from bench.profile_engine import time_cuda
from vnpd.compute import kernels
from vnpd.compute.cublaslt import EPILOGUE_GELU_BIAS, CublasLt

SHAPES = {"out": (2560, 2560), "fc2": (10240, 2560)}


def main() -> None:
    args, res = experiment_args()
    dev = torch.device("cuda")
    lt = CublasLt(dev)
    m = args.tokens

    x = torch.randn(4096, 2560, device=dev, dtype=torch.float32)
    w = torch.randn(1024, 2560, device=dev, dtype=torch.float32) * 0.03
    b = torch.randn(1024, device=dev, dtype=torch.float32)
    pre = F.linear(x, w, b)
    try:
        got = lt.linear(x, w, b, epilogue=EPILOGUE_GELU_BIAS)
        res["gelu_epilogue_vs_erf"] = float((got - F.gelu(pre)).abs().max())
        res["gelu_epilogue_vs_tanh"] = float((got - F.gelu(pre, approximate="tanh")).abs().max())
    except RuntimeError as exc:
        res["gelu_epilogue_error"] = str(exc)
    res["erf_vs_tanh"] = float((F.gelu(pre) - F.gelu(pre, approximate="tanh")).abs().max())
    print(json.dumps(res), flush=True)

    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        b = torch.randn(n, device=dev, dtype=torch.bfloat16) * 0.02
        g, ln_b = torch.ones(n, device=dev, dtype=torch.bfloat16), b.clone()
        y = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        x = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
        delta = torch.randn(m, n, device=dev, dtype=torch.bfloat16)

        def torch_path():
            return kernels.add_layer_norm(x, F.linear(y, w, b), g, ln_b, 1e-5)

        def lt_path():
            r = lt.linear(y, w, b, residual=x)  # x grows each call; timing only
            return r, kernels.layer_norm(r, g, ln_b, 1e-5)

        row = {}
        for _ in range(3):  # alternate: clocks drift under the power cap
            row.setdefault("torch_linear_add_ln_ms", []).append(time_cuda(torch_path) * 1e3)
            row.setdefault("lt_residual_ln_ms", []).append(time_cuda(lt_path) * 1e3)
        row["gemm_alone_ms"] = time_cuda(lambda: F.linear(y, w, b)) * 1e3
        row["add_ln_alone_ms"] = time_cuda(
            lambda: kernels.add_layer_norm(x, delta, g, ln_b, 1e-5)) * 1e3
        row["ln_alone_ms"] = time_cuda(lambda: kernels.layer_norm(x, g, ln_b, 1e-5)) * 1e3
        res[name] = row
        print(name, rounded(row), flush=True)
    save(args, res)


if __name__ == "__main__":
    main()
