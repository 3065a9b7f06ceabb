"""Per-residue datasets and several layers in the output file (vnpd/output/residues.py,
vnpd/output/schema.py, through PartialOutput)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.output.test_hdf5 import META
from vnpd.output.hdf5 import PartialOutput
from vnpd.output.schema import residue_counts
from vnpd.output.verify import IncompleteOutputError, read_output, verify_output

LAYERS = (6, 3)


def residue_rows(positions: list[int], counts: np.ndarray, shape: tuple[int, ...]
                 ) -> np.ndarray:
    """Rows that encode (position, residue index), so misplacement shows."""
    parts = [np.broadcast_to((p * 100 + np.arange(counts[p]))[:, None, None].astype(np.float32),
                             (counts[p], *shape)) for p in positions]
    return np.concatenate(parts) if parts else np.zeros((0, *shape), np.float32)


def test_counts_follow_truncation_or_window() -> None:
    lengths = np.array([0, 5, 30, 31, 2000])
    assert residue_counts(lengths, 30, "truncate").tolist() == [0, 5, 30, 30, 30]
    assert residue_counts(lengths, 30, "window").tolist() == [0, 5, 30, 31, 2000]


def test_layers_and_residues_written_in_any_order_then_compacted(tmp_path: Path) -> None:
    n, dim = 6, 4
    counts = np.array([3, 0, 5, 1, 2, 4])
    path = tmp_path / "job.h5"
    out = PartialOutput.create(path, n, dim, "float16", num_layers=2, residue_counts=counts)
    assert out.row_shape == (2, dim) and out.has_residues
    # Scattered batches, positions out of order, one adjacent run.
    for batch in ([4, 0], [2, 3, 1], [5]):
        pos = np.array(batch)
        out.write_rows(pos, np.ones((len(pos), 2, dim)) * (pos[:, None, None] + 1))
        out.write_residues(pos, residue_rows(batch, counts, (2, dim)), counts[pos])
    out.flush()
    out.close()
    out = PartialOutput.open_existing(path)  # a restart: the offsets come back from the file
    assert out.has_residues and out.row_shape == (2, dim)
    out.finalize(replace(META, layers=LAYERS), quarantined=[2],
                 ids=[f"s{i}" for i in range(n)], lengths=counts)
    verify_output(path)
    emb, ids, _, attrs = read_output(path)
    assert emb.shape == (5, 2, dim) and ids == ["s0", "s1", "s3", "s4", "s5"]
    assert attrs["layers"] == list(LAYERS) and "layer" not in attrs
    with h5py.File(path, "r") as f:
        offsets, residues = f["residue_offsets"][:], f["residues"][:]
    kept = [0, 1, 3, 4, 5]
    assert offsets.tolist() == np.r_[0, np.cumsum(counts[kept])].tolist()
    assert residues.dtype == np.float16
    np.testing.assert_array_equal(residues, residue_rows(kept, counts, (2, dim)))


def test_write_residues_refuses_wrong_counts(tmp_path: Path) -> None:
    out = PartialOutput.create(tmp_path / "a.h5", 2, 4, "float32",
                               residue_counts=np.array([2, 3]))
    with pytest.raises(ValueError, match="expects 3"):
        out.write_residues(np.array([1]), np.zeros((2, 4)), np.array([2]))
    with pytest.raises(ValueError, match="shape"):
        out.write_residues(np.array([1]), np.zeros((3, 5)), np.array([3]))
    plain = PartialOutput.create(tmp_path / "b.h5", 2, 4, "float32")
    with pytest.raises(ValueError, match="no per-residue"):
        plain.write_residues(np.array([0]), np.zeros((2, 4)), np.array([2]))


def test_verify_finds_inconsistent_residue_datasets(tmp_path: Path) -> None:
    path = tmp_path / "a.h5"
    out = PartialOutput.create(path, 2, 4, "float32", residue_counts=np.array([2, 3]))
    out.write_ids_lengths(0, ["a", "b"], np.array([2, 3]))
    out.write_rows(np.arange(2), np.ones((2, 4)))
    out.finalize(META)
    verify_output(path)
    with h5py.File(path, "r+") as f:
        f["residue_offsets"][2] = 4
    with pytest.raises(IncompleteOutputError, match="residue_offsets"):
        verify_output(path)
