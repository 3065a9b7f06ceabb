"""The inbox: find settled regular files and claim them atomically (the writer side,
``vnpd submit``, is :mod:`vnpd.daemon.submit`).

Writer contract (docs/INBOX.md): write the file elsewhere, or under a hidden name or one
ending in ``.part``/``.tmp``, then rename it into place; ``vnpd submit`` does exactly this.
The daemon only takes regular files whose size, mtime and inode have not changed for
``settle_s``. Symlinks are never followed (nothing outside the inbox is read), FIFOs are
never opened, directories are skipped, and so are names the daemon could not carry
through (not UTF-8, too long) and files it may not read.

The watchdog observer only *wakes* the daemon; a scan of the directory is the truth,
because file-system events can be lost (queue overflow, network filesystems).

Example::

    settled = tracker.observe(scan_inbox(inbox))
    claimed = claim_file(settled[0], state / "claimed", "00000001-sample.fasta")
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from vnpd.output.outbox import fsync_dir


log = structlog.get_logger()

IGNORED_SUFFIXES = (".part", ".tmp")
MAX_NAME_BYTES = 200
"""Longest inbox name taken (UTF-8 bytes). The daemon derives longer names from it: the
claimed ``<job id>.<random>-<name>`` (+18) and ``failed/<name>.error.json`` (+11), and a
file name may have at most 255 bytes (NAME_MAX)."""
# Reads of a file cannot change what a scan finds; waking on them would let any reader
# (a backup, a user's `less`) spin the daemon's intake loop.
_QUIET_EVENTS = frozenset({"opened", "closed_no_write"})
# inotify cannot be had (watch/instance limits, no kernel support): poll instead.
_INOTIFY_LIMITS = frozenset({errno.ENOSPC, errno.EMFILE, errno.ENFILE, errno.ENOSYS})


def is_candidate_name(name: str) -> bool:
    """True if a file of this name may be claimed: not hidden, not ``*.part``/``*.tmp``.

    >>> [is_candidate_name(n) for n in ("a b.fasta", "-x.fa", ".x.fa", "x.fa.part")]
    [True, True, False, False]
    """
    return bool(name) and not name.startswith(".") and not name.endswith(IGNORED_SUFFIXES)


@dataclass(frozen=True)
class Candidate:
    """A regular file seen in the inbox, with the identity it had when it was scanned."""

    path: Path
    size: int
    mtime_ns: int
    inode: int
    device: int


class ClaimError(Exception):
    """A claim did not happen, or took a file other than the one that settled.

    ``reason`` is short and stable (``"vanished"``, ``"changed while being claimed"``,
    ``"replaced while being claimed"``, ``"destination exists"``); ``detail`` says more.
    ``kept`` is set only when a file *was* moved but is not what settled (found after the
    rename): its path in the claimed directory. Otherwise nothing moved and it is None.
    """

    def __init__(self, reason: str, detail: str = "", kept: Path | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.kept = kept


# (inbox, name) -> reason, so a skipped entry is logged once, not on every rescan.
_skipped: dict[tuple[str, str], str] = {}


def name_problem(name: str) -> str | None:
    """Why a candidate name cannot be taken by the daemon, or None if it can.

    The name becomes a journal text, a log field, an HDF5 attribute (``source_name``)
    and the base of longer file names, so it must be valid UTF-8 and short enough.

    >>> [name_problem(n) for n in ("a b.fasta", "x" * 201)]
    [None, 'file name longer than 200 bytes; rename it']
    """
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:  # undecodable bytes arrive as surrogate escapes
        return "file name is not valid UTF-8; rename it"
    if size > MAX_NAME_BYTES:
        return f"file name longer than {MAX_NAME_BYTES} bytes; rename it"
    return None


def printable_name(name: str) -> str:
    """``name`` for logs and messages: undecodable bytes shown as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", errors="backslashreplace")


