"""The compute engine: one warm model on one device, packed batches in, pooled rows out.

Used unchanged by the one-shot ``vnpd embed`` and by each daemon worker process.
:meth:`Engine.submit` launches a batch without waiting (pinned host buffers,
non-blocking copies, a CUDA event on the result), so a caller can keep two or more
batches in flight and the device never waits on the host.

Example::

    engine = Engine.load("esm2_t33_650M_UR50D", device="cuda:0", dtype="bfloat16")
    pending = engine.submit(batch)          # returns at once
    rows = pending.result()                 # (n, D) float32, row i = batch.positions[i]

    engine = Engine.load(..., layers=(-1, 20))            # several layers, one pass
    pending = engine.submit(batch, residues="float16")
    pending.result()                        # (n, 2, D) float32
    pending.residues()                      # (R, 2, D) float16, see PendingResult.residues

Per-residue rows leave the device on a side stream (copy_stream): the compute stream
records an event after the forward, the copy stream waits on it and copies into pinned
host memory, and its own event tells the host when the rows may be read.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch

from vnpd.compute.attention import select_attention
from vnpd.compute.choices import COMPUTE_DTYPES
from vnpd.compute.families.esm2 import PackedESM2, resolve_layers
from vnpd.compute.families.esm2_checkpoint import load_esm2, resolve_checkpoint
from vnpd.compute.packing import TokenBatch
from vnpd.compute.tokenizer import FAIR_ESM_TRUNCATION

log = structlog.get_logger()

# The names are config's (vnpd.compute.choices); this maps them to torch dtypes.
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
assert tuple(TORCH_DTYPES) == COMPUTE_DTYPES, "vnpd.compute.choices and the engine disagree"
RESIDUE_DTYPES = ("float32", "float16")  # numpy-representable: the output dtypes
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
    residue_host: torch.Tensor | None = None
    residue_event: torch.cuda.Event | None = None
    lengths: np.ndarray | None = None  # residues per sequence, for the residue offsets

    def result(self) -> np.ndarray:
        """(n, D) float32 rows, or (n, n_layers, D) with several layers, aligned with
        ``positions``. Waits for the device."""
        if self.event is not None:
            # Reading before the copy finished returns garbage; the event orders it.
            self.event.synchronize()
        return self.host.numpy()

    def residues(self) -> np.ndarray | None:
        """Residue rows (R, D) or (R, n_layers, D) in the dtype asked for at submit, or
        None if none were asked for. Sequence i's rows are ``rows[o[i]:o[i+1]]`` with
        ``o = residue_offsets()``: its residues in order, BOS/EOS excluded, up to
        truncation. Waits for the copy stream."""
        if self.residue_host is None:
            return None
        if self.residue_event is not None:
            self.residue_event.synchronize()
        return self.residue_host.numpy()

    def residue_offsets(self) -> np.ndarray:
        """(n+1,) int64 offsets of each sequence's rows in :meth:`residues`."""
        assert self.lengths is not None
        offsets = np.zeros(self.lengths.shape[0] + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        return offsets


class Engine:
    """A warm ESM-2 on one device, with a packed forward and mean pooling."""

    def __init__(self, model: torch.nn.Module, *, model_name: str, device: torch.device,
                 dtype: torch.dtype, layer: int = -1, truncation: int = FAIR_ESM_TRUNCATION,
                 max_tokens: int = 0, attention: str | None = None,
                 compile_mode: str | None = None,
                 layers: Sequence[int] | None = None) -> None:
        self.device = device
        self.dtype = dtype
        self.model_name = model_name
        self.truncation = truncation
        # ``layers`` (several, one pass) wins over ``layer``; both in fair-esm numbering.
        self.layers: tuple[int, ...] = resolve_layers(
            (layer,) if layers is None else tuple(layers), model.num_layers)
        self.layer = self.layers[0]
        self.embed_dim: int = model.embed_dim
        self.num_layers: int = model.num_layers
        model = model.to(device=device, dtype=dtype)
        backend = select_attention(device, dtype, prefer=attention,
                                   head_dim=model.embed_dim // model.attention_heads)
        self.packed = PackedESM2(model, backend, compile_mode=compile_mode)
        self.attention_backend = backend.name
        self.max_tokens = max_tokens or auto_token_budget(device, self.embed_dim, dtype)
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        log.info("engine_ready", model=model_name, device=str(device), dtype=str(dtype).split(".")[-1],
                 layers=list(self.layers), max_tokens=self.max_tokens, attention=self.attention_backend,
                 compiled=self.packed.compiled, gemm=self.packed.gemm)

    @classmethod
    def load(cls, checkpoint: str, *, device: str = "cpu", dtype: str = "float32",
             layer: int = -1, truncation: int = FAIR_ESM_TRUNCATION, max_tokens: int = 0,
             attention: str | None = None, compile_mode: str | None = None,
             layers: Sequence[int] | None = None) -> "Engine":
        """Resolve and load a checkpoint (never downloads) and build an engine on ``device``.

        ``attention`` and ``compile_mode`` are the config's ``[model]`` keys of those names
        (None = "auto"): see ``select_attention`` and ``PackedESM2``. ``layers``: the
        representation layers to pool (default ``[layer]``). Raises
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
                   compile_mode=compile_mode, layers=layers)

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Shape of one sequence's pooled row: (D,) for one layer, (n_layers, D) for more."""
        return (self.embed_dim,) if len(self.layers) == 1 else (len(self.layers), self.embed_dim)

    def submit(self, batch: TokenBatch, residues: str | None = None) -> PendingResult:
        """Launch the forward for ``batch`` and return without waiting for the device.

        ``residues``: also return every residue's rows, in this dtype ("float32" or
        "float16", cast on the device), copied off it on the side stream.
        """
        started = time.monotonic()
        residue_dtype = None
        if residues is not None:
            if residues not in RESIDUE_DTYPES:
                raise ValueError(f"residues must be one of {RESIDUE_DTYPES}, not {residues!r}")
            residue_dtype = TORCH_DTYPES[residues]
        lengths = (np.diff(batch.cu_seqlens).astype(np.int64) - 2) if residues else None
        if self.device.type != "cuda":
            tokens = torch.from_numpy(batch.tokens)
            cu = torch.from_numpy(batch.cu_seqlens)
            pooled, rows = self.packed.collect(tokens, cu, batch.max_len, self.layers,
                                               residue_dtype)
            return PendingResult(batch.positions, self._shaped(pooled), None, started,
                                 None if rows is None else self._shaped(rows), None, lengths)
        tokens_h = torch.from_numpy(batch.tokens).pin_memory()
        cu_h = torch.from_numpy(batch.cu_seqlens).pin_memory()
        tokens = tokens_h.to(self.device, non_blocking=True)
        cu = cu_h.to(self.device, non_blocking=True)
        pooled, rows = self.packed.collect(tokens, cu, batch.max_len, self.layers,
                                           residue_dtype)
        residue_host = residue_event = None
        if rows is not None:
            residue_host, residue_event = self._copy_aside(self._shaped(rows))
        pooled = self._shaped(pooled)
        host = torch.empty(pooled.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(pooled, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingResult(batch.positions, host, event, started, residue_host,
                             residue_event, lengths)

    def _shaped(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, 0] if len(self.layers) == 1 else t

    def _copy_aside(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Copy device ``rows`` into pinned host memory on the copy stream, once the
        compute stream has produced them; the returned event marks the copy done."""
        assert self.copy_stream is not None
        produced = torch.cuda.Event()
        produced.record()
        self.copy_stream.wait_event(produced)
        host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        with torch.cuda.stream(self.copy_stream):
            host.copy_(rows, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        # The allocator must not hand rows' memory to the compute stream before the copy.
        rows.record_stream(self.copy_stream)
        return host, copied

    def embed_batch(self, batch: TokenBatch) -> np.ndarray:
        """Synchronous convenience: (n, D) (or (n, n_layers, D)) float32 rows aligned with
        ``batch.positions``."""
        return self.submit(batch).result()

    def warmup(self) -> None:
        """Run small batches so compilation and kernel selection happen before real work."""
        from vnpd.compute.packing import build_batch

        for lengths in ((5,), (30, 200, 7)):
            seqs = ["A" * n for n in lengths]
            self.embed_batch(build_batch(np.arange(len(seqs)), seqs, self.truncation))
