"""cuBLASLt GEMMs with the residual add in the epilogue, through ctypes (CUDA only).

After the attention output projection and after fc2, an ESM-2 layer adds the GEMM's
result to the residual stream and normalises the sum. torch's ``F.linear`` writes the
GEMM result (with its bias) to a new tensor, and a second kernel reads it back with the
residual, writes the sum and the norm: four passes over a (T, D) tensor. cuBLASLt can read
the residual in the GEMM's epilogue instead, ``D = X·Wᵀ + b + C`` with C = D = the
residual, updated in place, for the same GEMM time (measured on the H100,
docs/BENCHMARKS.md); the norm then reads the sum once and writes once. torch exposes the
bias epilogue or a beta = 1 accumulate, never both, so this module calls cuBLASLt itself,
in the libcublasLt that torch has already loaded.

The algorithm is cuBLASLt's own heuristic choice for each shape, as torch's is (timing
all of its candidates found none faster beyond noise). The result is good to about one
unit in the last place of the largest term, as fair-esm's (round the projection, then
the sum): where the sum cancels, the H100 showed up to two units of the sum itself.

Row-major ``Y (M, N) = X (M, K) · W (N, K)ᵀ`` is column-major ``Yᵀ = W · Xᵀ``: cuBLAS's
A is W with op T, B is X with op N, and C/D are Y, each with its row length as the leading
dimension.

Example::

    lt = CublasLt(torch.device("cuda:0"))
    y = lt.linear(x, weight, bias)                 # x @ weight.T + bias, a new tensor
    x = lt.linear(o, out_w, out_b, residual=x)     # x += o @ out_w.T + out_b, in place
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import torch

_COMPUTE_32F = 68
_CUDA_TYPES = {torch.bfloat16: 14, torch.float16: 2, torch.float32: 0}
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_DESC_BIAS_DATA_TYPE = 26
EPILOGUE_DEFAULT, EPILOGUE_BIAS, EPILOGUE_GELU_BIAS = 1, 4, 36
_OP_N, _OP_T = 0, 1
_PREF_MAX_WORKSPACE_BYTES = 1
WORKSPACE_BYTES = 32 << 20
_MAX_CACHED_TOKEN_COUNTS = 64


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    """cublasLtMatmulHeuristicResult_t."""

    _fields_ = [("algo", _Algo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def _load_library() -> ctypes.CDLL:
    """The libcublasLt that torch itself loaded (one copy, one CUDA context)."""
    a = torch.ones(8, 8, device="cuda")
    torch.nn.functional.linear(a, a, a[0])  # makes torch load cuBLAS and cuBLASLt
    with open("/proc/self/maps") as maps:
        paths = sorted({line.split()[-1] for line in maps if "libcublasLt.so" in line})
    if not paths:
        raise RuntimeError("libcublasLt is not loaded in this process")
    return ctypes.CDLL(paths[0])


@dataclass(frozen=True)
class _Key:
    n: int
    k: int
    dtype: torch.dtype
    epilogue: int


@dataclass
class _Plan:
    desc: ctypes.c_void_p
    a_layout: ctypes.c_void_p
    # Per token count M: the B and D layouts and the heuristic's algorithm.
    by_m: dict[int, tuple[ctypes.c_void_p, ctypes.c_void_p, _Algo]] = field(default_factory=dict)


class CublasLt:
    """cuBLASLt matmuls on one CUDA device; not thread-safe (one engine, one thread)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        with torch.cuda.device(device):
            self._lib = _load_library()
            self._workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._handle = ctypes.c_void_p()
        self._check(self._lib.cublasLtCreate(ctypes.byref(self._handle)), "create")
        self._pref = ctypes.c_void_p()
        self._check(self._lib.cublasLtMatmulPreferenceCreate(ctypes.byref(self._pref)), "pref")
        size = ctypes.c_size_t(WORKSPACE_BYTES)
        self._check(self._lib.cublasLtMatmulPreferenceSetAttribute(
            self._pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(size), ctypes.sizeof(size)),
            "preference")
        self._plans: dict[_Key, _Plan] = {}
        self._one = ctypes.c_float(1.0)
        self._zero = ctypes.c_float(0.0)

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"cuBLASLt {what} failed with status {status}")

    def _layout(self, dtype: torch.dtype, rows: int, cols: int) -> ctypes.c_void_p:
        layout = ctypes.c_void_p()
        self._check(self._lib.cublasLtMatrixLayoutCreate(
            ctypes.byref(layout), _CUDA_TYPES[dtype], ctypes.c_uint64(rows),
            ctypes.c_uint64(cols), ctypes.c_int64(rows)), "layout")
        return layout

    def _set(self, desc: ctypes.c_void_p, attr: int, value: ctypes._SimpleCData) -> None:
        self._check(self._lib.cublasLtMatmulDescSetAttribute(
            desc, attr, ctypes.byref(value), ctypes.sizeof(value)), f"attribute {attr}")

    def _plan(self, key: _Key) -> _Plan:
        plan = self._plans.get(key)
        if plan is None:
            desc = ctypes.c_void_p()
            self._check(self._lib.cublasLtMatmulDescCreate(
                ctypes.byref(desc), _COMPUTE_32F, _CUDA_TYPES[torch.float32]), "descriptor")
            self._set(desc, _DESC_TRANSA, ctypes.c_int32(_OP_T))
            self._set(desc, _DESC_TRANSB, ctypes.c_int32(_OP_N))
            self._set(desc, _DESC_EPILOGUE, ctypes.c_int32(key.epilogue))
            if key.epilogue != EPILOGUE_DEFAULT:
                self._set(desc, _DESC_BIAS_DATA_TYPE, ctypes.c_int32(_CUDA_TYPES[key.dtype]))
            plan = self._plans[key] = _Plan(desc, self._layout(key.dtype, key.k, key.n))
        return plan

    def _for_m(self, plan: _Plan, key: _Key, m: int) -> tuple[ctypes.c_void_p, ...]:
        found = plan.by_m.get(m)
        if found is None:
            if len(plan.by_m) >= _MAX_CACHED_TOKEN_COUNTS:  # M changes with every batch
                for b_layout, d_layout, _ in plan.by_m.values():
                    self._lib.cublasLtMatrixLayoutDestroy(b_layout)
                    self._lib.cublasLtMatrixLayoutDestroy(d_layout)
                plan.by_m.clear()
            b_layout, d_layout = self._layout(key.dtype, key.k, m), self._layout(key.dtype, key.n, m)
            result = _Heuristic()
            returned = ctypes.c_int(0)
            self._check(self._lib.cublasLtMatmulAlgoGetHeuristic(
                self._handle, plan.desc, plan.a_layout, b_layout, d_layout, d_layout,
                self._pref, 1, ctypes.byref(result), ctypes.byref(returned)), "heuristic")
            if returned.value < 1 or result.state != 0:
                raise RuntimeError(f"cuBLASLt has no algorithm for {key} at M={m}")
            found = plan.by_m[m] = (b_layout, d_layout, result.algo)
        return found

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               residual: torch.Tensor | None = None,
               epilogue: int | None = None) -> torch.Tensor:
        """``x @ weight.T (+ bias) (+ residual)`` for contiguous 2-D CUDA tensors of one dtype.

        With ``residual`` the sum is written into ``residual`` itself and returned.
        ``epilogue`` overrides the bias epilogue (experiments only).
        """
        m, k = x.shape
        n = weight.shape[0]
        if not (x.is_contiguous() and weight.is_contiguous()) or weight.shape[1] != k or \
                x.dtype != weight.dtype or (bias is not None and not bias.is_contiguous()):
            raise ValueError("linear needs contiguous x (M, K) and weight (N, K) of one dtype")
        if epilogue is None:
            epilogue = EPILOGUE_DEFAULT if bias is None else EPILOGUE_BIAS
        if residual is not None:
            if residual.shape != (m, n) or not residual.is_contiguous() or \
                    residual.dtype != x.dtype:
                raise ValueError("residual must be a contiguous (M, N) tensor of x's dtype")
            out, beta = residual, self._one
        else:
            out, beta = torch.empty(m, n, dtype=x.dtype, device=x.device), self._zero
        if m == 0:
            return out
        key = _Key(n, k, x.dtype, epilogue)
        plan = self._plan(key)
        b_layout, d_layout, algo = self._for_m(plan, key, m)
        if bias is not None:  # read at launch: one descriptor serves every call
            self._set(plan.desc, _DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
        stream = torch.cuda.current_stream(x.device).cuda_stream
        with torch.cuda.device(x.device):
            self._check(self._lib.cublasLtMatmul(
                self._handle, plan.desc, ctypes.byref(self._one),
                ctypes.c_void_p(weight.data_ptr()), plan.a_layout,
                ctypes.c_void_p(x.data_ptr()), b_layout, ctypes.byref(beta),
                ctypes.c_void_p(out.data_ptr()), d_layout, ctypes.c_void_p(out.data_ptr()),
                d_layout, ctypes.byref(algo), ctypes.c_void_p(self._workspace.data_ptr()),
                ctypes.c_size_t(WORKSPACE_BYTES), ctypes.c_void_p(stream)), "matmul")
        return out


def agrees_with_torch(lt: CublasLt, dtype: torch.dtype) -> str | None:
    """None if ``lt`` computes ``x Wᵀ + b`` and ``residual + x Wᵀ + b`` as torch's math does
    on a small case, else why. Odd sizes on purpose (M = 37, K = 96, N = 160).

    Errors are measured against the sum of the terms' magnitudes: the epilogue may round
    the product before adding the residual (as fair-esm does), so a sum that cancels is
    good to a unit of its largest term, not of itself.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    x, w, b, r = (torch.randn(*shape, generator=gen).to(dtype) for shape in
                  ((37, 96), (160, 96), (160,), (37, 160)))
    product = x.double() @ w.double().T + b.double()
    dev = lt.device
    try:
        got = lt.linear(x.to(dev), w.to(dev), b.to(dev), residual=r.to(dev)).double().cpu()
        plain = lt.linear(x.to(dev), w.to(dev), b.to(dev)).double().cpu()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    unit = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps  # one rounding
    scale = (product.abs() + r.double().abs()).clamp(min=1.0)
    err = max(float(((got - product - r.double()).abs() / scale).max()),
              float(((plain - product).abs() / scale).max()))
    return None if err <= 2 * unit else f"max relative difference {err:.3g} from torch's math"
