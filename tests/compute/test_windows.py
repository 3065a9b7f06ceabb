"""Window planning and combination (vnpd/compute/windows.py): pure functions."""

from __future__ import annotations

import numpy as np
import pytest

from vnpd.compute.windows import (WindowSum, combine_windows, count_windows, default_stride,
                                  plan_windows, split_into_windows)


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
