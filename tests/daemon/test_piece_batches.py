"""pack_pieces: a job's pieces in batches, windows of long rows apart from whole rows."""

from __future__ import annotations

import numpy as np

from vnpd.compute.windows import PieceIndex
from vnpd.daemon.piece_batches import pack_pieces


def test_windows_never_share_a_batch_with_whole_rows() -> None:
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 60, 300)
    lengths[rng.random(300) < 0.1] = rng.integers(61, 400, 1)  # long: several windows
    index = PieceIndex.plan(lengths, truncation=60, stride=30)
    every = np.arange(int(index.offsets[-1]))
    plan = pack_pieces(index, every, max_tokens=500)
    windowed = index.windowed(every)
    assert windowed.any() and (~windowed).any()
    for batch in plan:
        assert len(set(index.windowed(batch).tolist())) == 1  # all windows, or none
        assert index.tokens(batch).sum() <= 500
    assert np.array_equal(np.sort(np.concatenate(plan)), every)  # each piece once


def test_truncate_mode_packs_rows_as_before() -> None:
    from vnpd.compute.packing import pack_batches

    lengths = np.random.default_rng(6).integers(1, 2000, 500)
    index = PieceIndex.plan(lengths, truncation=1022, stride=None)
    rows = np.arange(500)
    plan = pack_pieces(index, rows, max_tokens=8192)
    want = pack_batches(lengths, 8192, 1022)
    assert [b.tolist() for b in plan] == [b.tolist() for b in want]
