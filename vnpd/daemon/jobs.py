"""A job in progress and its queued batches: the types that intake, the scheduler and
completion share.

Example::

    job = ActiveJob(7, "sample.fasta", source, partial, next_position=0, total_tokens=9000)
    job.queue.append(QueuedBatch(batch_no=1, positions=np.array([3, 0]), tokens=412))
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: this module stays a leaf of the import graph
    from vnpd.compute.packing import TokenBatch
    from vnpd.compute.windows import PieceIndex
    from vnpd.inputs.duplicates import DuplicatePlan
    from vnpd.inputs.source import SequenceSource
    from vnpd.output.hdf5 import PartialOutput


@dataclass
class QueuedBatch:
    """A journaled batch of a job: its pieces' positions (rows, in truncate mode; see
    :class:`vnpd.compute.windows.PieceIndex`), and once read, its tokens."""

    batch_no: int
    positions: np.ndarray
    tokens: int
    batch: TokenBatch | None = None  # None until read (after a restart or a split)
    attempts: int = 0  # failures it was part of (journaled); > 0 makes it a suspect


@dataclass
class ActiveJob:
    """A job being computed: its input source, partial output and batch queue."""

    job_id: int
    name: str
    source: SequenceSource
    partial: PartialOutput
    next_position: int
    total_tokens: int
    queue: deque[QueuedBatch] = field(default_factory=deque)
    inflight: set[int] = field(default_factory=set)
    unflushed: list[int] = field(default_factory=list)  # rows written, not yet journaled
    borrowed: dict[int, int] = field(default_factory=dict)  # batch -> row another job computes
    done_sequences: int = 0
    done_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    failed: str | None = None
    duplicates: DuplicatePlan | None = None  # rows that repeat an earlier row: copied
    pieces: PieceIndex | None = None  # what batches hold; None: rows, whole (truncate)

    @property
    def num_records(self) -> int:
        return self.source.num_rows

    def awaits_commit(self) -> bool:
        """Every batch is computed, some not yet durable: its commit ends the job."""
        return bool(self.unflushed) and not self.queue and not self.inflight and \
            not self.borrowed and self.next_position >= self.num_records

    def finished(self) -> bool:
        return (not self.queue and not self.inflight and not self.unflushed
                and not self.borrowed
                and self.next_position >= self.num_records)
