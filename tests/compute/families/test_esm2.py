"""Fidelity of the packed forward against fair-esm's own ESM2.forward (CPU, fp32).

The reference is exactly extract.py's ``--include mean``: the batch converter with
truncation 1022, ``repr_layers=[layer]``, and the mean over ``1 : min(L, 1022) + 1``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import random_sequences
from vnpd.compute.attention import exact_attention, select_attention
from vnpd.compute.families.esm2 import PackedESM2, mean_pool_residues, resolve_layer
from vnpd.compute.families.esm2_checkpoint import load_esm2
from vnpd.compute.packing import build_batch

LENGTHS = [1, 2, 3, 1021, 1022, 1023, 1500, 17, 64, 5, 300, 2, 129]


def fair_esm_means(model: torch.nn.Module, alphabet, seqs: list[str], layer: int) -> np.ndarray:
    """extract.py --include mean, one padded batch (padding exercises fair-esm's masking)."""
    converter = alphabet.get_batch_converter(1022)
    _, strs, toks = converter([(str(i), s) for i, s in enumerate(seqs)])
    with torch.no_grad():
        reps = model(toks, repr_layers=[layer])["representations"][layer]
    return np.stack([reps[i, 1:min(len(s), 1022) + 1].mean(0).numpy()
                     for i, s in enumerate(strs)])


@pytest.mark.parametrize("fixture", ["tiny_model", "wide_model"])
@pytest.mark.parametrize("layer", [-1, 1, 0, -2])
def test_packed_forward_matches_fair_esm(fixture: str, layer: int,
                                         request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    reference, alphabet = load_esm2(path)
    ours, _ = load_esm2(path)
    packed = PackedESM2(ours, select_attention(torch.device("cpu"), torch.float32))
    seqs = random_sequences(LENGTHS, seed=3)
    resolved = resolve_layer(layer, ours.num_layers)
    # All sequences in ONE pack, in a shuffled order, so boundaries and positions matter.
    order = np.random.default_rng(1).permutation(len(seqs))
    batch = build_batch(order, [seqs[i] for i in order])
    got = packed.embed(torch.from_numpy(batch.tokens), torch.from_numpy(batch.cu_seqlens),
                       batch.max_len, resolved).numpy()
    want = fair_esm_means(reference, alphabet, seqs, resolved)
    diff = np.abs(got - want[order]).max()
    assert diff <= 1e-5, f"max abs diff {diff} at layer {layer}"


def test_qkv_fusion_keeps_one_copy_and_fair_esm_forward(tiny_model: Path) -> None:
    model, alphabet = load_esm2(tiny_model)
    before = fair_esm_means(model, alphabet, random_sequences([40, 9], seed=5), 2)
    params_before = sum(p.numel() for p in model.parameters())
    packed = PackedESM2(model, select_attention(torch.device("cpu"), torch.float32))
    attn = model.layers[0].self_attn
    # q/k/v are views into the fused tensor: same storage, no second copy.
    assert attn.q_proj.weight.data_ptr() == packed.qkv_weight[0].data_ptr()
    assert attn.k_proj.weight.untyped_storage().data_ptr() == \
        packed.qkv_weight[0].untyped_storage().data_ptr()
    assert sum(p.numel() for p in model.parameters()) == params_before
    after = fair_esm_means(model, alphabet, random_sequences([40, 9], seed=5), 2)
    np.testing.assert_array_equal(before, after)


def test_mean_pool_excludes_bos_and_eos() -> None:
    x = torch.arange(7, dtype=torch.float32)[:, None].repeat(1, 2)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)  # [B r E] [B r r E]
    pooled = mean_pool_residues(x, cu)
    assert pooled.tolist() == [[1.0, 1.0], [4.5, 4.5]]


def test_exact_attention_never_crosses_sequences() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(10, 2, 4) for _ in range(3))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    full = exact_attention(q, k, v, cu, 6)
    alone = exact_attention(q[4:], k[4:], v[4:], torch.tensor([0, 6], dtype=torch.int32), 6)
    torch.testing.assert_close(full[4:], alone)


def test_resolve_layer_like_fair_esm() -> None:
    assert resolve_layer(-1, 33) == 33
    assert resolve_layer(0, 33) == 0
    assert resolve_layer(-34, 33) == 0
    with pytest.raises(ValueError):
        resolve_layer(34, 33)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu_stays_close(tiny_model: Path, dtype: torch.dtype) -> None:
    reference, alphabet = load_esm2(tiny_model)
    ours, _ = load_esm2(tiny_model)
    ours = ours.to(dtype)
    packed = PackedESM2(ours, select_attention(torch.device("cpu"), dtype))
    seqs = random_sequences([50, 200, 3, 1100], seed=9)
    batch = build_batch(np.arange(len(seqs)), seqs)
    got = packed.embed(torch.from_numpy(batch.tokens), torch.from_numpy(batch.cu_seqlens),
                       batch.max_len, 2).numpy()
    want = fair_esm_means(reference, alphabet, seqs, 2)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.999


