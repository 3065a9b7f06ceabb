"""Window planning and combination (vnpd/compute/windows.py): pure functions."""

from __future__ import annotations

import numpy as np
import pytest

from vnpd.compute.windows import (
    PieceIndex,
    WindowSum,
    combine_windows,
    count_windows,
    coverage,
    default_stride,
    plan_windows,
    split_into_windows,
    window_share,
)


def test_short_sequences_are_one_window_as_truncate() -> None:
    assert plan_windows(0, 30, 15) == [(0, 0)]
    assert plan_windows(1, 30, 15) == [(0, 1)]
    assert plan_windows(30, 30, 15) == [(0, 30)]


@pytest.mark.parametrize("length", [31, 40, 45, 46, 60, 61, 100, 1023, 5000])
@pytest.mark.parametrize("stride", [1, 7, 15, 29, 30])
def test_windows_are_full_cover_everything_and_end_at_the_end(length: int, stride: int) -> None:
    truncation = 30
    spans = plan_windows(length, truncation, stride)
    assert all(stop - start == truncation for start, stop in spans)
    starts = [s for s, _ in spans]
    assert starts[:-1] == list(range(0, starts[-2] + 1, stride)) if len(spans) > 2 else True
    assert starts == sorted(set(starts)) and starts[0] == 0 and spans[-1][1] == length
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))  # no gaps
    assert count_windows(np.array([length]), truncation, stride)[0] == len(spans)


def test_worked_examples() -> None:
    assert plan_windows(40, 30, 15) == [(0, 30), (10, 40)]
    assert plan_windows(60, 30, 15) == [(0, 30), (15, 45), (30, 60)]
    assert plan_windows(2000, 1022, 511) == [(0, 1022), (511, 1533), (978, 2000)]
    assert default_stride(1022) == 511 and default_stride(1) == 1


def test_bad_stride_is_refused() -> None:
    with pytest.raises(ValueError, match="stride"):
        plan_windows(100, 30, 31)
    with pytest.raises(ValueError, match="stride"):
        plan_windows(100, 30, 0)


def test_split_into_windows_flattens_in_row_order() -> None:
    pieces = split_into_windows(np.array([5, 40, 0]), 30, 15)
    assert pieces.row.tolist() == [0, 1, 1, 2]
    assert pieces.start.tolist() == [0, 0, 10, 0]
    assert pieces.stop.tolist() == [5, 30, 40, 0]
    assert pieces.lengths.tolist() == [5, 30, 30, 0]


def test_combine_is_the_mean_over_covering_windows() -> None:
    rng = np.random.default_rng(0)
    length, truncation, stride = 47, 20, 9
    spans = plan_windows(length, truncation, stride)
    rows = [rng.standard_normal((truncation, 2, 3)).astype(np.float32) for _ in spans]
    per_residue, mean = combine_windows(length, spans, rows)
    for r in range(length):
        covering = [w[r - a] for (a, b), w in zip(spans, rows) if a <= r < b]
        np.testing.assert_allclose(per_residue[r], np.mean(covering, 0), atol=1e-6)
    np.testing.assert_allclose(mean, per_residue.mean(0), atol=1e-6)
    # Order of arrival does not matter.
    acc = WindowSum(length, (2, 3))
    for (a, b), w in reversed(list(zip(spans, rows))):
        acc.add(a, b, w)
    np.testing.assert_allclose(acc.result()[0], per_residue, atol=1e-6)


def test_combine_refuses_uncovered_residues_and_bad_shapes() -> None:
    acc = WindowSum(10, (4,))
    acc.add(0, 5, np.zeros((5, 4), np.float32))
    with pytest.raises(ValueError, match="in no window"):
        acc.result()
    with pytest.raises(ValueError):
        acc.add(5, 10, np.zeros((4, 4), np.float32))


@pytest.mark.parametrize("stride", [1, 11, 15, 30])
def test_piece_index_numbers_the_windows_of_every_row(stride: int) -> None:
    """Piece offsets[r] + k is window k of row r, as split_into_windows plans it; windowed
    pieces (rows over the truncation) get consecutive slots; tokens add up per row."""
    lengths = np.array([40, 5, 30, 31, 100, 1, 0, 61])
    index = PieceIndex.plan(lengths, truncation=30, stride=stride)
    flat = split_into_windows(lengths, 30, stride)
    pieces = np.arange(index.num_pieces)
    rows, starts, stops = index.spans(pieces)
    np.testing.assert_array_equal(rows, flat.row)
    spans = [(int(a), int(b)) for a, b in zip(starts, stops)]
    assert spans == [w for n in lengths.tolist() for w in plan_windows(n, 30, stride)]
    np.testing.assert_array_equal(index.pieces_of(np.array([7, 0, 2])),
                                  np.concatenate([pieces[flat.row == r] for r in (7, 0, 2)]))
    windowed = index.windowed(pieces)
    np.testing.assert_array_equal(windowed, lengths[flat.row] > 30)
    np.testing.assert_array_equal(index.slot_of(pieces[windowed]), np.arange(windowed.sum()))
    assert index.num_slots == windowed.sum()
    last = index.is_last(pieces)
    assert last.sum() == len(lengths) and set(rows[last]) == set(range(len(lengths)))
    per_row = np.bincount(rows, weights=index.tokens(pieces), minlength=len(lengths))
    np.testing.assert_array_equal(index.row_tokens(0, len(lengths)), per_row)


def test_piece_index_in_truncate_mode_is_the_rows() -> None:
    lengths = np.array([40, 5])
    index = PieceIndex.plan(lengths, truncation=30, stride=None)
    assert not index.windows and index.num_slots == 0
    rows, starts, stops = index.spans(np.array([1, 0]))
    assert rows.tolist() == [1, 0] and starts.tolist() == [0, 0] and stops.tolist() == [5, 40]
    assert index.tokens(np.array([0, 1])).tolist() == [32, 7]
    assert not index.windowed(np.array([0, 1])).any() and index.is_last(np.array([0])).all()


def test_window_shares_add_up_to_the_mean() -> None:
    """Σ over windows of Σ_r rows / coverage, over L, is the mean of the combined rows."""
    rng = np.random.default_rng(1)
    length, truncation, stride = 73, 30, 11
    spans = plan_windows(length, truncation, stride)
    window_rows = [rng.normal(size=(b - a, 2, 5)).astype(np.float32) for a, b in spans]
    covered = coverage(length, truncation, stride)
    assert covered.min() >= 1 and covered.tolist() == np.bincount(
        np.concatenate([np.arange(a, b) for a, b in spans]), minlength=length).tolist()
    shares = [window_share(w, covered[a:b]) for (a, b), w in zip(spans, window_rows)]
    _, mean = combine_windows(length, spans, window_rows)
    np.testing.assert_allclose(np.sum(shares, axis=0) / length, mean, atol=1e-6)
