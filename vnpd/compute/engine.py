"""The compute engine: one warm model on one device, packed batches in, pooled rows out.

Used unchanged by the one-shot ``vnpd embed`` and by each daemon worker process.
:meth:`Engine.submit` launches a batch without waiting (pinned host buffers,
non-blocking copies, a CUDA event on the result), so a caller can keep two or more
batches in flight and the device never waits on the host.

Example::

    engine = Engine.load("esm2_t33_650M_UR50D", device="cuda:0", dtype="bfloat16")
    pending = engine.submit(batch)          # returns at once
    rows = pending.result()                 # (n, D) float32, row i = batch.positions[i]
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch

from vnpd.compute.attention import select_attention
from vnpd.compute.choices import COMPUTE_DTYPES
from vnpd.compute.families.esm2 import PackedESM2, resolve_layer
from vnpd.compute.families.esm2_checkpoint import load_esm2, resolve_checkpoint
from vnpd.compute.packing import TokenBatch
from vnpd.compute.tokenizer import FAIR_ESM_TRUNCATION

log = structlog.get_logger()

# The names are config's (vnpd.compute.choices); this maps them to torch dtypes.
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
assert tuple(TORCH_DTYPES) == COMPUTE_DTYPES, "vnpd.compute.choices and the engine disagree"
DEFAULT_CPU_TOKENS = 4096
MAX_AUTO_TOKENS = 1 << 17
# Peak activation bytes per token, in units of embed_dim × element size: x, h, the fused
# qkv and q/k/v, the 4·D FFN input and output, plus fp32 pooling temporaries. Measured
# peaks sit under this; it is kept generous because two batches are in flight.
_ACTIVATION_FACTOR = 24


def parse_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a torch device (``cuda`` means ``cuda:0``)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, not {device!r}")
    return dev


def auto_token_budget(device: torch.device, embed_dim: int, dtype: torch.dtype,
                      in_flight: int = 2) -> int:
    """A token budget that fits ``in_flight`` batches in the device's free memory.

    On CPU, a small fixed budget (larger batches do not run faster there).
    """
    if device.type != "cuda":
        return DEFAULT_CPU_TOKENS
    free, _ = torch.cuda.mem_get_info(device)
    per_token = _ACTIVATION_FACTOR * embed_dim * torch.finfo(dtype).bits // 8
    budget = int(0.6 * free) // (per_token * in_flight)
    return max(FAIR_ESM_TRUNCATION + 2, min(MAX_AUTO_TOKENS, budget))


@dataclass
class PendingResult:
    """A batch whose forward has been launched; :meth:`result` waits for it."""

    positions: np.ndarray
    host: torch.Tensor
    event: torch.cuda.Event | None
    started: float

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def result(self) -> np.ndarray:
        """(n, D) float32 rows, aligned with ``positions``. Waits for the device."""
        if self.event is not None:
            # Reading before the copy finished returns garbage; the event orders it.
            self.event.synchronize()
        return self.host.numpy()


class Engine:
    """A warm ESM-2 on one device, with a packed forward and mean pooling."""

    def __init__(self, model: torch.nn.Module, *, model_name: str, device: torch.device,
                 dtype: torch.dtype, layer: int, truncation: int = FAIR_ESM_TRUNCATION,
                 max_tokens: int = 0, attention: str | None = None,
                 compile_mode: str | None = None) -> None:
        self.device = device
        self.dtype = dtype
        self.model_name = model_name
        self.truncation = truncation
        self.layer = resolve_layer(layer, model.num_layers)
        self.embed_dim: int = model.embed_dim
        self.num_layers: int = model.num_layers
        model = model.to(device=device, dtype=dtype)
        backend = select_attention(device, dtype, prefer=attention,
                                   head_dim=model.embed_dim // model.attention_heads)
        self.packed = PackedESM2(model, backend, compile_mode=compile_mode)
        self.attention_backend = backend.name
        self.max_tokens = max_tokens or auto_token_budget(device, self.embed_dim, dtype)
        log.info("engine_ready", model=model_name, device=str(device), dtype=str(dtype).split(".")[-1],
                 layer=self.layer, max_tokens=self.max_tokens, attention=self.attention_backend,
                 compiled=self.packed.compiled, gemm=self.packed.gemm)

    @classmethod
    def load(cls, checkpoint: str, *, device: str = "cpu", dtype: str = "float32",
             layer: int = -1, truncation: int = FAIR_ESM_TRUNCATION, max_tokens: int = 0,
             attention: str | None = None, compile_mode: str | None = None) -> "Engine":
        """Resolve and load a checkpoint (never downloads) and build an engine on ``device``.

        ``attention`` and ``compile_mode`` are the config's ``[model]`` keys of those names
        (None = "auto"): see ``select_attention`` and ``PackedESM2``. Raises
        ModelNotFoundError/CheckpointError (the file), ValueError (a bad name or dtype) and
        RuntimeError (no CUDA, or a forced attention backend that is unavailable).
        """
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, not {dtype!r}")
        dev = parse_device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        path: Path = resolve_checkpoint(checkpoint)
        model, _ = load_esm2(path)
        return cls(model, model_name=checkpoint, device=dev, dtype=TORCH_DTYPES[dtype], layer=layer,
                   truncation=truncation, max_tokens=max_tokens, attention=attention,
                   compile_mode=compile_mode)

    def submit(self, batch: TokenBatch) -> PendingResult:
        """Launch the forward for ``batch`` and return without waiting for the device."""
        started = time.monotonic()
        if self.device.type != "cuda":
            tokens = torch.from_numpy(batch.tokens)
            cu = torch.from_numpy(batch.cu_seqlens)
            pooled = self.packed.embed(tokens, cu, batch.max_len, self.layer)
            return PendingResult(batch.positions, pooled, None, started)
        tokens_h = torch.from_numpy(batch.tokens).pin_memory()
        cu_h = torch.from_numpy(batch.cu_seqlens).pin_memory()
        tokens = tokens_h.to(self.device, non_blocking=True)
        cu = cu_h.to(self.device, non_blocking=True)
        pooled = self.packed.embed(tokens, cu, batch.max_len, self.layer)
        host = torch.empty(pooled.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(pooled, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingResult(batch.positions, host, event, started)

    def embed_batch(self, batch: TokenBatch) -> np.ndarray:
        """Synchronous convenience: (n, D) float32 rows aligned with ``batch.positions``."""
        return self.submit(batch).result()

    def warmup(self) -> None:
        """Run small batches so compilation and kernel selection happen before real work."""
        from vnpd.compute.packing import build_batch

        for lengths in ((5,), (30, 200, 7)):
            seqs = ["A" * n for n in lengths]
            self.embed_batch(build_batch(np.arange(len(seqs)), seqs, self.truncation))