def test_compile_mode_auto_is_eager_on_cpu_and_unknown_modes_are_refused(
        tiny_model: Path) -> None:
    model, _ = load_esm2(tiny_model)
    backend = select_attention(torch.device("cpu"), torch.float32)
    for mode in (None, "auto", "off"):
        packed = PackedESM2(model, backend, compile_mode=mode)
        assert (packed.compiled, packed.compile_mode) == (False, "")
    with pytest.raises(ValueError, match="'fast'"):
        PackedESM2(model, backend, compile_mode="fast")


@pytest.mark.parametrize("mode", ["fused", "fused-torch-gemm", "ops", "layer"])
def test_compiled_paths_match_fair_esm(mode: str, tiny_model: Path) -> None:
    """The compiled paths used on GPUs compute the same function (inductor on CPU; the
    "fused" mode's Triton kernels under Triton's interpreter)."""
    # On a GPU machine the kernels run compiled, on CUDA tensors (Triton's interpreter is
    # only set up where there is no GPU); fp32 either way, against fair-esm on CPU.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reference, alphabet = load_esm2(tiny_model)
    ours, _ = load_esm2(tiny_model)
    packed = PackedESM2(ours.to(device), select_attention(device, torch.float32),
                        compile_mode=mode)
    assert packed.compile_mode == mode
    # The residual add runs inside cuBLASLt's GEMM epilogue only where cuBLASLt exists.
    assert packed.gemm == ("cublaslt" if mode == "fused" and device.type == "cuda" else "torch")
    seqs = random_sequences([1, 30, 1100, 7], seed=13)
    for n_seqs in (len(seqs), 2):  # two token counts: the compiled code is shape-dynamic
        b = build_batch(np.arange(n_seqs), seqs[:n_seqs])
        got = packed.embed(torch.from_numpy(b.tokens).to(device),
                           torch.from_numpy(b.cu_seqlens).to(device), b.max_len, 2).cpu().numpy()
        want = fair_esm_means(reference, alphabet, seqs[:n_seqs], 2)
        assert np.abs(got - want).max() <= 1e-5



def fair_esm_representations(model: torch.nn.Module, alphabet, seqs: list[str],
                             layers: list[int], truncation: int = 1022
                             ) -> dict[int, list[np.ndarray]]:
    """fair-esm's ``repr_layers`` for each layer: per sequence its residue rows
    (min(L, truncation), D), BOS/EOS and padding excluded."""
    converter = alphabet.get_batch_converter(truncation)
    _, strs, toks = converter([(str(i), s) for i, s in enumerate(seqs)])
    with torch.no_grad():
        reps = model(toks, repr_layers=layers)["representations"]
    return {layer: [reps[layer][i, 1:min(len(s), truncation) + 1].numpy()
                    for i, s in enumerate(strs)] for layer in layers}


@pytest.mark.parametrize("layers", [(-1, 1), (1, 0, -1), (2,)])
def test_several_layers_and_residues_match_repr_layers(layers: tuple[int, ...],
                                                       tiny_model: Path) -> None:
    """One packed pass gives every layer asked for, in the order asked, equal to fair-esm's
    ``repr_layers`` (means and every residue row), with a short truncation so that long
    sequences are cheap and many of them share a pack."""
    reference, alphabet = load_esm2(tiny_model)
    ours, _ = load_esm2(tiny_model)
    packed = PackedESM2(ours, select_attention(torch.device("cpu"), torch.float32))
    truncation = 30
    seqs = random_sequences([1, 2, 29, 30, 31, 45, 3, 100, 17, 1100, 30, 5] * 2, seed=8)
    resolved = [resolve_layer(layer, ours.num_layers) for layer in layers]
    order = np.random.default_rng(2).permutation(len(seqs))
    batch = build_batch(order, [seqs[i] for i in order], truncation)
    means, residues = packed.collect(torch.from_numpy(batch.tokens),
                                     torch.from_numpy(batch.cu_seqlens), batch.max_len,
                                     resolved, residue_dtype=torch.float32)
    assert means.shape == (len(seqs), len(layers), ours.embed_dim)
    want = fair_esm_representations(reference, alphabet, seqs, sorted(set(resolved)),
                                    truncation)
    kept = [min(len(seqs[i]), truncation) for i in order]
    assert residues.shape == (sum(kept), len(layers), ours.embed_dim)
    offsets = np.r_[0, np.cumsum(kept)]
    for j, layer in enumerate(resolved):
        for slot, i in enumerate(order):
            rows = residues[offsets[slot]:offsets[slot + 1], j].numpy()
            assert np.abs(rows - want[layer][i]).max() <= 1e-5
            assert np.abs(means[slot, j].numpy() - want[layer][i].mean(0)).max() <= 1e-5


def test_resolve_layers_rejects_duplicates_and_empty() -> None:
    from vnpd.compute.families.esm2 import resolve_layers

    assert resolve_layers([-1, 20, 0], 33) == (33, 20, 0)
    with pytest.raises(ValueError, match="same layer twice"):
        resolve_layers([-1, 33], 33)
    with pytest.raises(ValueError):
        resolve_layers([], 33)
