"""A job's batches cut from its input: the pieces a batch holds (rows, or in window mode
the windows of long rows, :class:`vnpd.compute.windows.PieceIndex`) as tokens.

Example::

    plan = pack_pieces(job_pieces(job, 1022), pieces, max_tokens=131072)
    window = read_window(job, start=4096, count=4096)  # letters (or records) of the rows
    batch = window_batch(job, plan[0], window, start=4096, truncation=1022)
    batch = reread_batch(job, queued.positions, truncation=1022)  # after a restart or split
    queue_journaled(job, journal, truncation=1022)  # a job resumed: its pending batches
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from vnpd.compute.packing import TokenBatch, build_batch, pack_batches, span_batch
from vnpd.compute.windows import PieceIndex
from vnpd.daemon.jobs import ActiveJob, QueuedBatch
from vnpd.inputs.fasta import FastaRecord

if TYPE_CHECKING:  # annotations only
    from vnpd.daemon.journal import Journal
    from vnpd.inputs.window_text import WindowText


def job_pieces(job: ActiveJob, truncation: int) -> PieceIndex:
    """What ``job``'s batches hold: its piece index, planned once (truncate mode: its rows)."""
    if job.pieces is None:  # truncate mode: pieces are rows
        job.pieces = PieceIndex.plan(job.source.lengths, truncation, None)
    return job.pieces


def pack_pieces(index: PieceIndex, pieces: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """``pieces`` packed into batches of at most ``max_tokens``: whole rows, then windows
    of long rows apart from them. A batch with a window ships every residue's rows
    (float32, for the parent to combine, :func:`piece_batch`): 10 KB a token at 3B,
    which whole rows packed beside windows would pay for nothing."""
    windowed = index.windowed(pieces)
    return [group[b] for group in (pieces[~windowed], pieces[windowed]) if group.size
            for b in pack_batches(index.tokens(group) - 2, max_tokens, index.truncation)]


def reread_batch(job: ActiveJob, positions: np.ndarray, truncation: int) -> TokenBatch:
    """Re-read the records of a journaled batch (after a restart or a split)."""
    rows = job_pieces(job, truncation).rows(positions)
    lo, hi = int(rows.min()), int(rows.max())
    wanted = set(rows.tolist())
    found: dict[int, FastaRecord] = {}
    for record in job.source.rows(lo):
        if record.index in wanted:
            found[record.index] = record
        if record.index >= hi:
            break
    return piece_batch(job, positions, found.__getitem__, truncation)


def read_window(job: ActiveJob, start: int, count: int) -> WindowText | list[FastaRecord]:
    """Rows ``start..start + count - 1`` of ``job``'s input, to cut batches from with
    :func:`window_batch`: as one array of letters where its kind can, else as records.
    Raises ``FastaError`` if the input no longer reads as it was indexed."""
    text = job.source.window_text(start, start + count)
    return text if text is not None else list(itertools.islice(job.source.rows(start), count))


def window_batch(job: ActiveJob, pieces: np.ndarray, window: WindowText | list[FastaRecord],
                 start: int, truncation: int) -> TokenBatch:
    """The batch of ``pieces``, cut from a window :func:`read_window` read at ``start``."""
    if isinstance(window, list):
        return piece_batch(job, pieces, lambda row: window[row - start], truncation)
    index = job_pieces(job, truncation)
    rows, starts, stops = index.spans(pieces)
    local = rows - start
    return span_batch(pieces, window.letters, window.offsets[local] + starts,
                      np.minimum(stops - starts, truncation),
                      [window.ids[i] for i in local.tolist()],
                      residues="float32" if index.windowed(pieces).any() else None)


def piece_batch(job: ActiveJob, pieces: np.ndarray, record: Callable[[int], FastaRecord],
                truncation: int) -> TokenBatch:
    """The batch of ``pieces``, cut from the records of their rows. Windows of long
    rows ask for float32 residue rows, which the parent combines."""
    index = job_pieces(job, truncation)
    rows, starts, stops = index.spans(pieces)
    records = [record(r) for r in rows.tolist()]
    return build_batch(pieces, [r.sequence[a:b] for r, a, b in
                                zip(records, starts.tolist(), stops.tolist())],
                       truncation, [r.id for r in records],
                       residues="float32" if index.windowed(pieces).any() else None)


def queue_journaled(job: ActiveJob, journal: Journal, truncation: int) -> None:
    """Queue ``job``'s journaled unfinished batches, suspects (batches that failed before
    the restart) at the very front, and count what it has done already."""
    pieces = job_pieces(job, truncation)
    rows = journal.pending_batches(job.job_id)
    for row in sorted(rows, key=lambda r: r.attempts == 0):
        # A batch of cache hits whose rows a crash lost (no tokens) is computed.
        tokens = row.tokens or int(pieces.tokens(row.positions).sum())
        if not row.tokens:  # served rows (hits, loans) a crash lost: now computed
            with contextlib.suppress(sqlite3.OperationalError):
                journal.set_tokens(job.job_id, row.batch_no, tokens)
        job.queue.append(QueuedBatch(row.batch_no, row.positions, tokens,
                                     attempts=row.attempts))
    _, job.done_tokens = journal.progress(job.job_id)
    done = journal.done_positions(job.job_id)
    done_rows = pieces.rows(done[pieces.is_last(done)])  # a row is done with its last piece
    job.done_sequences = len(done_rows) + len(journal.quarantined(job.job_id))
    if job.duplicates is not None:  # the copies written with the done batches' rows
        job.done_sequences += len(job.duplicates.followers_of(done_rows)[0])
