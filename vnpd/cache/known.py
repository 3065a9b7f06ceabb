"""Which keys a cache may hold: lookups of keys it cannot hold skip SQLite.

A daemon looks up every row it is about to compute, a window of thousands of keys at a
time, and most of them miss: each miss still costs SQLite an index search (about 3 us,
8% of the parent's loop at 25,000 rows/s). :class:`KnownKeys` keeps the first 8 bytes of
every key of the handle's namespace in two sorted numpy arrays (8 bytes an entry: 40 MB
for 5M entries), and says which of a lookup's keys may be present. Only those go to
SQLite, which reads and checks them as before: a prefix shared by chance costs a miss
there, never a wrong row.

It is brought up to date before each lookup from the ``entries`` rows added since
(``id`` above the highest seen), whichever process added them: the daemon's cache writer
or another daemon on the same store. A key whose entry took the id of an evicted newest
entry is missed until the next open (SQLite reuses the largest rowid once it is deleted;
eviction takes the least recently used first, so that is rare): it is computed again,
which costs time, not correctness.

Example::

    known = KnownKeys()
    known.refresh(db, ns)                 # every key of the namespace, then only new ones
    known.maybe([key1, key2])             # array([ True, False])
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import numpy as np

MERGE_FRACTION = 8
"""New keys are kept apart, sorted, and merged into the rest once they are an eighth of
it: a window's refresh sorts only the new keys, and a merge's cost is spread thin."""


def prefixes(keys: Sequence[bytes]) -> np.ndarray:
    """The first 8 bytes of each key (zero-padded), as uint64: the daemon's keys are
    32-byte SHA-256 digests."""
    if not len(keys):
        return np.empty(0, dtype=np.uint64)
    return np.frombuffer(b"".join(bytes(key[:8]).ljust(8, b"\0") for key in keys),
                         dtype=np.uint64)


class KnownKeys:
    """Prefixes of the keys one namespace of a store holds (and may have held)."""

    def __init__(self) -> None:
        self.last_id = 0  # the highest ``entries.id`` read
        self._base = np.empty(0, dtype=np.uint64)
        self._new = np.empty(0, dtype=np.uint64)

    def refresh(self, db: sqlite3.Connection, ns: int) -> None:
        """Read the keys of ``ns`` added since the last refresh (all of them at first)."""
        rows = db.execute("SELECT id, key FROM entries WHERE ns = ? AND id > ? ORDER BY id",
                          (ns, self.last_id)).fetchall()
        if not rows:
            return
        self.last_id = int(rows[-1][0])
        added = prefixes([bytes(key) for _, key in rows])
        self._new = np.union1d(self._new, added)
        if self._new.size * MERGE_FRACTION >= self._base.size:
            self._base, self._new = np.union1d(self._base, self._new), self._new[:0]

    def maybe(self, keys: Sequence[bytes]) -> np.ndarray:
        """Whether each key may be in the store: False means it is not."""
        wanted = prefixes(keys)
        return _member(wanted, self._base) | _member(wanted, self._new)

    def __len__(self) -> int:
        return int(self._base.size + self._new.size)


def _member(values: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    if not sorted_values.size:
        return np.zeros(values.shape, dtype=bool)
    at = np.minimum(np.searchsorted(sorted_values, values), sorted_values.size - 1)
    return sorted_values[at] == values
