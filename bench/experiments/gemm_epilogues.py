"""One-off experiment, 2026-11-23 (H100), kept as it was run: Triton persistent TMA GEMMs
with fused epilogues against cuBLAS plus our elementwise kernels, 3B shapes, 131k tokens.

Findings (bench/results/2026-11-23-h100-gemm-epilogues.json): the erf GELU in the fc1
epilogue costs as much as the separate GELU pass (11.6-12.1 ms against 11.0 for cuBLAS +
kernel; a cheaper erfc polynomial was slower still, MUFU-bound); warp specialisation made
the plain GEMM as fast as cuBLAS (9.41 against 9.72 ms) but did not hide the epilogue. The
rotary in the q/k/v epilogue saved 0.16 ms a layer. Built into the engine as a mode that
ran all four projections this way, it was 2% slower end to end
(bench/results/2026-11-23-h100-3b-tma-gemm-ab.log), so it was not kept.

    PYTHONPATH=. python bench/experiments/gemm_epilogues.py
"""
import os, sys, json
sys.path.insert(0, os.getcwd())
import torch, triton, triton.language as tl
import torch.nn.functional as F
from triton.tools.tensor_descriptor import TensorDescriptor
from bench.profile_engine import time_cuda
from vnpd.compute import kernels
from vnpd.compute.families.esm2 import rotary_tables

@triton.jit
def _pid(tile_id, num_pid_in_group, num_pid_m, GROUP_M: tl.constexpr):
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n

@triton.jit
def _gelu_fast(x):
    # 0.5 x erfc(-x/sqrt2); erfc from Numerical Recipes' erfcc (fractional error < 1.2e-7)
    z = x * -0.7071067811865476
    a = tl.abs(z)
    t = tl.fdiv(1.0, 1.0 + 0.5 * a, ieee_rounding=False)
    p = 0.17087277
    p = p * t - 0.82215223
    p = p * t + 1.48851587
    p = p * t - 1.13520398
    p = p * t + 0.27886807
    p = p * t - 0.18628806
    p = p * t + 0.09678418
    p = p * t + 0.37409196
    p = p * t + 1.00002368
    p = p * t - 1.26551223
    ans = t * tl.exp(p - a * a)
    erfc = tl.where(z >= 0, ans, 2.0 - ans)
    return 0.5 * x * erfc

