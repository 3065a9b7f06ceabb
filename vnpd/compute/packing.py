"""Token-budget packing and batch tensors.

A sequence of L residues costs ``min(L, truncation) + 2`` tokens (BOS and EOS count;
``vnpd.compute.tokenizer`` holds the alphabet and that cost).
:func:`pack_batches` groups sequence positions into batches whose token sum stays within
the budget, by first-fit over the sequences sorted longest first (first-fit decreasing).
A sequence that alone exceeds the budget gets a batch of its own. Every position appears
exactly once; callers restore input order from the positions carried by each batch.

Example::

    pack_batches(np.array([5, 900, 30]), max_tokens=940)
    # [array([1, 2]), array([0])]   (902 + 32 tokens fit; + 7 would not)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vnpd.compute.tokenizer import (FAIR_ESM_TRUNCATION, encode_packed, encode_spans,
                                   tokens_for)


def pack_batches(lengths: np.ndarray, max_tokens: int,
                 truncation: int = FAIR_ESM_TRUNCATION) -> list[np.ndarray]:
    """First-fit-decreasing packing of sequence positions into token-budget batches.

    ``lengths`` are residue counts (before truncation). Returns a list of int64 position
    arrays; each position 0..n-1 appears exactly once; a batch exceeds ``max_tokens`` only
    when it holds a single sequence that is over the budget by itself. Runs in numpy, one
    bin at a time, for up to 64 bins (a scheduler window), else in O(n log bins) with a
    max-tree over the bins' free space; both give the same bins.
    """
    if max_tokens < 3:
        raise ValueError(f"max_tokens must be at least 3, not {max_tokens}")
    cost = tokens_for(lengths, truncation)
    n = cost.shape[0]
    if n == 0:
        return []
    order = np.argsort(-cost, kind="stable")
    if int(cost.sum()) <= _BIN_BY_BIN_MAX_BINS * max_tokens:
        return _first_fit_bin_by_bin(order, cost[order], max_tokens)
    return _first_fit_tree(order, cost[order], max_tokens)


# Few bins (a scheduler window holds about 8 budgets): fill one bin at a time, in numpy.
_BIN_BY_BIN_MAX_BINS = 64


def _first_fit_bin_by_bin(order: np.ndarray, cost: np.ndarray,
                          max_tokens: int) -> list[np.ndarray]:
    """First-fit decreasing, one bin at a time: the same bins as :func:`_first_fit_tree`.

    Under first fit, whether an item goes into bin 1 depends only on the items before it
    that went there, so bin 1 is every item (in sorted order) that fits what bin 1 holds
    by then; bin 2 the same among the rest; and so on. With costs sorted decreasing, that
    is a prefix (a cumulative sum) plus a few smaller items that fit the remainder.
    """
    bins: list[np.ndarray] = []
    while order.size:
        total = np.cumsum(cost)
        k = int(np.searchsorted(total, max_tokens, side="right"))
        if k == 0:  # over the budget alone: a bin of its own, with no room left
            bins.append(order[:1])
            order, cost = order[1:], cost[1:]
            continue
        taken = list(range(k))
        left = max_tokens - int(total[k - 1])
        j = k
        while j < cost.size and left >= cost[-1]:
            j += int(np.searchsorted(-cost[j:], -left, side="left"))  # first that fits
            if j >= cost.size:
                break
            taken.append(j)
            left -= int(cost[j])
            j += 1
        bins.append(order[taken])
        keep = np.ones(cost.size, dtype=bool)
        keep[taken] = False
        order, cost = order[keep], cost[keep]
    return bins


def _first_fit_tree(order: np.ndarray, cost: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """First-fit decreasing in O(n log bins), with a max-tree over the bins' free space."""
    n = order.shape[0]
    # Worst case every sequence opens its own bin.
    size = 1
    while size < n:
        size *= 2
    free = [-1] * (2 * size)  # max-tree over the bins' free tokens; -1 = no bin yet
    bins: list[list[int]] = []
    for pos, c in zip(order.tolist(), cost.tolist()):
        if free[1] >= c:
            node = 1
            while node < size:  # descend to the leftmost bin with room: first fit
                node = 2 * node if free[2 * node] >= c else 2 * node + 1
            bins[node - size].append(pos)
            free[node] -= c
        else:
            node = size + len(bins)
            bins.append([pos])
            free[node] = max(max_tokens - c, 0)
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return [np.asarray(b, dtype=np.int64) for b in bins]


@dataclass(frozen=True, slots=True)
class TokenBatch:
    """One packed batch: flat tokens, offsets, and the rows they are for.

    The one batch type from the scheduler to the worker and back: the scheduler builds
    it, it crosses the pipe as it is, and the engine runs it. ``positions`` and ``ids``
    are for the parent (where rows go) and for logs; the engine needs only the tensors.
    """

    positions: np.ndarray  # (n,) int64, row positions of the sequences, in pack order
    tokens: np.ndarray     # (T,) int64
    cu_seqlens: np.ndarray  # (n+1,) int32
    max_len: int
    ids: tuple[str, ...] = ()  # record ids, for logs and the test fault plan
    # Per-residue rows this batch needs whatever its worker writes ("float32": the
    # daemon's windows of long sequences, combined in the parent); None: the worker's own.
    residues: str | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


def build_batch(positions: np.ndarray, sequences: Sequence[str],
                truncation: int = FAIR_ESM_TRUNCATION, ids: Sequence[str] = (),
                residues: str | None = None) -> TokenBatch:
    """Concatenate the encoded ``sequences`` (aligned with ``positions`` and ``ids``)."""
    return _batch(positions, *encode_packed(sequences, truncation), ids, residues)


def span_batch(positions: np.ndarray, letters: np.ndarray, starts: np.ndarray,
               lengths: np.ndarray, ids: Sequence[str] = (),
               residues: str | None = None) -> TokenBatch:
    """:func:`build_batch` of sequences given as spans of one array of residue letters
    (:func:`vnpd.compute.tokenizer.encode_spans`; truncated already)."""
    return _batch(positions, *encode_spans(letters, starts, lengths), ids, residues)


def _batch(positions: np.ndarray, tokens: np.ndarray, cu: np.ndarray, ids: Sequence[str],
           residues: str | None) -> TokenBatch:
    lengths = np.diff(cu)
    return TokenBatch(np.asarray(positions, dtype=np.int64), tokens, cu,
                      int(lengths.max()) if lengths.size else 0, tuple(ids), residues)
