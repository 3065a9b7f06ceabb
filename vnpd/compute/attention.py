"""Attention over packed sequences: pick the fastest correct backend at start.

All backends take q, k, v of shape (T, H, hd) for T packed tokens, with q already
scaled by head_dim**-0.5 (as fair-esm does), ``cu_seqlens`` (n+1,) int32 on the same
device and the longest sequence length, and return (T, H, hd). Attention never crosses
a sequence boundary.

Order of preference: flash-attn's varlen kernel if importable (docs/OPERATIONS.md); cuDNN's fused
attention through nvidia-cudnn-frontend (the optional ``cudnn`` extra) on Hopper and newer,
where it ran 1.4x faster than torch's FA2 kernel on the 3B workload (docs/BENCHMARKS.md);
torch's ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16); else an exact path
that mirrors fair-esm's math (CPU, or float32 anywhere). An optional backend is used only
after it has matched the exact path on a small pack at start.

Example::

    backend = select_attention(torch.device("cpu"), torch.float32)
    out = backend.attend(q, k, v, cu_seqlens, max_len)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch

from vnpd.compute.choices import ATTENTION_BACKENDS, AUTO

log = structlog.get_logger()

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class AttentionBackend:
    """A named attention implementation; ``name`` is recorded in every HDF5 output."""

    name: str
    attend: AttendFn


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                    max_len: int) -> torch.Tensor:
    """fair-esm's attention math, one sequence at a time: softmax(q kᵀ) v, softmax in fp32."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (H, L, hd)
        weights = torch.softmax(torch.bmm(qs, ks.transpose(1, 2)), dim=-1, dtype=torch.float32)
        out[start:end] = torch.bmm(weights.type_as(vs), vs).transpose(0, 1)
    return out


def _flash_attn_backend() -> AttentionBackend | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # ImportError, or a broken CUDA build raising at import
        return None

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
               max_len: int) -> torch.Tensor:
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=0.0,
                                      softmax_scale=1.0, causal=False)

    return AttentionBackend("flash_attn", attend)


def _torch_varlen_backend() -> AttentionBackend | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "scale" in params:
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                   max_len: int) -> torch.Tensor:
            return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=1.0)
    else:
        # Older releases (2.10) have no scale argument and apply head_dim**-0.5 themselves;
        # undo our pre-scaling so the product is the same.
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                   max_len: int) -> torch.Tensor:
            return varlen_attn(q * (q.shape[-1] ** 0.5), k, v, cu, cu, max_len, max_len)
    return AttentionBackend("torch_varlen", attend)


def plan_bucket(n: int, floor: int) -> int:
    """The smallest power of two that is at least ``n`` and ``floor``.

    cuDNN builds an execution plan per (sequence count, longest sequence), tens of ms
    each; rounding both up to a power of two leaves a handful of plans per worker.
    """
    return max(floor, 1 << max(n - 1, 0).bit_length())


def pad_cu_seqlens(cu_seqlens: torch.Tensor, count: int) -> torch.Tensor:
    """``cu_seqlens`` extended with empty sequences at the end to ``count`` sequences."""
    extra = count - (cu_seqlens.shape[0] - 1)
    if extra < 0:
        raise ValueError(f"cannot pad {cu_seqlens.shape[0] - 1} sequences down to {count}")
    return torch.cat([cu_seqlens, cu_seqlens[-1:].expand(extra)]) if extra else cu_seqlens


def _cudnn_backend(device: torch.device) -> AttentionBackend | None:
    if torch.cuda.get_device_capability(device) < (9, 0):
        return None  # on Ampere torch's FA2 kernel is as fast; cuDNN's gain is Hopper's
    try:
        import cudnn

        sdpa = cudnn.sdpa_torch  # nvidia-cudnn-frontend >= 1.32: THD layout + cu_seqlens
    except Exception:  # not installed, or a build that does not match this CUDA
        return None

    last: list[torch.Tensor] = []  # [cu, padded] of the batch in hand

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
               max_len: int) -> torch.Tensor:
        # Every layer of a batch passes the same cu_seqlens tensor: pad it once per batch.
        if not last or last[0] is not cu:
            last[:] = [cu, pad_cu_seqlens(cu, plan_bucket(cu.shape[0] - 1, 16))]
        padded = last[1]
        span = plan_bucket(max_len, 64)
        return sdpa(q, k, v, scale=1.0, cu_seqlens_q=padded, cu_seqlens_kv=padded,
                    max_seqlen_q=span, max_seqlen_kv=span)

    return AttentionBackend("cudnn", attend)


def agrees_with_exact(backend: AttentionBackend, device: torch.device, dtype: torch.dtype,
                      head_dim: int) -> str | None:
    """Run ``backend`` on a small random pack; None if it matches the exact path, else why.

    Lengths 3..300 with an odd count, 2 heads, q pre-scaled as the forward does.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    lengths = [3, 17, 130, 300, 5]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), 2, head_dim, generator=gen) for _ in range(3))
    q = q * head_dim ** -0.5
    want = exact_attention(q, k, v, cu, max(lengths))
    try:
        got = backend.attend(*(t.to(device, dtype) for t in (q, k, v)), cu.to(device),
                             max(lengths)).float().cpu()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    err = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
    return None if err <= 2e-2 else f"max abs difference {err:.3g} from the exact path"


def select_attention(device: torch.device, dtype: torch.dtype,
                     prefer: str | None = None, head_dim: int = 64) -> AttentionBackend:
    """Choose the backend for a device and compute dtype, and log the choice.

    ``prefer`` None or "auto" takes the first available in ``ATTENTION_BACKENDS`` order;
    one of "flash_attn", "cudnn", "torch_varlen", "exact" forces it, and a forced backend
    that is unavailable (or an unknown name) raises RuntimeError. ``head_dim`` is the
    model's, for the start-up check of cuDNN. The caller decides ``prefer`` (config key
    ``[model] attention``); nothing here reads the environment.
    """
    if prefer == AUTO:
        prefer = None
    fast_ok = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    candidates: list[tuple[str, Callable[[], AttentionBackend | None]]] = []
    if fast_ok:
        candidates += [("flash_attn", _flash_attn_backend),
                       ("cudnn", lambda: _checked(_cudnn_backend(device), device, dtype,
                                                  head_dim)),
                       ("torch_varlen", _torch_varlen_backend)]
    candidates.append(("exact", lambda: AttentionBackend("exact", exact_attention)))
    if prefer is not None and prefer not in ATTENTION_BACKENDS:
        raise RuntimeError(f"attention backend {prefer!r} is unknown; use auto or one of "
                           f"{', '.join(ATTENTION_BACKENDS)}")
    if prefer is not None:
        chosen = dict(candidates).get(prefer, lambda: None)()
        if chosen is None:
            raise RuntimeError(f"attention backend {prefer!r} is not available for "
                               f"{device.type}/{dtype}")
    else:
        chosen = next(b for b in (make() for _, make in candidates) if b is not None)
    log.info("attention_backend", backend=chosen.name, device=str(device), dtype=str(dtype))
    return chosen


def _checked(backend: AttentionBackend | None, device: torch.device, dtype: torch.dtype,
             head_dim: int) -> AttentionBackend | None:
    """``backend`` if it passes :func:`agrees_with_exact`, else None (logged)."""
    if backend is None:
        return None
    problem = agrees_with_exact(backend, device, dtype, head_dim)
    if problem:
        log.warning("attention_backend_rejected", backend=backend.name, reason=problem)
        return None
    return backend