@triton.jit
def _epi(acc, bias_ptr, cos_ptr, sin_ptr, rows, M, offs, N, D, scaling,
         BM: tl.constexpr, WIDTH: tl.constexpr, EPI: tl.constexpr, HD: tl.constexpr, dtype: tl.constexpr):
    cols = offs + tl.arange(0, WIDTH)
    b = tl.load(bias_ptr + cols, mask=cols < N).to(tl.float32)
    y = acc + b[None, :]
    if EPI == 1:
        y = y.to(dtype).to(tl.float32)
        y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    elif EPI == 2:
        y = _gelu_fast(y.to(dtype).to(tl.float32))
    elif EPI == 3:
        y = y.to(dtype).to(tl.float32)
        part = offs // D
        HALF: tl.constexpr = HD // 2
        hc = tl.arange(0, HALF)
        rmask = (rows < M)[:, None]
        c = tl.load(cos_ptr + rows[:, None] * HD + hc[None, :], mask=rmask, other=0.0)[:, None, :]
        s = tl.load(sin_ptr + rows[:, None] * HD + hc[None, :], mask=rmask, other=0.0)[:, None, :]
        f = tl.where(part == 0, scaling, 1.0)
        y4 = tl.permute(tl.reshape(y * f, (BM, WIDTH // HD, 2, HALF)), (0, 1, 3, 2))
        x1, x2 = tl.split(y4)
        r = tl.join(x1 * c - x2 * s, x2 * c + x1 * s)
        r = tl.reshape(tl.permute(r, (0, 1, 3, 2)), (BM, WIDTH))
        y = tl.where(part < 2, r, y)
    return y.to(dtype)

@triton.jit
def linear_kernel(a_desc, b_desc, c_desc, bias_ptr, cos_ptr, sin_ptr, M, N, K, D, scaling,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                  NUM_SMS: tl.constexpr, EPI: tl.constexpr, HD: tl.constexpr, WS: tl.constexpr):
    dtype = c_desc.dtype
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    tile_id_c = start - NUM_SMS
    for tile_id in tl.range(start, num_tiles, NUM_SMS, flatten=True, warp_specialize=WS):
        pid_m, pid_n = _pid(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
        offs_am = pid_m * BM
        offs_bn = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):
            offs_k = ki * BK
            a = a_desc.load([offs_am, offs_k])
            b = b_desc.load([offs_bn, offs_k])
            acc = tl.dot(a, b.T, acc)
        tile_id_c += NUM_SMS
        pid_m, pid_n = _pid(tile_id_c, num_pid_in_group, num_pid_m, GROUP_M)
        offs_cm = pid_m * BM
        offs_cn = pid_n * BN
        rows = offs_cm + tl.arange(0, BM)
        acc = tl.reshape(acc, (BM, 2, BN // 2))
        acc = tl.permute(acc, (0, 2, 1))
        acc0, acc1 = tl.split(acc)
        c_desc.store([offs_cm, offs_cn], _epi(acc0, bias_ptr, cos_ptr, sin_ptr, rows, M, offs_cn, N, D, scaling, BM, BN // 2, EPI, HD, dtype))
        c_desc.store([offs_cm, offs_cn + BN // 2], _epi(acc1, bias_ptr, cos_ptr, sin_ptr, rows, M, offs_cn + BN // 2, N, D, scaling, BM, BN // 2, EPI, HD, dtype))

NSM = torch.cuda.get_device_properties(0).multi_processor_count

def linear(x, w, b, cfg, epi=0, ws=False, cos=None, sin=None, D=1, scaling=1.0, hd=64):
    BM, BN, BK, G, stages, warps = cfg
    M, K = x.shape; N = w.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    a_d = TensorDescriptor(x, list(x.shape), list(x.stride()), [BM, BK])
    b_d = TensorDescriptor(w, list(w.shape), list(w.stride()), [BN, BK])
    c_d = TensorDescriptor(out, list(out.shape), list(out.stride()), [BM, BN // 2])
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    nprog = min(NSM, tiles)
    if cos is None:
        cos = sin = b
    linear_kernel[(nprog,)](a_d, b_d, c_d, b, cos, sin, M, N, K, D, scaling, BM=BM, BN=BN, BK=BK, GROUP_M=G,
                            NUM_SMS=nprog, EPI=epi, HD=hd, WS=ws, num_stages=stages, num_warps=warps)
    return out

res = {}
# accuracy of the fast GELU against float64 erf GELU on a dense grid
xs = torch.linspace(-12, 12, 1 << 22, device="cuda", dtype=torch.float32)
@triton.jit
def _g(x_ptr, o_ptr, n, FAST: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK); m = o < n
    x = tl.load(x_ptr + o, mask=m)
    if FAST:
        y = _gelu_fast(x)
    else:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    tl.store(o_ptr + o, y, mask=m)
ref64 = 0.5 * xs.double() * torch.special.erfc(-xs.double() / 2 ** 0.5)
for fast in (0, 1):
    o = torch.empty_like(xs); _g[(triton.cdiv(xs.numel(), 1024),)](xs, o, xs.numel(), FAST=fast, BLOCK=1024)
    err = (o.double() - ref64).abs()
    res[f"gelu_fast{fast}_abs_err_max"] = float(err.max()); res[f"gelu_fast{fast}_err_over_1p|x|"] = float((err / (1 + xs.double().abs())).max())
    res[f"gelu_fast{fast}_bf16_mismatch_vs_torch"] = float((o.to(torch.bfloat16) != F.gelu(xs).to(torch.bfloat16)).float().mean())
print(json.dumps(res), flush=True)

T, D = 131072, 2560
torch.manual_seed(0)
x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
w1 = torch.randn(4 * D, D, device="cuda", dtype=torch.bfloat16) * D ** -0.5
b1 = torch.randn(4 * D, device="cuda", dtype=torch.bfloat16) * 0.1
flops = 2 * T * 4 * D * D
t = time_cuda(lambda: F.linear(x, w1, b1)); res["fc1_cublas_ms"] = t * 1e3
t = time_cuda(lambda: kernels.gelu(F.linear(x, w1, b1))); res["fc1_cublas+gelu_ms"] = t * 1e3
ref = kernels.gelu(F.linear(x, w1, b1)).float()
for cfg in ((256, 128, 64, 8, 3, 8), (128, 256, 64, 8, 3, 8), (256, 128, 64, 8, 4, 8)):
    for epi in (0, 1, 2):
        for ws in (False, True):
            key = f"fc1_{'x'.join(map(str, cfg))}_epi{epi}_ws{int(ws)}"
            try:
                o = linear(x, w1, b1, cfg, epi, ws)
                if epi:
                    d = (o.float() - ref).abs(); res[key + "_maxdiff"] = float(d.max())
                    res[key + "_frac_gt_ulp"] = float((d > ref.abs() * 2 ** -8 + 1e-6).float().mean())
                t = time_cuda(lambda: linear(x, w1, b1, cfg, epi, ws)); res[key + "_ms"] = t * 1e3
            except Exception as e:
                res[key + "_error"] = repr(e)[:300]
            print(key, {k: v for k, v in res.items() if k.startswith(key)}, flush=True)
del ref, w1, b1
# QKV + rotary
wq = torch.randn(3 * D, D, device="cuda", dtype=torch.bfloat16) * D ** -0.5
bq = torch.randn(3 * D, device="cuda", dtype=torch.bfloat16) * 0.1
pos = (torch.arange(T, device="cuda") % 700).to(torch.int32)
cos, sin = rotary_tables(pos, 64)
def base():
    return kernels.rotate_qk_inplace(F.linear(x, wq, bq), cos, sin, 40, 0.125)
t = time_cuda(base); res["qkv_cublas+rot_ms"] = t * 1e3
t = time_cuda(lambda: F.linear(x, wq, bq)); res["qkv_cublas_ms"] = t * 1e3
refq = torch.stack(base(), 1).reshape(T, -1).float()
for cfg in ((128, 256, 64, 8, 3, 8), (256, 128, 64, 8, 3, 8)):
    for ws in (False, True):
        key = f"qkv_{'x'.join(map(str, cfg))}_rot_ws{int(ws)}"
        try:
            o = linear(x, wq, bq, cfg, 3, ws, cos, sin, D, 0.125)
            d = (o.float() - refq).abs(); res[key + "_maxdiff"] = float(d.max())
            res[key + "_frac_gt_ulp"] = float((d > refq.abs() * 2 ** -8 + 1e-6).float().mean())
            t = time_cuda(lambda: linear(x, wq, bq, cfg, 3, ws, cos, sin, D, 0.125)); res[key + "_ms"] = t * 1e3
            t = time_cuda(lambda: linear(x, wq, bq, cfg, 0, ws)); res[key + "_norot_ms"] = t * 1e3
        except Exception as e:
            res[key + "_error"] = repr(e)[:300]
        print(key, {k: v for k, v in res.items() if k.startswith(key)}, flush=True)
print(json.dumps(res), flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "exp3.json"), "w"), indent=1)
