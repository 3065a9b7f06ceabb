"""One-off experiment, 2026-11-23 (H100): at which sequence length does cuDNN's fused
varlen attention overtake torch's FA2 varlen kernel?

On the 650M six-frame ORF workload (32-168 tokens) the engine was 3% faster with FA2, on
the 3B UniProt-like one (up to 1024 tokens) 2% faster with cuDNN. This times both on packs
of 131,072 tokens of equal-length sequences, for the 3B (40 heads) and 650M (20 heads)
shapes, head_dim 64.

Findings (bench/results/2026-11-23-h100-attention-crossover.json): with 40 heads (3B)
cuDNN was as fast or faster at every length but 96 (1.03-1.27x); with 20 heads (650M)
FA2 was faster below 320 tokens (cuDNN 0.70-0.98x), cuDNN above. A per-batch choice
(cuDNN from 256 tokens, FA2 below) was then built and run alternately against each backend
alone: the engines were within noise of each other on both workloads (650M 365-370k,
3B 99.9-100.4k tok/s; ...-attention-crossover-engines.log), so it was not kept.

    PYTHONPATH=. python bench/experiments/attention_crossover.py --json $OUT/crossover.json
"""
import os
import sys

sys.path.insert(0, os.getcwd())
import torch

from bench.experiments.common import experiment_args, rounded, save
from bench.profile_engine import time_cuda
from vnpd.compute.attention import select_attention


def main() -> None:
    args, res = experiment_args(rows=[])
    dev = torch.device("cuda")
    backends = {name: select_attention(dev, torch.bfloat16, prefer=name)
                for name in ("cudnn", "torch_varlen")}
    for heads in (40, 20):
        for length in (32, 64, 96, 128, 170, 192, 256, 320, 384, 512, 1024):
            n = args.tokens // length
            cu = torch.arange(0, (n + 1) * length, length, dtype=torch.int32, device=dev)
            q, k, v = (torch.randn(n * length, heads, 64, device=dev, dtype=torch.bfloat16)
                       for _ in range(3))
            row = {"heads": heads, "length": length, "sequences": n}
            for name, backend in backends.items():
                row[f"{name}_ms"] = time_cuda(
                    lambda: backend.attend(q, k, v, cu, length), repeats=20) * 1e3
            row["cudnn_speedup"] = row["torch_varlen_ms"] / row["cudnn_ms"]
            res["rows"].append(row)
            print(rounded(row), flush=True)
    save(args, res)


if __name__ == "__main__":
    main()
