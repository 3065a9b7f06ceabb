"""Triton kernels for the CUDA forward: the elementwise work between the GEMMs.

Profiling the 3B forward on an H100 (docs/BENCHMARKS.md) showed the rotary step costing
15% of the device time: inductor's kernel for ``split_qkv_rotary`` moved the fused qkv
at a fifth of memory bandwidth, and copied v only to make it contiguous. The kernel here
rotates q and k *in place* inside the fused projection (one read and one write of q and
k, nothing for v); attention then reads q, k and v as strided views of that buffer.

The math is fair-esm's ``apply_rotary_pos_emb`` on ``q * scaling`` and ``k``, in fp32
with fp32 cos/sin tables, cast back once:

    out[:half] = x1 * cos - x2 * sin
    out[half:] = x2 * cos + x1 * sin        (cos/sin: the first half of the table row)

The residual add and the layer norm after it are one kernel too (one read of x and of
the update, one write of x and of the normalised row), with fair-esm's rounding: the sum
is rounded to the compute dtype before it is normalised, statistics are fp32.

Where the residual add happens inside the GEMM (vnpd/compute/cublaslt.py adds it in cuBLASLt's
epilogue), the layer norm runs alone: one read of the row, one write of the normalised
row.

The exact erf GELU of the FFN is a plain elementwise kernel: inductor's dynamic-shape
version of it ran at two thirds of memory bandwidth on the 4·D activation.

Triton is only needed on CUDA machines. Under ``TRITON_INTERPRET=1`` the same kernel runs
on CPU tensors, which is how the tests check it without a GPU.

Example::

    q, k, v = rotate_qk_inplace(qkv, cos, sin, heads=40, scaling=0.125)  # (T, H, hd) views
    x, h = add_layer_norm(x, delta, weight, bias, 1e-5)                  # x + delta, LN(x)
    h = layer_norm(x, weight, bias, 1e-5)                                # LN(x)
    y = gelu(fc1_out)                                                    # exact erf GELU
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_qk_kernel(qkv_ptr, cos_ptr, sin_ptr, row_stride, table_stride, scaling,
                      HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    # One program per token: its q and k for every head, as (BLOCK_H, HALF) halves.
    t = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, HALF)
    mask = (heads < HEADS)[:, None]
    cos = tl.load(cos_ptr + t * table_stride + cols)[None, :]
    sin = tl.load(sin_ptr + t * table_stride + cols)[None, :]
    offsets = heads[:, None] * (2 * HALF) + cols[None, :]
    for part in tl.static_range(2):  # 0 = q (pre-scaled), 1 = k
        base = qkv_ptr + t * row_stride + part * HEADS * 2 * HALF + offsets
        x1 = tl.load(base, mask=mask).to(tl.float32)
        x2 = tl.load(base + HALF, mask=mask).to(tl.float32)
        if part == 0:
            x1 = x1 * scaling
            x2 = x2 * scaling
        out1 = x1 * cos - x2 * sin
        out2 = x2 * cos + x1 * sin
        tl.store(base, out1.to(qkv_ptr.dtype.element_ty), mask=mask)
        tl.store(base + HALF, out2.to(qkv_ptr.dtype.element_ty), mask=mask)


def rotate_qk_inplace(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                      scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate q (scaled) and k of a fused (T, 3·D) projection in place; return q, k, v.

    ``cos``/``sin`` are the fp32 (T, head_dim) tables of :func:`vnpd.compute.families.esm2.rotary_tables`.
    The returned tensors are (T, H, head_dim) views into ``qkv`` (row stride 3·D).
    """
    total, width = qkv.shape
    head_dim = width // (3 * heads)
    if qkv.stride(1) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1 or \
            cos.stride(0) != sin.stride(0):
        raise ValueError("rotate_qk_inplace needs row-major qkv and cos/sin tables")
    if total:
        _rotary_qk_kernel[(total,)](qkv, cos, sin, qkv.stride(0), cos.stride(0), scaling,
                                    HEADS=heads, HALF=head_dim // 2,
                                    BLOCK_H=triton.next_power_of_2(heads), num_warps=4)
    q, k, v = qkv.view(total, 3, heads, head_dim).unbind(1)
    return q, k, v