def _skip_type(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "symlink (never followed)"
    if stat.S_ISFIFO(mode):
        return "FIFO (never opened)"
    if stat.S_ISDIR(mode):
        return "directory (the inbox is not recursive)"
    return "not a regular file"


def scan_inbox(inbox: Path) -> list[Candidate]:
    """The claimable regular files directly in ``inbox``, sorted by (mtime_ns, name).

    Uses ``lstat`` only: a symlink is skipped, never followed; a FIFO is skipped and never
    opened; directories, sockets and devices are skipped; so are names that are not UTF-8
    or too long (``name_problem``), and files the daemon may not read. Each skipped name
    is logged once (``inbox_skip``) while it stays there. Entries that vanish mid-scan are
    left out. A missing inbox yields ``[]`` and an ``inbox_missing`` warning; other
    OSErrors propagate.
    """
    try:
        entries = list(os.scandir(inbox))
    except FileNotFoundError:
        log.warning("inbox_missing", inbox=str(inbox))
        return []
    out: list[Candidate] = []
    skipped_now: set[str] = set()
    for entry in entries:
        if not is_candidate_name(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed or claimed between listing and lstat
        why = _skip_type(st.st_mode) or name_problem(entry.name)
        if why is None and not os.access(entry.path, os.R_OK):
            # Claimed, it could only fail; left here, it is taken once its owner fixes it.
            why = "not readable by the daemon (permission denied); make it readable"
        if why is None:
            out.append(Candidate(Path(entry.path), st.st_size, st.st_mtime_ns, st.st_ino,
                                 st.st_dev))
            continue
        skipped_now.add(entry.name)
        key = (str(inbox), entry.name)
        if _skipped.get(key) != why:
            _skipped[key] = why
            log.info("inbox_skip", file=printable_name(entry.name), reason=why)
    for key in [k for k in _skipped if k[0] == str(inbox) and k[1] not in skipped_now]:
        del _skipped[key]  # gone: log again if the name comes back
    out.sort(key=lambda c: (c.mtime_ns, c.path.name))
    return out


class SettleTracker:
    """A file must be unchanged (same size, mtime_ns, inode) for ``settle_s`` seconds
    (by ``clock``, monotonic) before it is claimable.

    Example::

        tracker = SettleTracker(1.0)
        tracker.observe(scan_inbox(inbox))   # [] : first sight starts the clock
        # ... at least 1 s later, nothing changed:
        tracker.observe(scan_inbox(inbox))   # [Candidate(...)]
    """

    def __init__(self, settle_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if settle_s < 0:
            raise ValueError(f"settle_s must be >= 0, not {settle_s}")
        self.settle_s = settle_s
        self.clock = clock
        self._seen: dict[Path, tuple[tuple[int, int, int], float]] = {}

    def observe(self, candidates: Iterable[Candidate]) -> list[Candidate]:
        """Record this scan; return the candidates settled now, in the order given.

        A changed signature restarts that file's clock. Paths absent from ``candidates``
        are forgotten, so a file that comes back starts over.
        """
        now = self.clock()
        settled = []
        current: dict[Path, tuple[tuple[int, int, int], float]] = {}
        for c in candidates:
            sig = (c.size, c.mtime_ns, c.inode)
            previous = self._seen.get(c.path)
            since = previous[1] if previous is not None and previous[0] == sig else now
            current[c.path] = (sig, since)
            if now - since >= self.settle_s:
                settled.append(c)
        self._seen = current
        return settled

    def pending(self) -> bool:
        """Files seen but not yet settled: the caller should scan again within settle_s."""
        now = self.clock()
        return any(now - since < self.settle_s for _, since in self._seen.values())

    def forget(self, path: Path) -> None:
        """Drop ``path`` (claimed, or a failed claim): if it is seen again, it starts over."""
        self._seen.pop(path, None)


def _describe(st: os.stat_result) -> str:
    return (f"type={stat.filemode(st.st_mode)[0]} inode={st.st_ino} size={st.st_size} "
            f"mtime_ns={st.st_mtime_ns}")


def _same_file(st: os.stat_result, c: Candidate) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_ino == c.inode and st.st_dev == c.device


def _unchanged(st: os.stat_result, c: Candidate) -> bool:
    return _same_file(st, c) and st.st_size == c.size and st.st_mtime_ns == c.mtime_ns


def claim_file(candidate: Candidate, claimed_dir: Path, job_name: str) -> Path:
    """Rename ``candidate.path`` to ``claimed_dir / job_name`` atomically; return the new path.

    ``claimed_dir`` must be on the inbox's filesystem (else the rename's OSError EXDEV
    propagates). Steps: lstat the source and require the same regular file, size and
    mtime that settled; rename (a symlink would be moved as a link, never followed); lstat
    the destination and require the same file again; fsync both directories.

    Raises:
        ValueError: ``job_name`` is empty, ``.``/``..``, or contains ``/`` or NUL.
        ClaimError("vanished"): the source is gone (before or during the rename).
        ClaimError("changed while being claimed"): not the file that settled; nothing
            moved (``err.kept`` is None).
        ClaimError("destination exists"): ``claimed_dir / job_name`` is taken; nothing moved.
        ClaimError("replaced while being claimed" or "changed while being claimed",
            kept=dest): after the rename, ``dest`` is another inode (swapped in between the
            check and the rename) or the same one written meanwhile. It stays at ``dest``:
            renaming it back could silently replace a newer file of that name in the inbox.
            The caller decides what to do with it.
    """
    if not job_name or "/" in job_name or "\0" in job_name or job_name in (".", ".."):
        raise ValueError(f"bad job file name {job_name!r}")
    claimed_dir.mkdir(parents=True, exist_ok=True)
    dest = claimed_dir / job_name
    if os.path.lexists(dest):  # rename(2) would replace it silently
        raise ClaimError("destination exists", str(dest))
    try:
        st = os.lstat(candidate.path)
    except FileNotFoundError:
        raise ClaimError("vanished", f"{candidate.path} is gone") from None
    if not _unchanged(st, candidate):
        raise ClaimError("changed while being claimed",
                         f"settled as inode={candidate.inode} size={candidate.size} "
                         f"mtime_ns={candidate.mtime_ns}, now {_describe(st)}")
    try:
        os.rename(candidate.path, dest)
    except FileNotFoundError:
        raise ClaimError("vanished", f"{candidate.path} disappeared during the rename") \
            from None
    after = os.lstat(dest)
    fsync_dir(claimed_dir)
    fsync_dir(candidate.path.parent)
    if not _unchanged(after, candidate):
        reason = "changed while being claimed" if _same_file(after, candidate) else \
            "replaced while being claimed"
        raise ClaimError(reason, f"settled as inode={candidate.inode} size={candidate.size} "
                         f"mtime_ns={candidate.mtime_ns}, moved {_describe(after)}; kept at "
                         f"{dest}", kept=dest)
    return dest


class InboxWatcher:
    """watchdog observer (inotify; or PollingObserver when polling=True, for NFS) that sets
    ``wake`` on the event loop whenever something happens in the inbox (non-recursive).

    Events only *wake up* the daemon's scan; they can be lost, so the daemon also rescans
    on a timer (``inbox.rescan_interval_s``) and the scan is the truth. If inotify cannot
    be set up (watch or instance limit), it logs a warning and polls instead.
    """

    def __init__(self, inbox: Path, loop: asyncio.AbstractEventLoop, wake: asyncio.Event, *,
                 polling: bool = False, poll_interval_s: float = 1.0) -> None:
        self.inbox, self.loop, self.wake = inbox, loop, wake
        self.polling, self.poll_interval_s = polling, poll_interval_s
        self._observer: Any = None

    def _handler(self) -> Any:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler

        loop, wake = self.loop, self.wake

        class WakeOnEvent(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type in _QUIET_EVENTS:
                    return
                try:
                    loop.call_soon_threadsafe(wake.set)
                except RuntimeError:
                    pass  # the loop is closed: the daemon is gone, nobody to wake

        return WakeOnEvent()

    def _start_observer(self, polling: bool) -> None:
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        observer = (PollingObserver(timeout=self.poll_interval_s) if polling else Observer())
        observer.schedule(self._handler(), str(self.inbox), recursive=False)
        observer.start()
        self._observer = observer

    def start(self) -> None:
        """Start watching. Raises OSError if the inbox cannot be watched (e.g. missing)."""
        if self._observer is not None:
            return
        polling = self.polling
        try:
            self._start_observer(polling)
        except OSError as exc:
            if polling or exc.errno not in _INOTIFY_LIMITS:
                raise
            log.warning("inbox_inotify_unavailable", inbox=str(self.inbox), error=str(exc),
                        fallback="polling")
            polling = True
            self._start_observer(polling)
        log.info("inbox_watching", inbox=str(self.inbox),
                 observer="polling" if polling else type(self._observer).__name__,
                 poll_interval_s=self.poll_interval_s if polling else None)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the observer and join its thread for at most ``timeout_s``. Idempotent."""
        observer, self._observer = self._observer, None
        if observer is None:
            return
        observer.stop()
        observer.join(timeout=timeout_s)
        if observer.is_alive():
            log.warning("inbox_watcher_stop_timeout", timeout_s=timeout_s)
