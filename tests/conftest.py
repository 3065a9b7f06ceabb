"""Shared fixtures: small random ESM-2 checkpoints in fair-esm's format, FASTA writers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vnpd.compute.families.esm2_checkpoint import make_test_model

# The Triton kernels of the CUDA path (vnpd/compute/kernels.py) run under Triton's interpreter on
# machines without a GPU, so their tests and the "fused" forward run here too. It must be
# set before any @triton.jit function is defined, hence here, before the tests import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

RESIDUES = "ACDEFGHIKLMNPQRSTVWY"
RARE = "XBUZO"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers, dim 64, 4 heads: fast enough for end-to-end tests."""
    path, _ = make_test_model(tmp_path_factory.mktemp("models") / "esm2_tiny.pt",
                              layers=2, dim=64, heads=4, seed=7)
    return path


@pytest.fixture(scope="session")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second shape: 3 layers, dim 96, 6 heads (head_dim 16)."""
    path, _ = make_test_model(tmp_path_factory.mktemp("models") / "esm2_wide.pt",
                              layers=3, dim=96, heads=6, seed=11)
    return path


def random_sequences(lengths: list[int], seed: int = 0, rare_every: int = 7) -> list[str]:
    """Random protein sequences; every ``rare_every``-th residue is one of X B U Z O."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        chars = rng.choice(list(RESIDUES), n)
        if rare_every:
            chars[::rare_every] = rng.choice(list(RARE), len(chars[::rare_every]))
        out.append("".join(chars))
    return out


def write_fasta(path: Path, sequences: list[str], prefix: str = "seq", width: int = 60) -> Path:
    """Write records ``<prefix><i>`` with sequence lines wrapped at ``width``."""
    with open(path, "w") as fh:
        for i, s in enumerate(sequences):
            fh.write(f">{prefix}{i} test record {i}\n")
            for j in range(0, len(s), width):
                fh.write(s[j:j + width] + "\n")
    return path
