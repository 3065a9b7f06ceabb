"""The cuBLASLt GEMMs with the residual in the epilogue (vnpd/compute/cublaslt.py).

cuBLASLt exists only on CUDA machines: there each call is checked against torch's math
(float64 on the same rounded inputs), for the bias and residual epilogues, odd and empty
token counts, every compute dtype, and a second device stream. Here (no GPU) only the
ABI of the structures it passes to the C library and the CPU fallback are checked.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from vnpd.compute import cublaslt

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="cuBLASLt needs a CUDA device")


def test_structures_match_the_c_header() -> None:
    # cublasLtMatmulAlgo_t is uint64_t data[8]; the heuristic result adds size_t,
    # cublasStatus_t, float and int[4]: 64 + 8 + 4 + 4 + 16 bytes.
    assert ctypes.sizeof(cublaslt._Algo) == 64
    assert ctypes.sizeof(cublaslt._Heuristic) == 96
    assert cublaslt._Heuristic.workspace_size.offset == 64


def test_forward_keeps_torch_gemms_off_cuda() -> None:
    from vnpd.compute.families.esm2 import _cublaslt_add_norm

    assert _cublaslt_add_norm(torch.device("cpu"), torch.float32) is None


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
              r: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact result and the magnitude its rounding errors scale with: cuBLASLt may
    round the product before adding the residual (as fair-esm does), so a sum that
    cancels is only good to a unit of its largest term."""
    out = x.double() @ w.double().T
    scale = out.abs()
    for term in (b, r):
        if term is not None:
            out = out + term.double()
            scale = scale + term.double().abs()
    return out, scale.clamp(min=1.0)


def relative_error(got: torch.Tensor, want: tuple[torch.Tensor, torch.Tensor]) -> float:
    return float(((got.double() - want[0]).abs() / want[1]).max())


@pytest.fixture(scope="module")
def lt() -> cublaslt.CublasLt:
    return cublaslt.CublasLt(torch.device("cuda"))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear_matches_torch_math(lt: cublaslt.CublasLt, dtype: torch.dtype) -> None:
    k, n = 320, 192
    unit = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    for m in (1, 37, 1000, 4097):
        for with_bias, with_residual in ((True, False), (True, True), (False, False),
                                         (False, True)):
            x = torch.randn(m, k, device="cuda").to(dtype)
            w = (0.1 * torch.randn(n, k, device="cuda")).to(dtype)
            b = torch.randn(n, device="cuda").to(dtype) if with_bias else None
            r = (5 * torch.randn(m, n, device="cuda")).to(dtype) if with_residual else None
            want = reference(x, w, b, r)
            got = lt.linear(x, w, b, residual=r)
            if r is not None:
                assert got.data_ptr() == r.data_ptr()  # updated in place
            assert got.shape == (m, n) and got.dtype == dtype
            err = relative_error(got, want)
            assert err <= 2 * unit, (m, with_bias, with_residual, err)


@needs_cuda
def test_token_counts_change_between_calls(lt: cublaslt.CublasLt) -> None:
    """Every batch has its own token count; more than the cache holds, and back again."""
    w = torch.randn(64, 96, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(64, device="cuda", dtype=torch.bfloat16)
    for m in [*range(1, cublaslt._MAX_CACHED_TOKEN_COUNTS + 10), 5, 0]:
        x = torch.randn(m, 96, device="cuda", dtype=torch.bfloat16)
        got = lt.linear(x, w, b)
        assert got.shape == (m, 64)
        if m:
            assert relative_error(got, reference(x, w, b, None)) \
                <= 2 * torch.finfo(torch.bfloat16).eps


@needs_cuda
def test_runs_on_the_callers_stream(lt: cublaslt.CublasLt) -> None:
    x = torch.randn(2048, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = lt.linear(x, w)
        event = side.record_event()
    event.synchronize()
    assert relative_error(got, reference(x, w, None, None)) \
        <= 2 * torch.finfo(torch.bfloat16).eps


@needs_cuda
def test_self_check_accepts_a_working_library(lt: cublaslt.CublasLt) -> None:
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert cublaslt.agrees_with_torch(lt, dtype) is None


@needs_cuda
def test_self_check_rejects_wrong_results(lt: cublaslt.CublasLt,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real = lt.linear

    def no_residual(x, w, b=None, residual=None, epilogue=None):  # drops the residual
        return real(x, w, b)

    monkeypatch.setattr(lt, "linear", no_residual)
    assert "difference" in cublaslt.agrees_with_torch(lt, torch.bfloat16)

    def raises(*args, **kwargs):
        raise RuntimeError("cuBLASLt matmul failed with status 7")

    monkeypatch.setattr(lt, "linear", raises)
    assert "status 7" in cublaslt.agrees_with_torch(lt, torch.bfloat16)


@needs_cuda
def test_refuses_layouts_it_cannot_read(lt: cublaslt.CublasLt) -> None:
    x = torch.randn(16, 32, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8, 32, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        lt.linear(x.t().contiguous().t(), w)
    with pytest.raises(ValueError):
        lt.linear(x, w.float())
    with pytest.raises(ValueError):
        lt.linear(x, w, residual=torch.zeros(16, 9, device="cuda", dtype=torch.bfloat16))
