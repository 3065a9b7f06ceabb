"""The inbox: find settled regular files, claim them atomically, and the writer side.

Writer contract (docs/INBOX.md): write the file elsewhere, or under a hidden name or one
ending in ``.part``/``.tmp``, then rename it into place; ``vnpd submit`` does exactly this.
The daemon only takes regular files whose size, mtime and inode have not changed for
``settle_s``. Symlinks are never followed (nothing outside the inbox is read), FIFOs are
never opened, directories are skipped.

The watchdog observer only *wakes* the daemon; a scan of the directory is the truth,
because file-system events can be lost (overflow, network filesystems).

Example::

    settled = tracker.observe(scan_inbox(inbox))
    claimed = claim_file(settled[0], state / "claimed", "00000001-sample.fasta")
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger()

IGNORED_SUFFIXES = (".part", ".tmp")


def is_candidate_name(name: str) -> bool:
    """Not hidden, not an in-progress upload (``*.part``, ``*.tmp``)."""
    return bool(name) and not name.startswith(".") and not name.endswith(IGNORED_SUFFIXES)


@dataclass(frozen=True)
class Candidate:
    path: Path
    size: int
    mtime_ns: int
    inode: int
    device: int


class ClaimError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_skipped: set[tuple[str, str]] = set()


def _skip(name: str, why: str) -> None:
    if (name, why) not in _skipped:  # log each once, not on every rescan
        _skipped.add((name, why))
        log.info("inbox_skip", file=name, reason=why)


def scan_inbox(inbox: Path) -> list[Candidate]:
    """Regular files in ``inbox`` that are candidates, oldest first. Never follows links."""
    out: list[Candidate] = []
    try:
        entries = list(os.scandir(inbox))
    except FileNotFoundError:
        return out
    for entry in entries:
        if not is_candidate_name(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # vanished between listing and stat
        if stat.S_ISLNK(st.st_mode):
            _skip(entry.name, "symlink (never followed)")
        elif stat.S_ISFIFO(st.st_mode):
            _skip(entry.name, "FIFO (never opened)")
        elif stat.S_ISDIR(st.st_mode):
            _skip(entry.name, "directory")
        elif not stat.S_ISREG(st.st_mode):
            _skip(entry.name, "not a regular file")
        else:
            out.append(Candidate(Path(entry.path), st.st_size, st.st_mtime_ns, st.st_ino,
                                 st.st_dev))
    out.sort(key=lambda c: (c.mtime_ns, c.path.name))
    return out


class SettleTracker:
    """A file is claimable once unchanged (size, mtime, inode) for ``settle_s`` seconds."""

    def __init__(self, settle_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.settle_s = settle_s
        self.clock = clock
        self._seen: dict[Path, tuple[tuple[int, int, int], float]] = {}

    def observe(self, candidates: Iterable[Candidate]) -> list[Candidate]:
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
        """Files seen but not yet settled: the caller should look again soon."""
        now = self.clock()
        return any(now - since < self.settle_s for _, since in self._seen.values())

    def forget(self, path: Path) -> None:
        self._seen.pop(path, None)


def _same(st: os.stat_result, c: Candidate) -> bool:
    return (stat.S_ISREG(st.st_mode) and st.st_ino == c.inode and st.st_size == c.size
            and st.st_mtime_ns == c.mtime_ns)


def claim_file(candidate: Candidate, claimed_dir: Path, job_name: str) -> Path:
    """Rename ``candidate`` into ``claimed_dir/job_name`` atomically and verify it.

    Raises ClaimError("vanished") when it is gone, ClaimError("changed ...") when it is no
    longer the file that settled. A file swapped in between the check and the rename is
    detected after the rename by its inode; it is then moved back to the inbox and the
    claim fails, so the new file settles and is claimed on its own.
    """
    if not job_name or "/" in job_name or "\0" in job_name or job_name in (".", ".."):
        raise ValueError(f"bad job file name {job_name!r}")
    claimed_dir.mkdir(parents=True, exist_ok=True)
    dest = claimed_dir / job_name
    try:
        st = os.lstat(candidate.path)
    except FileNotFoundError:
        raise ClaimError("vanished before it could be claimed") from None
    if not _same(st, candidate):
        raise ClaimError("changed while being claimed (size, mtime or inode differ)")
    try:
        os.rename(candidate.path, dest)
    except FileNotFoundError:
        raise ClaimError("vanished while being claimed") from None
    after = os.lstat(dest)
    if not _same(after, candidate):
        os.rename(dest, candidate.path)
        raise ClaimError("replaced while being claimed; left in the inbox to settle again")
    return dest


class InboxWatcher:
    """A watchdog observer on the inbox whose events set an asyncio.Event."""

    def __init__(self, inbox: Path, loop: asyncio.AbstractEventLoop, wake: asyncio.Event, *,
                 polling: bool = False, poll_interval_s: float = 1.0) -> None:
        self.inbox, self.loop, self.wake = inbox, loop, wake
        self.polling, self.poll_interval_s = polling, poll_interval_s
        self._observer: Any = None

    def start(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        loop, wake = self.loop, self.wake

        class Wake(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                loop.call_soon_threadsafe(wake.set)

        self._observer = (PollingObserver(timeout=self.poll_interval_s) if self.polling
                          else Observer())
        self._observer.schedule(Wake(), str(self.inbox), recursive=False)
        self._observer.start()
        log.info("inbox_watching", inbox=str(self.inbox),
                 observer="polling" if self.polling else type(self._observer).__name__)

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None


def _free_name(inbox: Path, name: str) -> Path:
    dest = inbox / name
    stem, suffix = Path(name).stem, Path(name).suffix
    i = 0
    while os.path.lexists(dest):
        i += 1
        dest = inbox / f"{stem}.{i}{suffix}"
    return dest


def submit_files(files: Sequence[Path], inbox: Path) -> list[Path]:
    """Copy each file to a hidden temp name in the inbox, fsync, rename into place.

    The daemon never sees a partial file: until the rename it has a hidden ``.part``
    name. An existing name in the inbox is not replaced: ``x.fasta`` becomes
    ``x.1.fasta``. Raises OSError for sources that are not regular files.
    """
    out = []
    for src in files:
        st = os.stat(src)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{src}: not a regular file")
        tmp = inbox / f".{src.name}.{uuid.uuid4().hex[:12]}.part"
        try:
            with open(src, "rb") as fin, open(tmp, "xb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
                fout.flush()
                os.fsync(fout.fileno())
            while True:
                dest = _free_name(inbox, src.name)
                try:
                    os.link(tmp, dest)  # fails if the name was taken meanwhile
                    break
                except FileExistsError:
                    continue
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(inbox, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        out.append(dest)
    return out
