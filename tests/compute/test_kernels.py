"""The Triton kernels of the CUDA forward against the torch code they replace.

On a GPU machine they run as compiled kernels; here, under Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU). Inputs are fresh random
values each time, and outputs start poisoned with NaN so an unwritten element fails.
"""

from __future__ import annotations

import pytest
import torch

from vnpd.compute.families import esm2 as forward
from vnpd.compute.kernels import add_layer_norm, gelu, layer_norm, rotate_qk_inplace

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 must agree to rounding; a half-precision result may differ by one unit in the last
# place (the kernel may fuse a multiply-add that torch rounds twice). Triton's interpreter
# casts fp32 to half types by truncation, not round-to-nearest as the GPU does, which can
# cost one more unit where a rounded value feeds another (the sum feeds the norm).
ULPS = 1 if DEVICE == "cuda" else 2
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: ULPS * 2 ** -7, torch.float16: ULPS * 2 ** -10}


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype,
                 fp32_tolerance: float = TOLERANCE[torch.float32]) -> None:
    assert not got.isnan().any(), "an element was not written"
    scale = want.float().abs().clamp(min=1.0)
    err = ((got.float() - want.float()).abs() / scale).max().item()
    tol = fp32_tolerance if dtype == torch.float32 else TOLERANCE[dtype]
    assert err <= tol, f"max relative error {err} for {dtype}"


def packed_positions(lengths: list[int]) -> tuple[torch.Tensor, int]:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    starts = torch.repeat_interleave(cu[:-1], torch.tensor(lengths))
    total = int(cu[-1])
    return (torch.arange(total, dtype=torch.int32) - starts).to(DEVICE), total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,head_dim", [(4, 16), (6, 16), (5, 64)])
def test_rotary_in_place_matches_split_qkv_rotary(dtype: torch.dtype, heads: int,
                                                  head_dim: int) -> None:
    positions, total = packed_positions([1, 3, 40, 2, 17])
    cos, sin = forward.rotary_tables(positions, head_dim)
    qkv = torch.randn(total, 3 * heads * head_dim, device=DEVICE).to(dtype)
    want = forward.split_qkv_rotary(qkv.clone(), cos, sin, heads, head_dim ** -0.5)
    untouched_v = qkv.view(total, 3, heads, head_dim)[:, 2].clone()
    got = rotate_qk_inplace(qkv, cos, sin, heads, head_dim ** -0.5)
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape == (total, heads, head_dim), name
        assert g.data_ptr() >= qkv.data_ptr(), f"{name} is not a view into qkv"
        assert_close(g, w, dtype)
    assert torch.equal(got[2], untouched_v)


def test_rotary_positions_restart_per_sequence() -> None:
    """Two identical sequences packed side by side rotate identically."""
    heads, head_dim = 2, 16
    positions, total = packed_positions([9, 9])
    cos, sin = forward.rotary_tables(positions, head_dim)
    half = torch.randn(9, 3 * heads * head_dim, device=DEVICE)
    q, k, _ = rotate_qk_inplace(torch.cat([half, half]), cos, sin, heads, 0.25)
    assert torch.equal(q[:9], q[9:]) and torch.equal(k[:9], k[9:])
    assert not torch.equal(q[1], q[2])  # positions differ within a sequence


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,dim", [(1, 64), (37, 96), (5, 1280), (3, 2560)])
def test_add_layer_norm_matches_torch(dtype: torch.dtype, rows: int, dim: int) -> None:
    x, delta = (torch.randn(rows, dim, device=DEVICE).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(dim, device=DEVICE)).to(dtype)
    bias = (0.1 * torch.randn(dim, device=DEVICE)).to(dtype)
    want_x, want_h = forward.add_layer_norm(x, delta, weight, bias, 1e-5)
    got_x, got_h = add_layer_norm(x, delta, weight, bias, 1e-5)
    assert_close(got_x, want_x, dtype)
    assert_close(got_h, want_h, dtype)
    assert got_x.dtype == got_h.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,dim", [(1, 64), (37, 96), (5, 1280), (3, 2560)])
def test_layer_norm_alone_matches_torch_and_leaves_x(dtype: torch.dtype, rows: int,
                                                     dim: int) -> None:
    """The norm-only kernel (the residual add happened in the GEMM), offset rows included."""
    x = (3 + torch.randn(rows, dim, device=DEVICE)).to(dtype)
    before = x.clone()
    weight = (1 + 0.1 * torch.randn(dim, device=DEVICE)).to(dtype)
    bias = (0.1 * torch.randn(dim, device=DEVICE)).to(dtype)
    want = torch.nn.functional.layer_norm(x, (dim,), weight, bias, 1e-5)
    for per_program, warps in ((None, None), (1, 16), (2, 4), (4, 2)):  # default and others
        got = layer_norm(x, weight, bias, 1e-5, rows=per_program, num_warps=warps)
        assert_close(got, want, dtype)
        assert got.dtype == dtype
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 7), (33, 256), (5000,)])
def test_gelu_is_exact_erf_gelu(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = (3 * torch.randn(shape, device=DEVICE)).to(dtype)
    # In fp32, 1 + erf(x) cancels for x < -2, so erf implementations a few units apart
    # (libdevice, torch's, the interpreter's) differ by up to ~1.2e-6 absolute there.
    assert_close(gelu(x), forward.gelu(x), dtype, 4e-6)  # F.gelu(approximate="none")
    erf_form = x.double() * 0.5 * (1.0 + torch.erf(x.double() / 2 ** 0.5))  # esm.modules.gelu
    assert_close(gelu(x), erf_form.to(dtype), dtype, 4e-6)
    assert torch.equal(gelu(x, block=4096, num_warps=8), gelu(x))  # launch settings only


def test_kernels_refuse_layouts_they_cannot_read() -> None:
    x = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(ValueError):
        gelu(x.t())
    with pytest.raises(ValueError):
        add_layer_norm(x.t().contiguous().t(), x, x[0], x[0], 1e-5)
    with pytest.raises(ValueError):
        layer_norm(x.t(), x[0], x[0], 1e-5)
    positions, total = packed_positions([4])
    cos, sin = forward.rotary_tables(positions, 16)
    with pytest.raises(ValueError):
        rotate_qk_inplace(torch.randn(3 * 64, total, device=DEVICE).t(), cos, sin, 4, 0.25)
