"""Engine.submit with several layers and per-residue rows (vnpd/compute/engine.py).

On a GPU machine this also checks the side-stream copy of the residue rows: many batches
in flight, read in order, each against the CPU engine (reading before the copy stream is
done would give garbage rows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import random_sequences
from vnpd.compute.engine import Engine
from vnpd.compute.packing import build_batch, pack_batches

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("residues", ["float32", "float16"])
def test_submit_returns_layers_and_residue_rows(device: str, residues: str,
                                                tiny_model: Path) -> None:
    reference = Engine.load(str(tiny_model), layers=(-1, 0, 1), truncation=40)
    engine = Engine.load(str(tiny_model), device=device, layers=(-1, 0, 1), truncation=40,
                         max_tokens=300)
    assert engine.layers == (2, 0, 1) and engine.row_shape == (3, 64)
    lengths = [1, 39, 40, 41, 200, 7, 3, 90, 12, 40] * 4
    seqs = random_sequences(lengths, seed=4)
    batches = [build_batch(p, [seqs[i] for i in p], 40)
               for p in pack_batches(np.array(lengths), 300, 40)]
    pending = [engine.submit(b, residues=residues) for b in batches]  # all in flight
    for batch, done in zip(batches, pending):
        want = reference.submit(batch, residues="float32")
        means, rows = done.result(), done.residues()
        assert means.shape == (len(batch.positions), 3, 64) and means.dtype == np.float32
        assert rows.dtype == np.dtype(residues)
        np.testing.assert_array_equal(done.residue_offsets(), want.residue_offsets())
        assert done.residue_offsets()[-1] == rows.shape[0]
        tol = 1e-5 if residues == "float32" else 1e-2
        np.testing.assert_allclose(rows, want.residues(), atol=tol, rtol=tol)
        np.testing.assert_allclose(means, want.result(), atol=1e-5)


def test_one_layer_keeps_the_old_shapes(tiny_model: Path) -> None:
    engine = Engine.load(str(tiny_model), layer=1)
    batch = build_batch(np.arange(2), ["ACDE", "KLMNPQ"])
    done = engine.submit(batch, residues="float32")
    assert done.result().shape == (2, 64) and done.residues().shape == (10, 64)
    assert engine.submit(batch).residues() is None
    with pytest.raises(ValueError, match="residues"):
        engine.submit(batch, residues="bfloat16")
