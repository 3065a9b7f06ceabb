"""vnpd.compute.simulated: the test-only engine's mean rows and per-residue rows."""

from __future__ import annotations

import numpy as np
import pytest

from vnpd.compute.packing import build_batch
from vnpd.compute.simulated import SimulatedEngine, simulated_rows
from vnpd.compute.tokenizer import encode

SEQUENCES = ["MKV", "A", "CDEFG"]


def test_without_residues_a_result_has_only_mean_rows() -> None:
    batch = build_batch(np.arange(3), SEQUENCES)
    result = SimulatedEngine(8, 4096).submit(batch)
    assert np.array_equal(result.result(), simulated_rows(batch.tokens, batch.cu_seqlens, 8))
    assert result.residues() is None


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_residue_rows_are_token_and_position_per_residue(dtype: str) -> None:
    batch = build_batch(np.arange(3), SEQUENCES)
    result = SimulatedEngine(8, 4096).submit(batch, residues=dtype)
    rows = result.residues()
    assert rows is not None and rows.dtype == np.dtype(dtype) and rows.shape == (9, 8)
    assert result.lengths.tolist() == [3, 1, 5]
    tokens = np.concatenate([encode(s)[1:-1] for s in SEQUENCES])
    assert rows[:, 0].tolist() == tokens.tolist()
    assert rows[:, 1].tolist() == [1, 2, 3, 1, 1, 2, 3, 4, 5]
    assert not rows[:, 2:].any()
    assert np.array_equal(result.result(), simulated_rows(batch.tokens, batch.cu_seqlens, 8))
