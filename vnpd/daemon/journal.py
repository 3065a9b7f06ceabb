"""Durable job and batch state in SQLite (WAL) inside the state directory.

The journal records *positions*, never sets of ids: each batch row holds the input
positions it covers, so a restart requeues exactly the unfinished batches and rows land
where they belong. A batch is marked done only after its rows are flushed to the job's
partial output, so "done" in the journal always means "on disk".

Job states: ``claimed`` -> ``indexed`` -> ``publishing`` -> ``done``; or ``failed``.

Example::

    journal = Journal(state_dir / "journal.sqlite3")
    job_id = journal.add_job("sample.fasta", claimed_path)
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    claimed_path TEXT NOT NULL,
    state TEXT NOT NULL,
    sha256 TEXT,
    cache_key TEXT,
    num_records INTEGER,
    total_tokens INTEGER,
    next_position INTEGER NOT NULL DEFAULT 0,
    output TEXT,
    error TEXT,
    created REAL NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS batches (
    job_id INTEGER NOT NULL,
    batch_no INTEGER NOT NULL,
    positions BLOB NOT NULL,
    tokens INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, batch_no)
);
CREATE TABLE IF NOT EXISTS quarantine (
    job_id INTEGER NOT NULL,
    position INTEGER NOT NULL,
    reason TEXT NOT NULL,
    record TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, position)
);
CREATE INDEX IF NOT EXISTS jobs_by_key ON jobs (cache_key, state);
"""


# What a full disk or an unwritable directory raises: OSError from files, and
# sqlite3.OperationalError ("database or disk is full") from the journal.
DISK_ERRORS = (OSError, sqlite3.OperationalError)


@dataclass(frozen=True)
class JobRow:
    id: int
    name: str
    claimed_path: Path
    state: str
    sha256: str | None
    cache_key: str | None
    num_records: int | None
    total_tokens: int | None
    next_position: int
    output: str | None
    error: str | None
    created: float


@dataclass(frozen=True)
class QuarantineRow:
    position: int
    record: str   # the record id, for the job summary
    reason: str


@dataclass(frozen=True)
class BatchRow:
    job_id: int
    batch_no: int
    positions: np.ndarray
    tokens: int
    attempts: int


