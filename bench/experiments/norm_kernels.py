"""One-off experiment, 2026-11-23 (H100): launch settings of the norm-only and GELU kernels.

With the residual add in cuBLASLt's epilogue, the layer norm runs alone. One row per
program, as the add+norm kernel did, moved only ~1.9 TB/s there (0.69 ms for a
131k x 2560 bf16 tensor, read once and written once), against ~2.8 TB/s for add+norm.
This times rows per program x warps for the norm, and block x warps for the GELU, on the
3B and 650M shapes, and checks each setting against the default.

Findings (bench/results/2026-11-23-h100-norm-kernels.json): the norm at D = 2560 went
from 0.61 ms (1 row, 16 warps) to 0.48 ms with 2 rows and 4 warps (2.8 TB/s); at D = 1280
1 row and 2 warps was fastest (0.27 against 0.31 ms). GELU: 2048-element blocks with 4
warps, 1.89 against 1.94 ms on the 3B width. Both became the defaults (vnpd/compute/kernels.py).

    PYTHONPATH=. python bench/experiments/norm_kernels.py --json $OUT/norm_kernels.json
"""
import os
import sys

sys.path.insert(0, os.getcwd())
import torch

from bench.experiments.common import experiment_args, save
from bench.profile_engine import time_cuda
from vnpd.compute import kernels


def main() -> None:
    args, res = experiment_args(norm={}, gelu={})
    m = args.tokens
    for dim in (2560, 1280):
        x = torch.randn(m, dim, device="cuda", dtype=torch.bfloat16) + 3
        w = torch.rand(dim, device="cuda", dtype=torch.bfloat16) + 0.5
        b = torch.randn(dim, device="cuda", dtype=torch.bfloat16)
        want = kernels.layer_norm(x, w, b, 1e-5)
        gbytes = 2 * x.numel() * x.element_size() / 1e9
        for rows in (1, 2, 4, 8):
            for warps in (2, 4, 8, 16):
                got = kernels.layer_norm(x, w, b, 1e-5, rows=rows, num_warps=warps)
                same = bool(torch.equal(got, want))
                t = time_cuda(lambda: kernels.layer_norm(x, w, b, 1e-5, rows=rows,
                                                         num_warps=warps), repeats=20)
                res["norm"][f"d{dim}_r{rows}_w{warps}"] = {"ms": t * 1e3, "tb_s": gbytes / t / 1e3,
                                                          "same": same}
        best = min((k for k in res["norm"] if k.startswith(f"d{dim}_")),
                   key=lambda k: res["norm"][k]["ms"])
        print(f"norm d={dim}: default {res['norm'][f'd{dim}_r1_w16' if dim == 2560 else f'd{dim}_r1_w8']}"
              f" best {best} {res['norm'][best]}", flush=True)
    for width in (10240, 5120):
        x = torch.randn(m, width, device="cuda", dtype=torch.bfloat16)
        want = kernels.gelu(x)
        gbytes = 2 * x.numel() * x.element_size() / 1e9
        for block in (1024, 2048, 4096, 8192, 16384):
            for warps in (4, 8, 16):
                same = bool(torch.equal(kernels.gelu(x, block, warps), want))
                t = time_cuda(lambda: kernels.gelu(x, block, warps), repeats=20)
                res["gelu"][f"w{width}_b{block}_nw{warps}"] = {"ms": t * 1e3,
                                                               "tb_s": gbytes / t / 1e3,
                                                               "same": same}
        best = min((k for k in res["gelu"] if k.startswith(f"w{width}_")),
                   key=lambda k: res["gelu"][k]["ms"])
        print(f"gelu width={width}: default {res['gelu'][f'w{width}_b4096_nw8']} best {best} "
              f"{res['gelu'][best]}", flush=True)
    copy_src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    t = time_cuda(lambda: copy_dst.copy_(copy_src), repeats=20)
    res["copy_tb_s"] = 2 * (1 << 30) / t / 1e12
    print(f"copy {res['copy_tb_s']:.2f} TB/s", flush=True)
    save(args, res)


if __name__ == "__main__":
    main()
