"""The journal: positions survive a reopen; done means done; splits and quarantine are atomic."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vnpd.daemon.journal import Journal, QuarantineRow


def test_batches_positions_and_state_survive_reopen(tmp_path: Path) -> None:
    db = tmp_path / "j.sqlite3"
    j = Journal(db)
    job = j.add_job("a.fasta", tmp_path / "claimed" / "1-a.fasta")
    j.set_indexed(job, "ab" * 32, "key", 10, 500)
    numbers = j.add_batches(job, [(np.array([3, 1, 7]), 120), (np.array([0, 2]), 80)], 8)
    j.mark_done(job, [numbers[0]])
    j.close()

    j = Journal(db)
    row = j.job(job)
    assert (row.state, row.num_records, row.next_position) == ("indexed", 10, 8)
    pending = j.pending_batches(job)
    assert [p.positions.tolist() for p in pending] == [[0, 2]]  # order kept: positions, not a set
    assert j.progress(job) == (3, 120)


def test_attempts_split_and_quarantine(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    job = j.add_job("b.fasta", tmp_path / "b")
    (no,) = j.add_batches(job, [(np.array([5, 6, 7, 8]), 40)], 9)
    assert j.count_attempt(job, no) == 1
    assert j.count_attempt(job, no) == 2
    halves = j.split_batch(job, no, [(np.array([5, 6]), 20), (np.array([7, 8]), 20)])
    assert sorted(p.positions.tolist() for p in j.pending_batches(job)) == [[5, 6], [7, 8]]
    (single,) = j.split_batch(job, halves[0], [(np.array([5]), 10)])[:1]
    # A part of a suspect batch is a suspect: the attempts go with the split.
    assert {p.attempts for p in j.pending_batches(job)} == {2}
    j.quarantine(job, single, 5, "s5", "crash")
    assert j.quarantined(job) == [QuarantineRow(5, "s5", "crash")]
    assert [p.positions.tolist() for p in j.pending_batches(job)] == [[7, 8]]


def test_cache_key_lookup_and_reset(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    first = j.add_job("x.fasta", tmp_path / "x")
    j.set_indexed(first, "s", "same-key", 1, 3)
    assert j.published_with_key("same-key") is None
    j.set_state(first, "done", output=str(tmp_path / "x.h5"))
    assert j.published_with_key("same-key").id == first
    second = j.add_job("y.fasta", tmp_path / "y")
    j.add_batches(second, [(np.array([0]), 3)], 1)
    j.reset_job(second)
    assert j.pending_batches(second) == [] and j.job(second).next_position == 0
    assert [r.id for r in j.unfinished_jobs()] == [second]


def test_journal_without_the_record_column_is_upgraded(tmp_path: Path) -> None:
    """A journal written before quarantined record ids were kept still opens and works."""
    import sqlite3

    db = tmp_path / "old.sqlite3"
    old = sqlite3.connect(db)
    old.executescript("CREATE TABLE quarantine (job_id INTEGER NOT NULL, position INTEGER "
                      "NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (job_id, position));"
                      "INSERT INTO quarantine VALUES (1, 4, 's4: crash');")
    old.close()
    j = Journal(db)
    assert j.quarantined(1) == [QuarantineRow(4, "", "s4: crash")]
    j.quarantine(1, 0, 9, "s9", "hang")
    assert j.quarantined(1)[1] == QuarantineRow(9, "s9", "hang")


def test_a_served_batch_that_is_computed_counts_as_computed(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    job = j.add_job("a.fasta", tmp_path / "claimed" / "1-a.fasta")
    j.set_indexed(job, "ab" * 32, "key", 10, 500)
    # A computed batch, a batch of cache hits, and two loans (a batch of no tokens each).
    numbers = j.add_batches(job, [(np.array([0, 1]), 60), (np.array([2, 3]), 0),
                                  (np.array([4]), 0), (np.array([5]), 0)], 6)
    j.set_tokens(job, numbers[3], 25)  # its lender gave it up: the borrower computes it
    j.mark_done(job, numbers)
    assert j.reuse_counts(job) == (3, 3)
    j.close()
