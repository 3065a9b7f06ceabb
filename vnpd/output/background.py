"""Raw row writes on a thread of their own, so that the daemon's event loop does not wait
on pwrite(2).

Rows are written at scattered file offsets (packing sorts by length), one pwrite per run
of adjacent rows: at 3B's 2,560 values a row that was a third of the parent's loop, and
with per-residue rows (5 KB a residue) most of it. pwrite releases the GIL, so on a
thread it overlaps the loop's own work.

Contract (``PartialOutput.write_in_background``):

- ``submit`` queues writes and returns; a later ``drain`` returns once every write
  submitted before it is in the file (not yet durable: the caller fsyncs after).
- The arrays behind the queued memoryviews must not change until then.
- A failed write is sticky: it is raised by every later ``submit`` and ``drain``, so the
  rows it held are never taken as written (the daemon's commit journals a batch only
  after a ``drain`` that raised nothing).
- Past ``limit_bytes`` queued or being written, ``submit`` waits (unless nothing is
  queued: one submission may always wait beside the one being written), so a slow disk
  holds the caller back instead of filling memory.
- The thread ends after ``IDLE_S`` without work, and starts again on the next submit: a
  file that is never closed leaves no thread behind.

Example::

    writer = BackgroundWriter(fd, limit_bytes=256 << 20)
    writer.submit([(memoryview(rows).cast("B"), offset)], rows.nbytes)
    writer.drain()          # rows in the file; now fsync(fd)
"""

from __future__ import annotations

import errno
import threading
from collections import deque
from collections.abc import Iterable

from vnpd.output.layout import pwrite_runs

IDLE_S = 5.0  # an idle thread ends after this long; the next submit starts another
# What the daemon and `vnpd embed` let wait per file (or one batch's worth, if more).
QUEUE_BYTES = 16 << 20

Writes = Iterable[tuple[memoryview, int]]


class BackgroundWriter:
    """pwrite(2)s of one file descriptor, in submission order, on one thread."""

    def __init__(self, fd: int, *, limit_bytes: int) -> None:
        self._fd = fd
        self._limit = limit_bytes
        self._cond = threading.Condition()
        self._queue: deque[tuple[Writes, int]] = deque()
        self._queued_bytes = 0
        self._busy = False  # the thread holds a submission it took off the queue
        self._error: OSError | None = None
        self._thread: threading.Thread | None = None

    def submit(self, writes: Writes, size: int) -> None:
        """Queue ``writes`` ((bytes, file offset) pairs, of ``size`` bytes in all; a
        generator runs on the thread); raises an earlier write's error."""
        with self._cond:
            while (self._error is None and self._queue
                   and self._queued_bytes + size > self._limit):
                self._cond.wait()
            self._raise_error()
            self._queue.append((writes, size))
            self._queued_bytes += size
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vnpd-row-writer",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def drain(self) -> None:
        """Return once every submitted write is in the file; raise the first that failed."""
        with self._cond:
            while self._error is None and (self._queue or self._busy):
                self._cond.wait()
            self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise OSError(self._error.errno, f"an earlier row write failed: {self._error}")

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._cond.wait_for(lambda: bool(self._queue), IDLE_S)
                if not self._queue or self._error is not None:
                    self._thread = None  # idle, or failed: the next submit starts another
                    self._cond.notify_all()
                    return
                writes, size = self._queue.popleft()
                self._busy = True
            try:
                pwrite_runs(self._fd, writes)
                failed = None
            except OSError as exc:
                failed = exc
            except BaseException as exc:  # a bug in a writes generator: still sticky
                failed = OSError(errno.EIO, repr(exc))
            with self._cond:
                self._busy = False
                self._queued_bytes -= size
                if failed is not None and self._error is None:
                    self._error = failed
                    self._queue.clear()
                    self._queued_bytes = 0
                self._cond.notify_all()
