"""One-off experiment, 2026-11-23 (H100), kept as it was run: attention through torch's
cuDNN op (varlen), GELU kernel bandwidth, and two CUDA streams for the 3B engine.

Findings (bench/results/2026-11-23-h100-overlap-and-bandwidth.json): torch 2.11's
``_cudnn_attention_forward`` with cu_seqlens rebuilds its cuDNN graph on every call
(~45 ms a call), so it is unusable as is; our GELU kernel moves 2.86 TB/s (copy: 2.96);
two batches on two streams gave no gain (92.6k against 93.6k tok/s).

    PYTHONPATH=. python bench/experiments/overlap_and_bandwidth.py
"""
import os, sys, time, statistics, json
sys.path.insert(0, os.getcwd())
import torch, triton
import torch.nn.functional as F
from bench.engine import workload_lengths, make_sequences, WORKLOADS
from bench.profile_engine import time_cuda
from vnpd.compute.packing import pack_batches, build_batch
from vnpd.compute.attention import select_attention, exact_attention, AttentionBackend

OUT = os.environ.get("OUT", "/tmp")
print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(), "triton", triton.__version__, flush=True)
try:
    print(torch.ops.aten._cudnn_attention_forward.default._schema, flush=True)
except Exception as e:
    print("no cudnn op", e)

def packs(workload, n, budget, count):
    lengths = workload_lengths(workload, n); seqs = make_sequences(lengths)
    plan = pack_batches(lengths, budget)
    out = []
    for p in plan[:count]:
        b = build_batch(p, [seqs[i] for i in p])
        out.append((torch.from_numpy(b.tokens).cuda(), torch.from_numpy(b.cu_seqlens).cuda(), b.max_len))
    return out

fa2 = select_attention(torch.device("cuda"), torch.bfloat16, prefer="torch_varlen")

def cudnn_attend(q, k, v, cu, ml):
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, ml, ml, False, 0.0, False, False, scale=1.0)[0]

def cudnn_attend_contig(q, k, v, cu, ml):
    return cudnn_attend(q.contiguous(), k.contiguous(), v.contiguous(), cu, ml)

report = {}
for workload in ("3b-uniprot", "650m-orf"):
    arch = WORKLOADS[workload]; H = arch["heads"]; hd = arch["dim"] // H
    for i, (tok, cu, ml) in enumerate(packs(workload, 3000, 131072, 2)):
        T = tok.shape[0]
        torch.manual_seed(i)
        qkv = torch.randn(T, 3, H, hd, device="cuda", dtype=torch.bfloat16)
        q, k, v = qkv.unbind(1)
        q = q * 0.125
        lens = (cu[1:] - cu[:-1]).double()
        flops = 4 * float((lens ** 2).sum()) * H * hd
        ref = fa2.attend(q, k, v, cu, ml)
        row = {"T": T, "n": int(cu.numel() - 1), "max_len": ml}
        t = time_cuda(lambda: fa2.attend(q, k, v, cu, ml)); row["fa2_ms"] = t * 1e3; row["fa2_tflops"] = flops / t / 1e12
        # fp32 reference on the first 8 sequences
        n8 = int(cu[8])
        ex = exact_attention(q[:n8].float(), k[:n8].float(), v[:n8].float(), cu[:9], ml)
        row["fa2_err_vs_fp32"] = float((ref[:n8].float() - ex).abs().max())
        for name, fn in (("cudnn_strided", cudnn_attend), ("cudnn_contig", cudnn_attend_contig)):
            try:
                o = fn(q, k, v, cu, ml)
                torch.cuda.synchronize()
                row[f"{name}_maxdiff_vs_fa2"] = float((o.float() - ref.float()).abs().max())
                row[f"{name}_err_vs_fp32"] = float((o[:n8].float() - ex).abs().max())
                t = time_cuda(lambda: fn(q, k, v, cu, ml)); row[f"{name}_ms"] = t * 1e3; row[f"{name}_tflops"] = flops / t / 1e12
            except Exception as e:
                row[f"{name}_error"] = repr(e)[:300]
        print(workload, i, json.dumps(row), flush=True)
        report[f"attn_{workload}_{i}"] = row

# GELU bandwidth
from vnpd.compute import kernels
x = torch.randn(131072, 10240, device="cuda", dtype=torch.bfloat16)
nbytes = 2 * x.numel() * 2
g = {}
t = time_cuda(lambda: kernels.gelu(x)); g["vnpd_gelu_GBs"] = nbytes / t / 1e9; g["vnpd_gelu_ms"] = t * 1e3
t = time_cuda(lambda: F.gelu(x)); g["torch_gelu_GBs"] = nbytes / t / 1e9
out = torch.empty_like(x)
for block, warps in ((1024, 4), (2048, 8), (8192, 8), (16384, 16), (4096, 4)):
    t = time_cuda(lambda: kernels._gelu_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), BLOCK=block, num_warps=warps))
    g[f"gelu_{block}_{warps}_GBs"] = nbytes / t / 1e9
t = time_cuda(lambda: kernels._gelu_kernel[(triton.cdiv(x.numel(), 4096),)](x, x, x.numel(), BLOCK=4096, num_warps=8)); g["gelu_inplace_GBs"] = nbytes / t / 1e9
big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); dst = torch.empty_like(big)
t = time_cuda(lambda: dst.copy_(big)); g["copy_GBs"] = 2 * big.numel() / t / 1e9
print("gelu", json.dumps(g), flush=True); report["gelu"] = g
del x, out, big, dst

# Engine: single stream vs two streams, FA2 vs cuDNN
from esm.data import Alphabet
from esm.model.esm2 import ESM2
from vnpd.compute.families.esm2 import PackedESM2
arch = WORKLOADS["3b-uniprot"]
torch.manual_seed(0)
with torch.device("cuda"):
    model = ESM2(num_layers=arch["layers"], embed_dim=arch["dim"], attention_heads=arch["heads"], alphabet=Alphabet.from_architecture("ESM-1b")).eval()
model = model.to(torch.bfloat16)
batches = packs("3b-uniprot", 8000, 131072, 7)
warm, batches = batches[0], batches[1:]
ntok = sum(b[0].shape[0] for b in batches)
eng = {}
outs = {}
for attn_name, attend in (("fa2", fa2.attend), ("cudnn", cudnn_attend)):
    packed = PackedESM2(model, AttentionBackend(attn_name, attend))
    with torch.inference_mode():
        packed.embed(*warm, 36); torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = [packed.embed(*b, 36) for b in batches]
        torch.cuda.synchronize(); eng[f"{attn_name}_1stream_toks"] = ntok / (time.perf_counter() - t0)
        outs[attn_name] = res[0].clone()
        streams = [torch.cuda.Stream(), torch.cuda.Stream()]
        for s in streams: s.wait_stream(torch.cuda.current_stream())
        t0 = time.perf_counter()
        for j, b in enumerate(batches):
            with torch.cuda.stream(streams[j % 2]):
                packed.embed(*b, 36)
        torch.cuda.synchronize(); eng[f"{attn_name}_2stream_toks"] = ntok / (time.perf_counter() - t0)
    print("engine", json.dumps(eng), flush=True)
cos = F.cosine_similarity(outs["fa2"], outs["cudnn"], dim=1)
eng["cudnn_vs_fa2_min_cos"] = float(cos.min())
print("engine", json.dumps(eng), flush=True); report["engine"] = eng
json.dump(report, open(os.path.join(OUT, "exp.json"), "w"), indent=1)
