"""Packing invariants (Hypothesis); the alphabet itself is tested in test_tokenizer.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vnpd.compute.packing import build_batch, pack_batches
from vnpd.compute.tokenizer import encode, tokens_for

lengths_st = st.lists(st.integers(min_value=1, max_value=3000), min_size=0, max_size=400)


@settings(max_examples=300, deadline=None)
@given(lengths=lengths_st, budget=st.integers(min_value=3, max_value=20000),
       truncation=st.sampled_from([1022, 100, 5]))
def test_every_sequence_exactly_once_and_within_budget(lengths: list[int], budget: int,
                                                       truncation: int) -> None:
    arr = np.array(lengths, dtype=np.int64)
    batches = pack_batches(arr, budget, truncation)
    seen = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    assert sorted(seen.tolist()) == list(range(len(lengths)))  # count in == count out
    cost = tokens_for(arr, truncation)
    for b in batches:
        assert len(b) > 0
        if len(b) > 1:
            assert cost[b].sum() <= budget
        else:
            # Over budget only alone.
            assert cost[b].sum() <= budget or cost[b[0]] > budget


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_st, budget=st.integers(min_value=1100, max_value=20000))
def test_first_fit_decreasing(lengths: list[int], budget: int) -> None:
    """No sequence could have gone into an earlier batch (first fit over the sorted order)."""
    arr = np.array(lengths, dtype=np.int64)
    batches = pack_batches(arr, budget)
    cost = tokens_for(arr)
    # Replay: at the moment each item was placed, every earlier bin lacked room.
    order = np.argsort(-cost, kind="stable")
    where = {int(p): bi for bi, b in enumerate(batches) for p in b}
    load = [0] * len(batches)
    for p in order.tolist():
        bi = where[p]
        for earlier in range(bi):
            if load[earlier] > 0:
                assert load[earlier] + cost[p] > budget
        load[bi] += int(cost[p])


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(min_value=1, max_value=1200), min_size=1, max_size=60))
def test_build_batch_restores_input_order(lengths: list[int]) -> None:
    rng = np.random.default_rng(len(lengths))
    seqs = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWYXBUZO"), n)) for n in lengths]
    for positions in pack_batches(np.array(lengths), 2048):
        batch = build_batch(positions, [seqs[i] for i in positions])
        assert batch.cu_seqlens[-1] == batch.num_tokens
        for j, pos in enumerate(batch.positions):
            toks = batch.tokens[batch.cu_seqlens[j]:batch.cu_seqlens[j + 1]]
            np.testing.assert_array_equal(toks, encode(seqs[pos]))


def test_budget_must_hold_a_minimal_sequence() -> None:
    with pytest.raises(ValueError):
        pack_batches(np.array([1]), 2)


def test_large_input_packs_densely() -> None:
    lengths = np.random.default_rng(0).integers(30, 1022, 200_000)
    batches = pack_batches(lengths, 65536)
    assert sum(len(b) for b in batches) == 200_000
    used = tokens_for(lengths).sum() / (len(batches) * 65536)
    assert used > 0.97  # first-fit decreasing leaves little room unused
