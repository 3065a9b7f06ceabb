"""One-off experiment, 2026-11-23 (H100), kept as it was run: the device time of cuDNN's
fused varlen attention (torch's op under the profiler, and nvidia-cudnn-frontend's
``sdpa`` with padded, bucketed plans) against torch's FA2 varlen kernel on real packs.

Findings (bench/results/2026-11-23-h100-attention-kernels.json): on 3B packs cuDNN's
kernel took 3.46 and 3.00 ms against 4.83 and 4.30 ms for FA2; padding the sequence count
to 256 and the longest sequence to 1024 cost nothing measurable there; a new plan took
50-90 ms to build (1.4 s for the first). Needs the frontend wheel on PYTHONPATH.

    PYTHONPATH=. python bench/experiments/attention_kernels.py
"""
import os, sys, json, time
sys.path.insert(0, os.getcwd())
import torch
from torch.profiler import profile, ProfilerActivity
from bench.engine import workload_lengths, make_sequences
from bench.profile_engine import time_cuda
from vnpd.compute.packing import pack_batches, build_batch
from vnpd.compute.attention import select_attention

res = {}
fa2 = select_attention(torch.device("cuda"), torch.bfloat16, prefer="torch_varlen")
def packs(workload, n, budget, count):
    lengths = workload_lengths(workload, n); seqs = make_sequences(lengths)
    out = []
    for p in pack_batches(lengths, budget)[:count]:
        b = build_batch(p, [seqs[i] for i in p])
        out.append((torch.from_numpy(b.tokens).cuda(), torch.from_numpy(b.cu_seqlens).cuda(), b.max_len))
    return out

def kernel_ms(fn):
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(); torch.cuda.synchronize()
    ks = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            ks[e.name[:80]] = ks.get(e.name[:80], 0) + e.device_time / 1000
    return ks

try:
    from cudnn.sdpa.fwd.torch_op import sdpa as cudnn_sdpa
    res["cudnn_frontend"] = "imported"
except Exception as e:
    cudnn_sdpa = None
    res["cudnn_frontend_error"] = repr(e)[:500]
print(res, flush=True)

for workload, H in (("3b-uniprot", 40), ("650m-orf", 20)):
    for i, (tok, cu, ml) in enumerate(packs(workload, 3000, 131072, 2)):
        T = tok.shape[0]; n = cu.numel() - 1
        qkv = torch.randn(T, 3, H, 64, device="cuda", dtype=torch.bfloat16)
        q, k, v = qkv.unbind(1)
        lens = (cu[1:] - cu[:-1]).double(); flops = 4 * float((lens ** 2).sum()) * H * 64
        row = {"T": T, "n": n}
        ref = fa2.attend(q, k, v, cu, ml)
        t = time_cuda(lambda: fa2.attend(q, k, v, cu, ml)); row["fa2_ms"] = t * 1e3; row["fa2_tflops"] = flops / t / 1e12
        ks = kernel_ms(lambda: torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, ml, ml, False, 0.0, False, False, scale=1.0))
        row["torch_cudnn_kernels"] = {k_: round(v_, 3) for k_, v_ in sorted(ks.items(), key=lambda kv: -kv[1])[:4]}
        if cudnn_sdpa is not None:
            for bucket_b, bucket_s in ((n, ml), (((n + 255) // 256) * 256, 1024)):
                try:
                    cu_pad = torch.cat([cu, cu[-1:].expand(bucket_b - n)]).contiguous()
                    fn = lambda: cudnn_sdpa(q, k, v, scale=1.0, cu_seqlens_q=cu_pad, cu_seqlens_kv=cu_pad, max_seqlen_q=bucket_s, max_seqlen_kv=bucket_s)
                    t0 = time.perf_counter(); o = fn(); torch.cuda.synchronize(); first = time.perf_counter() - t0
                    key = f"fe_B{bucket_b}_S{bucket_s}"
                    row[key + "_first_s"] = first
                    row[key + "_maxdiff"] = float((o.float() - ref.float()).abs().max())
                    t = time_cuda(fn); row[key + "_ms"] = t * 1e3; row[key + "_tflops"] = flops / t / 1e12
                    ks = kernel_ms(fn)
                    row[key + "_kernels"] = {k_: round(v_, 3) for k_, v_ in sorted(ks.items(), key=lambda kv: -kv[1])[:4]}
                except Exception as e:
                    row[f"fe_B{bucket_b}_error"] = repr(e)[:500]
        print(workload, i, json.dumps(row), flush=True)
        res[f"{workload}_{i}"] = row
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "exp4.json"), "w"), indent=1)
