"""The packed ESM-2 forward pass over fair-esm's own modules and weights.

Sequences are concatenated into one (T,) token vector with ``cu_seqlens`` offsets; there
is no padding. The math follows fair-esm ``ESM2.forward`` line by line (read the two side
by side):

- embeddings × 0.88 token-dropout rescale (no mask tokens at inference);
- each layer: pre-LN attention with rotary positions restarting at 0 for every sequence
  (fp32 cos/sin tables), q pre-scaled by head_dim**-0.5, exact erf GELU in the FFN;
- the last layer goes through ``emb_layer_norm_after``; intermediate layers are raw;
- mean over residues 1..L (BOS/EOS excluded), on the device, in fp32; several layers
  come out of one pass, each pooled (and its residue rows gathered) as it is produced.

The q/k/v projections are fused into one GEMM. Their weights stay single: fair-esm's
``q_proj/k_proj/v_proj`` parameters are re-pointed at row slices of the fused tensor.

Example::

    packed = PackedESM2(model, select_attention(device, dtype))
    pooled = packed.embed(tokens, cu_seqlens, max_len, layer=model.num_layers)  # (n, D) fp32
    means, residues = packed.collect(tokens, cu_seqlens, max_len, (33, 20),
                                     residue_dtype=torch.float16)  # (n, 2, D), (R, 2, D)
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
import torch
import torch.nn.functional as F

from vnpd.compute.choices import AUTO, COMPILE_MODES, COMPILE_OFF

if TYPE_CHECKING:  # annotations only: the engine picks the backend and hands it in
    from vnpd.compute.attention import AttentionBackend

log = structlog.get_logger()

TOKEN_DROPOUT_SCALE = 1 - 0.15 * 0.8  # fair-esm: (1 - mask_ratio_train) / (1 - 0 observed)


def resolve_layer(layer: int, num_layers: int) -> int:
    """fair-esm's layer indexing: 0 = embeddings, num_layers = last; negatives count back."""
    if not -(num_layers + 1) <= layer <= num_layers:
        raise ValueError(f"layer {layer} out of range for a {num_layers}-layer model "
                         f"(valid: {-(num_layers + 1)}..{num_layers})")
    return layer % (num_layers + 1)


