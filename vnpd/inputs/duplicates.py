"""Identical rows of a job: one key per row, and which earlier row each one repeats.

Two rows whose residues, as the model sees them (upper case, cut to ``truncation`` unless
windows cover the whole sequence), are the same give the same embedding. The first such
row is the *leader*: it is computed (or served from the cache). Every later one is a
*follower*: it gets a copy of its leader's row, under its own id and at its own position.

:func:`plan_duplicates` reads a source once, in bounded memory, and returns a
:class:`DuplicatePlan` of arrays that are saved beside the job's index and memory-mapped
back after a restart:

- ``keys`` (N, 32) uint8: SHA-256 of each row's residues (``vnpd.cache.key.sequence_key``'s
  digest), also the persistent cache's key;
- ``leaders`` (N,) int64: the position of each row's leader (itself for a leader);
- ``follower_offsets`` (N+1,) and ``followers``: leader p's followers are
  ``followers[follower_offsets[p]:follower_offsets[p+1]]``, in file order.

Example::

    plan = plan_duplicates(source, truncation=1022)
    plan.is_leader(np.arange(10))      # array([True, True, False, ...])
    plan.followers_of(np.array([0, 1]))  # followers of rows 0 and 1, as one array
    plan.save(job_dir / "index"); DuplicatePlan.load(job_dir / "index")
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vnpd.inputs.source import SequenceSource

_FILES = ("keys.npy", "leaders.npy", "follower_offsets.npy", "followers.npy")


@dataclass(frozen=True)
class DuplicatePlan:
    """Which rows of a job repeat an earlier row; see the module doc."""

    keys: np.ndarray
    leaders: np.ndarray
    follower_offsets: np.ndarray
    followers: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.leaders.shape[0])

    @property
    def duplicate_rows(self) -> int:
        """Rows that repeat an earlier row of the job (they are never computed)."""
        return int(self.followers.shape[0])

    def is_leader(self, positions: np.ndarray) -> np.ndarray:
        return np.asarray(self.leaders[positions]) == positions

    def followers_of(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(follower positions, index into ``positions`` of each one's leader)."""
        positions = np.asarray(positions, dtype=np.int64)
        starts = np.asarray(self.follower_offsets[positions])
        counts = np.asarray(self.follower_offsets[positions + 1]) - starts
        if not counts.any():
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        which = np.repeat(np.arange(len(positions)), counts)
        within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        return np.asarray(self.followers[starts[which] + within], dtype=np.int64), which

    def save(self, directory: Path) -> list[Path]:
        """Write the arrays into ``directory``; returns the files (for fsync)."""
        directory.mkdir(parents=True, exist_ok=True)
        arrays = (self.keys, self.leaders, self.follower_offsets, self.followers)
        for name, array in zip(_FILES, arrays):
            np.save(directory / name, array)
        return [directory / name for name in _FILES]

    @classmethod
    def load(cls, directory: Path) -> "DuplicatePlan":
        return cls(*(np.load(directory / name, mmap_mode="r") for name in _FILES))

    @classmethod
    def exists(cls, directory: Path) -> bool:
        return all((directory / name).exists() for name in _FILES)


def key_list(keys: np.ndarray) -> list[bytes]:
    """Rows of (n, 32) uint8 keys as n bytes objects (a tenth of the cost of ``bytes(k)``
    for each row: one view, no Python per row)."""
    keys = np.ascontiguousarray(keys, dtype=np.uint8)
    if keys.ndim != 2 or keys.shape[1] != 32:
        raise ValueError(f"keys must be (n, 32) uint8, not {keys.shape}")
    return keys.view("V32").ravel().tolist()


def key_array(keys: Iterable[bytes]) -> np.ndarray:
    """The inverse of :func:`key_list`: 32-byte keys as one read-only (n, 32) uint8 array."""
    return np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 32)


def row_key(residues: str, truncation: int | None) -> bytes:
    """SHA-256 of the residues the model sees: upper case, cut to ``truncation`` (None:
    all of them, as in window mode)."""
    kept = residues if truncation is None else residues[:truncation]
    return hashlib.sha256(kept.upper().encode("ascii")).digest()


def plan_duplicates(source: SequenceSource, truncation: int | None) -> DuplicatePlan:
    """Key every row of ``source`` and find its leader. One pass over the rows; memory is
    32 bytes per row for the keys plus the sort's temporaries."""
    n = source.num_rows
    keys = np.empty((n, 32), dtype=np.uint8)
    for record in source.rows():
        keys[record.index] = np.frombuffer(row_key(record.sequence, truncation), np.uint8)
    return plan_from_keys(keys)


def plan_from_keys(keys: np.ndarray) -> DuplicatePlan:
    """The leaders and followers of rows with these keys (rows with equal keys repeat)."""
    n = keys.shape[0]
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return DuplicatePlan(keys, empty, np.zeros(1, dtype=np.int64), empty.copy())
    # 16 bytes of SHA-256 as two uint64: collisions are beyond reach (2^-64 per pair).
    halves = np.ascontiguousarray(keys[:, :16]).view(np.uint64).reshape(n, 2)
    order = np.lexsort((np.arange(n), halves[:, 1], halves[:, 0]))
    sorted_halves = halves[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (sorted_halves[1:] != sorted_halves[:-1]).any(axis=1)
    group_first = order[np.flatnonzero(new_group)]  # the lowest position of each group
    group_of_sorted = np.cumsum(new_group) - 1
    leaders = np.empty(n, dtype=np.int64)
    leaders[order] = group_first[group_of_sorted]
    followers = np.flatnonzero(leaders != np.arange(n))
    by_leader = np.argsort(leaders[followers], kind="stable")
    followers = followers[by_leader]
    follower_offsets = np.searchsorted(leaders[followers], np.arange(n + 1)).astype(np.int64)
    return DuplicatePlan(keys, leaders, follower_offsets, followers.astype(np.int64))