@triton.jit
def _add_layer_norm_kernel(x_ptr, delta_ptr, out_ptr, norm_ptr, weight_ptr, bias_ptr, total,
                           dim, eps, BLOCK: tl.constexpr, ROWS: tl.constexpr, ADD: tl.constexpr):
    # ROWS token rows per program. Without ADD: the norm of x alone (delta/out unused).
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < total)[:, None] & (cols < dim)[None, :]
    offsets = rows[:, None] * dim + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        delta = tl.load(delta_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to the stored dtype first: the next layer's residual and this norm
        # both see that rounded value, as in fair-esm.
        summed = (x + delta).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offsets, summed, mask=mask)
        s = summed.to(tl.float32)
    else:
        s = x
    mean = tl.sum(s, axis=1) / dim
    centered = tl.where(mask, s - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / dim
    rstd = 1.0 / tl.sqrt(var + eps)
    weight = tl.load(weight_ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)
    normed = centered * rstd[:, None] * weight[None, :] + bias[None, :]
    tl.store(norm_ptr + offsets, normed.to(norm_ptr.dtype.element_ty), mask=mask)


def _launch_norm(x: torch.Tensor, delta: torch.Tensor, out: torch.Tensor, norm: torch.Tensor,
                 weight: torch.Tensor, bias: torch.Tensor, eps: float, add: bool,
                 rows: int = 1, num_warps: int | None = None) -> None:
    total, dim = x.shape
    if total:
        block = triton.next_power_of_2(dim)
        warps = num_warps or min(16, max(4, rows * block // 256))
        _add_layer_norm_kernel[(triton.cdiv(total, rows),)](
            x, delta, out, norm, weight, bias, total, dim, eps, BLOCK=block, ROWS=rows,
            ADD=add, num_warps=warps)


def add_layer_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, LayerNorm(x + delta)) for contiguous (T, D) tensors, in one pass."""
    if not (x.is_contiguous() and delta.is_contiguous()):
        raise ValueError("add_layer_norm needs contiguous (T, D) inputs")
    out, norm = torch.empty_like(x), torch.empty_like(x)
    _launch_norm(x, delta, out, norm, weight, bias, eps, add=True)
    return out, norm


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               rows: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """LayerNorm of a contiguous (T, D) tensor, statistics in fp32 (as ``F.layer_norm``).

    ``rows`` per program and ``num_warps`` are launch settings; the defaults are the
    fastest measured on the H100 (bench/experiments/norm_kernels.py): for D = 2560, two
    rows and 4 warps (2.8 TB/s, against 2.2 for one row and 16 warps); for D = 1280, one
    row and 2 warps.
    """
    if not x.is_contiguous():
        raise ValueError("layer_norm needs a contiguous (T, D) input")
    wide = triton.next_power_of_2(x.shape[-1]) >= 4096
    rows = rows or (2 if wide else 1)
    num_warps = num_warps or (4 if wide else 2)
    norm = torch.empty_like(x)
    _launch_norm(x, x, x, norm, weight, bias, eps, add=False, rows=rows, num_warps=num_warps)
    return norm


@triton.jit
def _gelu_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # int64 offsets: a 131k-token batch of the 3B model has 1.3e9 FFN activations.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
    y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


def gelu(x: torch.Tensor, block: int = 2048, num_warps: int = 4) -> torch.Tensor:
    """Exact erf GELU (``esm.modules.gelu``) of a contiguous tensor, computed in fp32.

    ``block`` and ``num_warps`` are launch settings; the defaults were the fastest on the
    H100 for both the 3B and 650M FFN widths (bench/experiments/norm_kernels.py).
    """
    if not x.is_contiguous():
        raise ValueError("gelu needs a contiguous tensor")
    out = torch.empty_like(x)
    if x.numel():
        _gelu_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), BLOCK=block,
                                                       num_warps=num_warps)
    return out
