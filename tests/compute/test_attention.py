"""The attention backends (vnpd/compute/attention.py): selection, cuDNN's plan buckets, agreement.

Every backend this machine has is checked against the exact path (fair-esm's math in
fp32): on CPU that is the exact path itself, on a CUDA machine also torch's varlen
kernel, cuDNN (with the ``cudnn`` extra) and flash-attn where installed.
"""

from __future__ import annotations

import pytest
import torch

from vnpd.compute.attention import (AttentionBackend, _cudnn_backend, _flash_attn_backend,
                            _torch_varlen_backend, agrees_with_exact, exact_attention,
                            pad_cu_seqlens, plan_bucket, select_attention)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_backends() -> list[AttentionBackend]:
    found = [AttentionBackend("exact", exact_attention)]
    if DEVICE.type == "cuda":
        found += [b for b in (_flash_attn_backend(), _cudnn_backend(DEVICE),
                              _torch_varlen_backend()) if b is not None]
    return found


@pytest.mark.parametrize("n,floor,want", [(1, 16, 16), (16, 16, 16), (17, 16, 32),
                                          (139, 16, 256), (1024, 64, 1024),
                                          (1025, 64, 2048), (0, 1, 1)])
def test_plan_bucket_is_the_next_power_of_two(n: int, floor: int, want: int) -> None:
    assert plan_bucket(n, floor) == want


def test_pad_cu_seqlens_adds_empty_sequences_only() -> None:
    cu = torch.tensor([0, 3, 10, 12], dtype=torch.int32)
    padded = pad_cu_seqlens(cu, 8)
    assert padded.tolist() == [0, 3, 10, 12, 12, 12, 12, 12, 12]
    assert padded.dtype == torch.int32
    assert pad_cu_seqlens(cu, 3) is cu
    with pytest.raises(ValueError):
        pad_cu_seqlens(cu, 2)


@pytest.mark.parametrize("backend", available_backends(), ids=lambda b: b.name)
def test_every_available_backend_matches_the_exact_path(backend: AttentionBackend) -> None:
    """Many sequences in one pack, lengths 1..1024 (ESM-2's longest with BOS and EOS)."""
    dtype = torch.float32 if backend.name == "exact" else torch.bfloat16
    gen = torch.Generator().manual_seed(3)
    lengths = [1, 2, 3, 1024, 17, 300, 64, 129, 5, 1000]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), 4, 64, generator=gen) for _ in range(3))
    q = q * 64 ** -0.5
    want = exact_attention(q, k, v, cu, max(lengths))
    got = backend.attend(*(t.to(DEVICE, dtype) for t in (q, k, v)), cu.to(DEVICE),
                         max(lengths)).float().cpu()
    assert got.shape == want.shape
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert float((got - want).abs().max()) <= tol


def test_agreement_check_rejects_a_wrong_backend() -> None:
    def crosses_sequences(q, k, v, cu, max_len):  # attends over the whole pack
        whole = torch.tensor([0, q.shape[0]], dtype=torch.int32)
        return exact_attention(q, k, v, whole, q.shape[0])

    def raises(q, k, v, cu, max_len):
        raise RuntimeError("no plan for this shape")

    exact = AttentionBackend("exact", exact_attention)
    assert agrees_with_exact(exact, torch.device("cpu"), torch.float32, 16) is None
    wrong = agrees_with_exact(AttentionBackend("x", crosses_sequences), torch.device("cpu"),
                              torch.float32, 16)
    assert wrong is not None and "max abs difference" in wrong
    broken = agrees_with_exact(AttentionBackend("y", raises), torch.device("cpu"),
                               torch.float32, 16)
    assert broken == "RuntimeError: no plan for this shape"


def test_cpu_gets_the_exact_path_and_cannot_force_a_gpu_backend() -> None:
    assert select_attention(torch.device("cpu"), torch.bfloat16).name == "exact"
    for name in ("cudnn", "torch_varlen", "flash_attn"):
        with pytest.raises(RuntimeError, match=name):
            select_attention(torch.device("cpu"), torch.bfloat16, prefer=name)


def test_torch_varlen_signature_is_read() -> None:
    """This torch has the varlen module on every platform; its signature is inspected."""
    backend = _torch_varlen_backend()
    assert backend is not None and backend.name == "torch_varlen"


def test_prefer_forces_a_backend_and_the_environment_is_not_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert select_attention(DEVICE, torch.bfloat16, prefer="exact").name == "exact"
    if DEVICE.type == "cpu":
        with pytest.raises(RuntimeError, match="'cudnn' is not available"):
            select_attention(DEVICE, torch.bfloat16, prefer="cudnn")
    with pytest.raises(RuntimeError, match="'fast' is unknown"):
        select_attention(DEVICE, torch.bfloat16, prefer="fast")
    assert select_attention(torch.device("cpu"), torch.float32, prefer="auto").name == "exact"
    # VNPD_ATTENTION is the config's alias of [model] attention (tests/test_config.py);
    # the engine itself reads no environment.
    monkeypatch.setenv("VNPD_ATTENTION", "cudnn")
    assert select_attention(torch.device("cpu"), torch.bfloat16).name == "exact"