class Journal:
    """One SQLite connection, used from the daemon's event-loop thread only."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a commit survives power loss
        self.db.executescript(SCHEMA)
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(quarantine)")}
        if "record" not in columns:  # a journal written before the column existed
            self.db.execute("ALTER TABLE quarantine ADD COLUMN record TEXT NOT NULL DEFAULT ''")

    def close(self) -> None:
        self.db.close()

    # Jobs ---------------------------------------------------------------------------
    def add_job(self, name: str, claimed_path: Path) -> int:
        cur = self.db.execute(
            "INSERT INTO jobs (name, claimed_path, state, created) VALUES (?, ?, 'claimed', ?)",
            (name, str(claimed_path), time.time()))
        return int(cur.lastrowid or 0)

    def next_job_id(self) -> int:
        row = self.db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM jobs").fetchone()
        return int(row[0])

    def set_indexed(self, job_id: int, sha256: str, cache_key: str, num_records: int,
                    total_tokens: int) -> None:
        self.db.execute("UPDATE jobs SET state='indexed', sha256=?, cache_key=?, num_records=?, "
                        "total_tokens=? WHERE id=?",
                        (sha256, cache_key, num_records, total_tokens, job_id))

    def set_state(self, job_id: int, state: str, *, output: str | None = None,
                  error: str | None = None) -> None:
        finished = time.time() if state in ("done", "failed") else None
        self.db.execute("UPDATE jobs SET state=?, output=COALESCE(?, output), "
                        "error=COALESCE(?, error), finished=COALESCE(?, finished) WHERE id=?",
                        (state, output, error, finished, job_id))

    def job(self, job_id: int) -> JobRow:
        return self._jobs("WHERE id=?", (job_id,))[0]

    def unfinished_jobs(self) -> list[JobRow]:
        return self._jobs("WHERE state NOT IN ('done', 'failed') ORDER BY id", ())

    def published_with_key(self, cache_key: str) -> JobRow | None:
        rows = self._jobs("WHERE cache_key=? AND state='done' ORDER BY id DESC", (cache_key,))
        return rows[0] if rows else None

    def claimed_names(self) -> set[str]:
        """File names in state/claimed/ that some job, finished or not, has recorded."""
        return {Path(r[0]).name for r in self.db.execute("SELECT claimed_path FROM jobs")}

    def _jobs(self, where: str, args: tuple[object, ...]) -> list[JobRow]:
        cur = self.db.execute(
            "SELECT id, name, claimed_path, state, sha256, cache_key, num_records, total_tokens, "
            f"next_position, output, error, created FROM jobs {where}", args)
        return [JobRow(r[0], r[1], Path(r[2]), *r[3:]) for r in cur.fetchall()]

    def reset_job(self, job_id: int) -> None:
        """Forget a job's batches and cursor (its partial output was lost): compute anew."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM batches WHERE job_id=?", (job_id,))
            self.db.execute("DELETE FROM quarantine WHERE job_id=?", (job_id,))
            self.db.execute("UPDATE jobs SET next_position=0 WHERE id=?", (job_id,))

    # Batches ------------------------------------------------------------------------
    def add_batches(self, job_id: int, batches: list[tuple[np.ndarray, int]],
                    next_position: int) -> list[int]:
        """Record new batches (positions, tokens) and the job's read cursor atomically."""
        with self.db:
            self.db.execute("BEGIN")
            first = self.db.execute("SELECT COALESCE(MAX(batch_no), -1) + 1 FROM batches "
                                    "WHERE job_id=?", (job_id,)).fetchone()[0]
            numbers = list(range(first, first + len(batches)))
            self.db.executemany(
                "INSERT INTO batches (job_id, batch_no, positions, tokens) VALUES (?, ?, ?, ?)",
                [(job_id, no, np.asarray(p, dtype=np.int64).tobytes(), int(t))
                 for no, (p, t) in zip(numbers, batches)])
            self.db.execute("UPDATE jobs SET next_position=? WHERE id=?", (next_position, job_id))
        return numbers

    def mark_done(self, job_id: int, batch_nos: list[int]) -> None:
        """Mark batches done in one transaction (their rows must already be durable)."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("UPDATE batches SET done=1 WHERE job_id=? AND batch_no=?",
                                [(job_id, no) for no in batch_nos])

    def count_attempt(self, job_id: int, batch_no: int) -> int:
        """Add one failed attempt (the worker died holding it); returns the new count."""
        self.db.execute("UPDATE batches SET attempts=attempts+1 WHERE job_id=? AND batch_no=?",
                        (job_id, batch_no))
        row = self.db.execute("SELECT attempts FROM batches WHERE job_id=? AND batch_no=?",
                              (job_id, batch_no)).fetchone()
        return int(row[0])

    def set_tokens(self, job_id: int, batch_no: int, tokens: int) -> None:
        """A batch journaled with no tokens (rows served, not computed) is computed."""
        self.db.execute("UPDATE batches SET tokens=? WHERE job_id=? AND batch_no=?",
                        (tokens, job_id, batch_no))

    def split_batch(self, job_id: int, batch_no: int,
                    parts: list[tuple[np.ndarray, int]]) -> list[int]:
        """Replace a batch by smaller ones covering the same positions (one transaction).

        Each part keeps the batch's attempts: a part of a suspect batch is a suspect.
        """
        attempts = self.db.execute("SELECT attempts FROM batches WHERE job_id=? AND batch_no=?",
                                   (job_id, batch_no)).fetchone()[0]
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM batches WHERE job_id=? AND batch_no=?", (job_id, batch_no))
            first = self.db.execute("SELECT COALESCE(MAX(batch_no), -1) + 1 FROM batches "
                                    "WHERE job_id=?", (job_id,)).fetchone()[0]
            numbers = list(range(first, first + len(parts)))
            self.db.executemany(
                "INSERT INTO batches (job_id, batch_no, positions, tokens, attempts) "
                "VALUES (?, ?, ?, ?, ?)",
                [(job_id, no, np.asarray(p, dtype=np.int64).tobytes(), int(t), attempts)
                 for no, (p, t) in zip(numbers, parts)])
        return numbers

    def pending_batches(self, job_id: int) -> list[BatchRow]:
        cur = self.db.execute("SELECT job_id, batch_no, positions, tokens, attempts FROM batches "
                              "WHERE job_id=? AND done=0 ORDER BY batch_no", (job_id,))
        return [BatchRow(r[0], r[1], np.frombuffer(r[2], dtype=np.int64), r[3], r[4])
                for r in cur.fetchall()]

    def progress(self, job_id: int) -> tuple[int, int]:
        """(sequences done, tokens done) for a job."""
        cur = self.db.execute("SELECT positions, tokens FROM batches WHERE job_id=? AND done=1",
                              (job_id,))
        seqs = tokens = 0
        for blob, t in cur.fetchall():
            seqs += len(blob) // 8
            tokens += t
        return seqs, tokens

    def done_positions(self, job_id: int) -> np.ndarray:
        """Every position of the job's done batches."""
        cur = self.db.execute("SELECT positions FROM batches WHERE job_id=? AND done=1",
                              (job_id,))
        parts = [np.frombuffer(blob, dtype=np.int64) for (blob,) in cur.fetchall()]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def reuse_counts(self, job_id: int,
                     count: Callable[[np.ndarray], int] = len) -> tuple[int, int]:
        """(rows computed by the model, rows served from the cache) of the done batches:
        a batch journaled with no tokens holds cache hits. ``count``: the rows of a
        batch's positions (pieces, in window mode)."""
        cur = self.db.execute("SELECT positions, tokens FROM batches WHERE job_id=? AND done=1",
                              (job_id,))
        computed = hits = 0
        for blob, tokens in cur.fetchall():
            rows = count(np.frombuffer(blob, dtype=np.int64))
            if tokens:
                computed += rows
            else:
                hits += rows
        return computed, hits

    # Quarantine ---------------------------------------------------------------------
    def quarantine(self, job_id: int, batch_no: int, position: int, record: str,
                   reason: str) -> None:
        """Quarantine the one sequence of batch ``batch_no``, which leaves the journal."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT OR REPLACE INTO quarantine (job_id, position, reason, record) "
                            "VALUES (?, ?, ?, ?)", (job_id, position, reason, record))
            self.db.execute("DELETE FROM batches WHERE job_id=? AND batch_no=?", (job_id, batch_no))

    def quarantine_more(self, job_id: int, positions: np.ndarray, record: str,
                        reason: str) -> None:
        """Quarantine more positions (copies of a quarantined sequence) in one transaction."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT OR REPLACE INTO quarantine (job_id, position, reason, record) "
                "VALUES (?, ?, ?, ?)", [(job_id, int(p), reason, record) for p in positions])

    def quarantined(self, job_id: int) -> list[QuarantineRow]:
        cur = self.db.execute("SELECT position, record, reason FROM quarantine WHERE job_id=? "
                              "ORDER BY position", (job_id,))
        return [QuarantineRow(int(p), str(i), str(r)) for p, i, r in cur.fetchall()]
