"""Attention over packed sequences: pick the fastest correct backend at start.

All backends take q, k, v of shape (T, H, hd) for T packed tokens, with q already
scaled by head_dim**-0.5 (as fair-esm does), ``cu_seqlens`` (n+1,) int32 on the same
device and the longest sequence length, and return (T, H, hd). Attention never crosses
a sequence boundary.

Order of preference (DESIGN): flash-attn's varlen kernel if importable, torch's
``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16), else an exact path that
mirrors fair-esm's math (CPU, or float32 anywhere).

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


def select_attention(device: torch.device, dtype: torch.dtype,
                     prefer: str | None = None) -> AttentionBackend:
    """Choose the backend for a device and compute dtype, and log the choice.

    ``prefer`` forces one of "flash_attn", "torch_varlen", "exact" (for benchmarks and
    tests); a forced backend that is unavailable raises RuntimeError.
    """
    fast_ok = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    candidates: list[tuple[str, Callable[[], AttentionBackend | None]]] = []
    if fast_ok:
        candidates += [("flash_attn", _flash_attn_backend), ("torch_varlen", _torch_varlen_backend)]
    candidates.append(("exact", lambda: AttentionBackend("exact", exact_attention)))
    if prefer is not None:
        chosen = dict(candidates).get(prefer, lambda: None)()
        if chosen is None:
            raise RuntimeError(f"attention backend {prefer!r} is not available for "
                               f"{device.type}/{dtype}")
    else:
        chosen = next(b for b in (make() for _, make in candidates) if b is not None)
    log.info("attention_backend", backend=chosen.name, device=str(device), dtype=str(dtype))
    return chosen