def resolve_layers(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Each of ``layers`` resolved (:func:`resolve_layer`), in the given order.

    Raises ValueError on an empty list, a layer out of range, or two entries that name
    the same layer (e.g. -1 and 33 on a 33-layer model).
    """
    resolved = tuple(resolve_layer(int(layer), num_layers) for layer in layers)
    if not resolved:
        raise ValueError("at least one layer is needed")
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"layers {list(layers)} name the same layer twice "
                         f"(resolved: {list(resolved)})")
    return resolved


def rotary_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin rows (T, head_dim) for per-token positions, as fair-esm's RotaryEmbedding."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=positions.device,
                                             dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def split_qkv_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                     scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T, 3D) fused projection -> q (scaled, rotated), k (rotated), v, each (T, H, hd).

    Rotation happens in fp32 (the tables are fp32) and casts back once.
    """
    t = qkv.shape[0]
    q, k, v = qkv.view(t, 3, heads, -1).unbind(1)
    c, s = cos[:, None, :], sin[:, None, :]
    qf = q.float() * scaling
    kf = k.float()
    q = (qf * c + rotate_half(qf) * s).to(qkv.dtype)
    k = (kf * c + rotate_half(kf) * s).to(qkv.dtype)
    return q, k, v.contiguous()


def add_layer_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add followed by a layer norm; returns (x + delta, LN(x + delta))."""
    x = x + delta
    return x, F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def linear_add_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                    add_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = add_layer_norm,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A projection added to the residual stream, then normalised: (x', LN(x')).

    x' = x + (y Wᵀ + b), the projection rounded to the compute dtype first, as fair-esm.
    """
    return add_norm(x, F.linear(y, weight, bias), ln_weight, ln_bias, eps)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact erf GELU, as ``esm.modules.gelu``."""
    return F.gelu(x, approximate="none")


def transformer_layer(x: torch.Tensor, h: torch.Tensor, w: tuple[torch.Tensor, ...],
                      eps: tuple[float, float], cos: torch.Tensor, sin: torch.Tensor,
                      cu_seqlens: torch.Tensor, max_len: int, heads: int, scaling: float,
                      attend: Callable[..., torch.Tensor],
                      split: Callable[..., tuple[torch.Tensor, ...]] = split_qkv_rotary,
                      proj_add_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
                      = linear_add_norm,
                      act: Callable[[torch.Tensor], torch.Tensor] = gelu,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One ESM-2 layer on packed tokens, fair-esm's TransformerLayer.forward step by step.

    ``h`` is this layer's self_attn_layer_norm(x); returns (x', LN_next(x')) where LN_next
    is the next layer's self_attn_layer_norm (or emb_layer_norm_after after the last).
    ``w`` = (qkv_w, qkv_b, out_w, out_b, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b,
    next_w, next_b); ``eps`` = (final_layer_norm eps, next norm eps). ``proj_add_norm``
    may update ``x`` in place (the fused CUDA path adds the residual inside the GEMM).
    """
    qkv_w, qkv_b, out_w, out_b, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, next_w, next_b = w
    total = x.shape[0]
    q, k, v = split(F.linear(h, qkv_w, qkv_b), cos, sin, heads, scaling)
    o = attend(q, k, v, cu_seqlens, max_len).reshape(total, -1)
    x, h = proj_add_norm(x, o, out_w, out_b, ln_w, ln_b, eps[0])
    f = act(F.linear(h, fc1_w, fc1_b))
    return proj_add_norm(x, f, fc2_w, fc2_b, next_w, next_b, eps[1])


class PackedESM2:
    """Packed (varlen) inference over a fair-esm ``ESM2`` module, sharing its weights."""

    def __init__(self, model: torch.nn.Module, attention: AttentionBackend, *,
                 compile_mode: str | None = None) -> None:
        """Share ``model``'s weights (fused q/k/v) and set up the forward.

        ``compile_mode`` (config ``[model] compile_mode``): None or "auto" = "fused" on
        CUDA and eager on the CPU; "off" = eager; or one of ``COMPILE_MODES``, used on any
        device. Raises ValueError for another value.
        """
        self.model = model
        self.attention = attention
        self.num_layers: int = model.num_layers
        self.heads: int = model.attention_heads
        self.head_dim: int = model.embed_dim // model.attention_heads
        self.scaling: float = self.head_dim ** -0.5
        self.qkv_weight: list[torch.Tensor] = []
        self.qkv_bias: list[torch.Tensor] = []
        self._fuse_qkv()
        device = next(model.parameters()).device
        if compile_mode is None or compile_mode == AUTO:
            compile_mode = "fused" if device.type == "cuda" else COMPILE_OFF
        if compile_mode != COMPILE_OFF and compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be {AUTO}, {COMPILE_OFF} or one of "
                             f"{', '.join(COMPILE_MODES)}, not {compile_mode!r}")
        # "fused" (the default): Triton kernels (vnpd/compute/kernels.py) for the rotary (in
        # place; q/k/v are read as views of the fused projection), the layer norms and
        # GELU, with the residual adds inside cuBLASLt's GEMM epilogue (vnpd/compute/cublaslt.py).
        # "fused-torch-gemm": the same kernels with torch's GEMMs, the residual add in the
        # layer-norm kernel (the fallback when cuBLASLt cannot be called).
        # "ops" compiles rotary+split, residual+LN and GELU with inductor, one pass
        # each; "layer" compiles the whole layer (GEMMs as cuBLAS calls);
        # "layer-autotune" also lets inductor pick Triton GEMMs with fused epilogues.
        # dynamic=True: the token count T varies by batch.
        self.compile_mode = "" if compile_mode == COMPILE_OFF else compile_mode
        self.compiled = bool(self.compile_mode)
        self.gemm = "torch"  # or "cublaslt": who runs the residual GEMMs
        self._layer: Callable[..., tuple[torch.Tensor, torch.Tensor]] = transformer_layer
        self._pieces: dict[str, Callable[..., object]] = {}
        if self.compile_mode.startswith("fused") and importlib.util.find_spec("triton") is None:
            log.warning("triton_missing", fallback="ops")  # torch's CUDA wheels ship it
            self.compile_mode = "ops"
        if self.compile_mode.startswith("fused"):
            from vnpd.compute import kernels  # Triton: CUDA machines only

            self._pieces = {"split": kernels.rotate_qk_inplace, "act": kernels.gelu,
                            "proj_add_norm": functools.partial(
                                linear_add_norm, add_norm=kernels.add_layer_norm)}
            if self.compile_mode == "fused":
                fused = _cublaslt_add_norm(device, next(model.parameters()).dtype)
                if fused is not None:
                    self._pieces["proj_add_norm"] = fused
                    self.gemm = "cublaslt"
        elif self.compile_mode == "ops":
            self._pieces = {"split": torch.compile(split_qkv_rotary, dynamic=True),
                            "proj_add_norm": functools.partial(
                                linear_add_norm,
                                add_norm=torch.compile(add_layer_norm, dynamic=True)),
                            "act": torch.compile(gelu, dynamic=True)}
        elif self.compile_mode:
            mode = "max-autotune-no-cudagraphs" if self.compile_mode == "layer-autotune" else None
            self._layer = torch.compile(transformer_layer, dynamic=True, mode=mode)
        self._weights = [self._layer_weights(i) for i in range(self.num_layers)]

    def _layer_weights(self, i: int) -> tuple[tuple[torch.Tensor, ...], tuple[float, float]]:
        block = self.model.layers[i]
        nxt = (self.model.layers[i + 1].self_attn_layer_norm if i + 1 < self.num_layers
               else self.model.emb_layer_norm_after)
        fin = block.final_layer_norm
        return ((self.qkv_weight[i], self.qkv_bias[i], block.self_attn.out_proj.weight,
                 block.self_attn.out_proj.bias, fin.weight, fin.bias, block.fc1.weight,
                 block.fc1.bias, block.fc2.weight, block.fc2.bias, nxt.weight, nxt.bias),
                (fin.eps, nxt.eps))

    def _fuse_qkv(self) -> None:
        for layer in self.model.layers:
            attn = layer.self_attn
            with torch.no_grad():
                weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
                bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            d = attn.embed_dim
            for i, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
                # Views into the fused tensors: fair-esm's own forward still works, one copy.
                proj.weight.data = weight[i * d:(i + 1) * d]
                proj.bias.data = bias[i * d:(i + 1) * d]
            self.qkv_weight.append(weight)
            self.qkv_bias.append(bias)

    @torch.inference_mode()
    def embed(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
              layer: int) -> torch.Tensor:
        """Mean-pooled representations (n, D) in fp32 for packed sequences.

        ``tokens`` (T,) int64 with BOS/EOS per sequence, ``cu_seqlens`` (n+1,) int32 on the
        same device, ``max_len`` the longest sequence in tokens, ``layer`` already resolved
        (0..num_layers).
        """
        return self.collect(tokens, cu_seqlens, max_len, (layer,))[0][:, 0]

    @torch.inference_mode()
    def collect(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                layers: Sequence[int], residue_dtype: torch.dtype | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Means (n, n_layers, D) fp32 and, with ``residue_dtype``, residue rows
        (R, n_layers, D) in that dtype, of the resolved ``layers`` in their given order.

        One forward pass, up to the deepest layer asked for. Each layer's representation
        is pooled (and its residue rows gathered) into preallocated buffers as soon as it
        is produced: nothing else of it is kept, and the next layer (which may update it
        in place) runs after. Residue rows are those of positions 1..L-2 of each packed
        sequence (BOS and EOS excluded), sequence after sequence, R = T - 2n.
        """
        total, n = tokens.shape[0], cu_seqlens.shape[0] - 1
        index = ResidueIndex.of(cu_seqlens, total)
        dim = self.model.embed_dim
        pooled = torch.empty(n, len(layers), dim, device=tokens.device, dtype=torch.float32)
        residues = (None if residue_dtype is None else
                    torch.empty(index.rows.shape[0], len(layers), dim, device=tokens.device,
                                dtype=residue_dtype))
        slots: dict[int, list[int]] = {}
        for j, layer in enumerate(layers):
            slots.setdefault(layer, []).append(j)

        def take(layer: int, x: torch.Tensor) -> None:
            rows = x.index_select(0, index.rows)
            sums = torch.zeros(n, dim, device=x.device, dtype=torch.float32)
            sums.index_add_(0, index.seq_of_row, rows.float())
            for j in slots[layer]:
                pooled[:, j] = sums / index.counts[:, None]
                if residues is not None:
                    residues[:, j] = rows

        self.forward_layers(tokens, cu_seqlens, max_len, set(slots), take)
        return pooled, residues

    def forward_layers(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                       layers: set[int], visit: Callable[[int, torch.Tensor], None]) -> None:
        """Run the packed forward up to ``max(layers)``, calling ``visit(layer, x)`` with
        each requested layer's per-token representation (T, D) as it is produced,
        exactly as fair-esm returns it. ``x`` is only valid during the call."""
        model = self.model
        total = tokens.shape[0]
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        starts = torch.repeat_interleave(cu_seqlens[:-1], lengths, output_size=total)
        positions = torch.arange(total, device=tokens.device, dtype=torch.int32) - starts
        cos, sin = rotary_tables(positions, self.head_dim)  # once per batch, all layers

        x = model.embed_scale * model.embed_tokens(tokens)
        if model.token_dropout:
            x = x * TOKEN_DROPOUT_SCALE
        if 0 in layers:
            visit(0, x)
        deepest = max(layers)
        if deepest == 0:
            return

        first = model.layers[0].self_attn_layer_norm
        h = F.layer_norm(x, first.normalized_shape, first.weight, first.bias, first.eps)
        for i in range(deepest):
            weights, eps = self._weights[i]
            x, h = self._layer(x, h, weights, eps, cos, sin, cu_seqlens, max_len, self.heads,
                               self.scaling, self.attention.attend, **self._pieces)
            if i + 1 in layers:
                # After the last layer fair-esm applies emb_layer_norm_after; the
                # intermediate layers are raw.
                visit(i + 1, h if i + 1 == self.num_layers else x)


@dataclass(frozen=True)
class ResidueIndex:
    """Where the residues of packed sequences are: ``rows`` (R,) token indices of positions
    1..L-2 of each sequence (BOS/EOS excluded), ``seq_of_row`` (R,) their sequence, and
    ``counts`` (n,) fp32 residues per sequence (at least 1, so a mean never divides by 0)."""

    rows: torch.Tensor
    seq_of_row: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor, total: int) -> "ResidueIndex":
        """The index of a packed batch of ``total`` tokens; no host-device sync."""
        n = cu_seqlens.shape[0] - 1
        residues = (cu_seqlens[1:] - cu_seqlens[:-1]).long() - 2
        # Residue row r of sequence s is token r + 2s + 1 (s BOS/EOS pairs before it,
        # plus its own BOS); R = T - 2n is known on the host.
        seq_of_row = torch.repeat_interleave(torch.arange(n, device=cu_seqlens.device),
                                             residues, output_size=total - 2 * n)
        rows = torch.arange(total - 2 * n, device=cu_seqlens.device) + 2 * seq_of_row + 1
        return cls(rows, seq_of_row, residues.clamp(min=1).to(torch.float32))


def _cublaslt_add_norm(device: torch.device, dtype: torch.dtype
                       ) -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """``proj_add_norm`` with the residual add in cuBLASLt's epilogue, or None (logged)
    when cuBLASLt cannot be called here or disagrees with torch's math on a small case."""
    if device.type != "cuda":
        return None  # CPU (the tests run the Triton kernels under the interpreter there)
    from vnpd.compute import cublaslt, kernels

    try:
        lt = cublaslt.CublasLt(device)
    except Exception as exc:  # no libcublasLt in the process, or a symbol missing
        problem: str | None = f"{type(exc).__name__}: {exc}"[:300]
    else:
        problem = cublaslt.agrees_with_torch(lt, dtype)
    if problem:
        log.warning("cublaslt_rejected", reason=problem, fallback="fused-torch-gemm")
        return None

    def proj_add_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        x = lt.linear(y, weight, bias, residual=x)  # x += y Wᵀ + b, in place
        return x, kernels.layer_norm(x, ln_weight, ln_bias, eps)

    return proj_add_norm


def mean_pool_residues(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Mean over positions 1..L-2 of each packed sequence (BOS and EOS excluded), fp32."""
    index = ResidueIndex.of(cu_seqlens, x.shape[0])
    sums = torch.zeros(cu_seqlens.shape[0] - 1, x.shape[1], device=x.device,
                       dtype=torch.float32)
    sums.index_add_(0, index.seq_of_row, x.index_select(0, index.rows).float())
    return sums / index.counts[:, None]
