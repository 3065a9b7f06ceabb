"""Tests for vnpd.daemon.inbox: names, scanning, settling, claiming, watching and submitting.

Real files, real FIFOs and symlinks, real watchdog observers; nothing of vnpd is mocked.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from vnpd.daemon.inbox import (
    IGNORED_SUFFIXES,
    MAX_NAME_BYTES,
    Candidate,
    ClaimError,
    InboxWatcher,
    SettleTracker,
    claim_file,
    is_candidate_name,
    scan_inbox,
)
from vnpd.daemon.submit import submit_files

REPO = Path(__file__).resolve().parents[1]
FASTA = b">s1 test\nMKTAYIAKQR\n>s2\nACDEFGHIK\n"


def _write(path: Path, data: bytes = FASTA, mtime_ns: int | None = None) -> Path:
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def _in_thread(fn, timeout_s: float = 10.0):  # type: ignore[no-untyped-def]
    """Run ``fn`` in a daemon thread; fail (instead of hanging) if it blocks."""
    result: list[object] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised in the test's thread
            error.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"{fn} blocked (opened a FIFO?)"
    if error:
        raise error[0]
    return result[0]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# is_candidate_name ------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "sample.fasta", "with space.fasta", "  lead and trail  .fa", "α-protéine_蛋白.fasta",
    "-leading-dash.fasta", "--", "a..b.fasta", "x..", "noext", "x.part.fasta",
    "x.tmp.fa", "x.partial", "x.PART", "x-part", "a\nb.fasta",
])
def test_candidate_names(name: str) -> None:
    assert is_candidate_name(name)


@pytest.mark.parametrize("name", [
    "", ".", "..", ".hidden", ".sample.fasta", "..a.fasta", ".x.abc123.part",
    "upload.part", "sample.fasta.part", "sample.fasta.tmp", "x.tmp", ".part", ".tmp",
])
def test_not_candidate_names(name: str) -> None:
    assert not is_candidate_name(name)


def test_ignored_suffixes_are_the_documented_ones() -> None:
    assert IGNORED_SUFFIXES == (".part", ".tmp")


# scan_inbox -------------------------------------------------------------------------

def test_scan_takes_only_regular_candidate_files(tmp_path: Path) -> None:
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    inbox.mkdir()
    outside.mkdir()
    secret = _write(outside / "secret.fasta")
    _write(inbox / "good.fasta", mtime_ns=2_000_000_000)
    _write(inbox / "with space é.fasta", mtime_ns=1_000_000_000)
    _write(inbox / "-dash.fasta", mtime_ns=3_000_000_000)
    (inbox / "link-out.fasta").symlink_to(secret)
    (inbox / "link-in.fasta").symlink_to(inbox / "good.fasta")
    (inbox / "dangling.fasta").symlink_to(tmp_path / "nowhere")
    os.mkfifo(inbox / "pipe.fasta")
    (inbox / "subdir.fasta").mkdir()
    _write(inbox / "subdir.fasta" / "nested.fasta")
    _write(inbox / ".hidden.fasta")
    _write(inbox / "upload.fasta.part")
    _write(inbox / "upload.fasta.tmp")

    with capture_logs() as logs:
        found = _in_thread(lambda: scan_inbox(inbox))

    assert [c.path.name for c in found] == ["with space é.fasta", "good.fasta", "-dash.fasta"]
    good = found[1]
    st = os.lstat(inbox / "good.fasta")
    assert good == Candidate(inbox / "good.fasta", st.st_size, st.st_mtime_ns, st.st_ino,
                             st.st_dev)
    skipped = {e["file"]: e["reason"] for e in logs if e["event"] == "inbox_skip"}
    assert set(skipped) == {"link-out.fasta", "link-in.fasta", "dangling.fasta",
                            "pipe.fasta", "subdir.fasta"}
    assert "symlink" in skipped["link-out.fasta"]
    assert "FIFO" in skipped["pipe.fasta"]
    assert "directory" in skipped["subdir.fasta"]
    assert secret.read_bytes() == FASTA  # untouched


def test_scan_never_opens_a_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.fasta")
    assert _in_thread(lambda: scan_inbox(tmp_path)) == []
    # No reader holds it open: a non-blocking writer open fails with ENXIO.
    with pytest.raises(OSError) as info:
        os.open(tmp_path / "pipe.fasta", os.O_WRONLY | os.O_NONBLOCK)
    assert info.value.errno == errno.ENXIO


def test_scan_logs_each_skip_once_while_present(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with capture_logs() as logs:
        for _ in range(3):
            scan_inbox(tmp_path)
        (tmp_path / "d").rmdir()
        scan_inbox(tmp_path)
        (tmp_path / "d").mkdir()
        scan_inbox(tmp_path)
    assert [e["file"] for e in logs if e["event"] == "inbox_skip"] == ["d", "d"]


def test_scan_skips_names_the_daemon_cannot_carry(tmp_path: Path) -> None:
    """Undecodable bytes would crash the journal and the HDF5 attrs; long names overflow
    NAME_MAX once the daemon adds its prefix or '.error.json'."""
    _write(Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.fasta")))
    _write(tmp_path / ("n" * (MAX_NAME_BYTES - 6) + ".fasta"))  # exactly the limit: taken
    _write(tmp_path / ("n" * (MAX_NAME_BYTES - 5) + ".fasta"))
    _write(tmp_path / ("蛋" * (MAX_NAME_BYTES // 3 + 1)))  # 67 characters, 201 bytes
    with capture_logs() as logs:
        found = scan_inbox(tmp_path)
        scan_inbox(tmp_path)
    assert [c.path.name for c in found] == ["n" * (MAX_NAME_BYTES - 6) + ".fasta"]
    skipped = {e["file"]: e["reason"] for e in logs if e["event"] == "inbox_skip"}
    assert len(skipped) == 3, "each skipped once"
    assert skipped["caf\\xe9.fasta"] == "file name is not valid UTF-8; rename it"
    assert skipped["蛋" * (MAX_NAME_BYTES // 3 + 1)] == \
        f"file name longer than {MAX_NAME_BYTES} bytes; rename it"


def test_scan_skips_a_file_the_daemon_cannot_read() -> None:
    """The daemon runs as its own user; a file saved with umask 077 by another user must
    wait in the inbox (claimed, it could only fail). As root, the scan runs as nobody."""
    inbox = Path(tempfile.mkdtemp(prefix="vnpd-unreadable-", dir="/tmp"))
    try:
        inbox.chmod(0o777)
        _write(inbox / "open.fasta").chmod(0o644)
        _write(inbox / "private.fasta").chmod(0o600)
        script = ("import json, sys; from pathlib import Path; "
                  "from structlog.testing import capture_logs; from vnpd.daemon.inbox import scan_inbox\n"
                  "with capture_logs() as logs: found = scan_inbox(Path(sys.argv[1]))\n"
                  "print(json.dumps([[c.path.name for c in found], logs]))")
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] \
            if os.geteuid() == 0 else []
        if as_nobody and shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot drop read permission")
        out = subprocess.run([*as_nobody, sys.executable, "-c", script, str(inbox)],
                             capture_output=True, text=True, check=True, cwd=REPO)
        found, logs = json.loads(out.stdout.strip().splitlines()[-1])
        assert found == ["open.fasta"]
        assert [(e["file"], e["reason"]) for e in logs if e["event"] == "inbox_skip"] == [
            ("private.fasta", "not readable by the daemon (permission denied); make it readable")]
    finally:
        shutil.rmtree(inbox)


def test_scan_sorts_by_mtime_then_name(tmp_path: Path) -> None:
    for name, t in [("b", 5), ("a", 5), ("c", 1), ("z", 9)]:
        _write(tmp_path / name, mtime_ns=t * 1_000_000_000)
    assert [c.path.name for c in scan_inbox(tmp_path)] == ["c", "a", "b", "z"]


def test_scan_of_missing_inbox_is_empty(tmp_path: Path) -> None:
    assert scan_inbox(tmp_path / "nope") == []


# SettleTracker ----------------------------------------------------------------------

def test_settles_only_after_settle_s_unchanged(tmp_path: Path) -> None:
    clock = FakeClock()
    tracker = SettleTracker(2.0, clock=clock)
    _write(tmp_path / "a.fasta")
    assert tracker.observe(scan_inbox(tmp_path)) == []
    assert tracker.pending()
    clock.now += 1.999
    assert tracker.observe(scan_inbox(tmp_path)) == []
    clock.now += 0.001
    settled = tracker.observe(scan_inbox(tmp_path))
    assert [c.path.name for c in settled] == ["a.fasta"]
    assert not tracker.pending()
    clock.now += 10
    assert tracker.observe(scan_inbox(tmp_path)) == settled  # stays settled until forgotten


@pytest.mark.parametrize("change", ["size", "mtime", "inode"])
def test_settle_clock_restarts_on_change(tmp_path: Path, change: str) -> None:
    clock = FakeClock()
    tracker = SettleTracker(1.0, clock=clock)
    path = _write(tmp_path / "a.fasta", mtime_ns=10**18)
    tracker.observe(scan_inbox(tmp_path))
    clock.now += 0.9
    if change == "size":
        with open(path, "ab") as fh:
            fh.write(b">s3\nMK\n")
        os.utime(path, ns=(10**18, 10**18))  # same mtime: the size alone must reset
    elif change == "mtime":
        os.utime(path, ns=(10**18 + 1, 10**18 + 1))
    else:  # same size and mtime, another file renamed over it
        _write(tmp_path / ".new", mtime_ns=10**18)
        os.rename(tmp_path / ".new", path)
    assert tracker.observe(scan_inbox(tmp_path)) == []
    clock.now += 0.9  # 1.8 s since first seen, 0.9 s since the change
    assert tracker.observe(scan_inbox(tmp_path)) == []
    clock.now += 0.1
    assert [c.path for c in tracker.observe(scan_inbox(tmp_path))] == [path]


def test_settle_forgets_absent_and_forgotten_files(tmp_path: Path) -> None:
    clock = FakeClock()
    tracker = SettleTracker(1.0, clock=clock)
    _write(tmp_path / "a.fasta")
    tracker.observe(scan_inbox(tmp_path))
    clock.now += 0.6
    tracker.observe([])  # a.fasta gone from this scan
    clock.now += 0.6
    assert tracker.observe(scan_inbox(tmp_path)) == []  # starts over
    clock.now += 1.0
    assert len(tracker.observe(scan_inbox(tmp_path))) == 1
    tracker.forget(tmp_path / "a.fasta")
    assert tracker.observe(scan_inbox(tmp_path)) == []
    tracker.forget(tmp_path / "never-seen")  # no error


def test_settle_zero_is_immediate_and_negative_refused(tmp_path: Path) -> None:
    _write(tmp_path / "a.fasta")
    assert len(SettleTracker(0.0, clock=FakeClock()).observe(scan_inbox(tmp_path))) == 1
    with pytest.raises(ValueError):
        SettleTracker(-1.0)


# claim_file -------------------------------------------------------------------------

def _one(inbox: Path) -> Candidate:
    (candidate,) = scan_inbox(inbox)
    return candidate


def test_claim_moves_atomically(tmp_path: Path) -> None:
    inbox, claimed = tmp_path / "inbox", tmp_path / "state" / "claimed"
    inbox.mkdir()
    _write(inbox / "my sample.fasta")
    candidate = _one(inbox)
    dest = claim_file(candidate, claimed, "00000042-my sample.fasta")
    assert dest == claimed / "00000042-my sample.fasta"
    assert dest.read_bytes() == FASTA
    assert os.lstat(dest).st_ino == candidate.inode
    assert not (inbox / "my sample.fasta").exists()
    assert scan_inbox(inbox) == []


def test_claim_of_vanished_file(tmp_path: Path) -> None:
    _write(tmp_path / "a.fasta")
    candidate = _one(tmp_path)
    (tmp_path / "a.fasta").unlink()
    with pytest.raises(ClaimError) as info:
        claim_file(candidate, tmp_path / "claimed", "1-a.fasta")
    assert info.value.reason == "vanished"
    assert info.value.kept is None
    assert list((tmp_path / "claimed").iterdir()) == []


def test_claim_of_file_that_grew(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.fasta")
    candidate = _one(tmp_path)
    with open(path, "ab") as fh:
        fh.write(b">late\nMK\n")
    with pytest.raises(ClaimError) as info:
        claim_file(candidate, tmp_path / "claimed", "1-a.fasta")
    assert info.value.reason == "changed while being claimed"
    assert f"size={candidate.size}" in str(info.value)
    assert path.exists() and not (tmp_path / "claimed" / "1-a.fasta").exists()


def test_claim_of_file_replaced_by_another(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.fasta", mtime_ns=10**18)
    candidate = _one(tmp_path)
    _write(tmp_path / ".b", mtime_ns=10**18)  # same size and mtime, another inode
    os.rename(tmp_path / ".b", path)
    with pytest.raises(ClaimError) as info:
        claim_file(candidate, tmp_path / "claimed", "1-a.fasta")
    assert info.value.reason == "changed while being claimed"
    assert path.exists()


def test_claim_never_moves_a_symlink_swapped_in(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    secret = _write(tmp_path / "secret.fasta")
    path = _write(inbox / "a.fasta")
    candidate = _one(inbox)
    path.unlink()
    path.symlink_to(secret)
    with pytest.raises(ClaimError) as info:
        claim_file(candidate, tmp_path / "claimed", "1-a.fasta")
    assert info.value.reason == "changed while being claimed"
    assert path.is_symlink() and secret.read_bytes() == FASTA


def test_claim_never_replaces_an_existing_claimed_file(tmp_path: Path) -> None:
    inbox, claimed = tmp_path / "inbox", tmp_path / "claimed"
    inbox.mkdir()
    claimed.mkdir()
    _write(claimed / "1-a.fasta", b"earlier job")
    _write(inbox / "a.fasta")
    with pytest.raises(ClaimError) as info:
        claim_file(_one(inbox), claimed, "1-a.fasta")
    assert info.value.reason == "destination exists"
    assert (claimed / "1-a.fasta").read_bytes() == b"earlier job"
    assert (inbox / "a.fasta").exists()


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b.fasta", "/abs", "nul\0.fasta"])
def test_claim_rejects_bad_job_names(tmp_path: Path, bad: str) -> None:
    _write(tmp_path / "a.fasta")
    with pytest.raises(ValueError):
        claim_file(_one(tmp_path), tmp_path / "claimed", bad)
    assert (tmp_path / "a.fasta").exists()


# InboxWatcher -----------------------------------------------------------------------

async def _wait_woken(wake: asyncio.Event) -> None:
    await asyncio.wait_for(wake.wait(), timeout=10)


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
async def test_watcher_wakes_when_a_file_appears(tmp_path: Path, polling: bool) -> None:
    wake = asyncio.Event()
    watcher = InboxWatcher(tmp_path, asyncio.get_running_loop(), wake, polling=polling,
                           poll_interval_s=0.1)
    watcher.start()
    try:
        await asyncio.sleep(0.3)  # the polling observer's first snapshot
        wake.clear()
        _write(tmp_path / ".x.part")
        os.rename(tmp_path / ".x.part", tmp_path / "x.fasta")
        await _wait_woken(wake)
        observer = watcher._observer
        assert type(observer).__name__ == ("PollingObserver" if polling else "InotifyObserver")
    finally:
        watcher.stop()
    assert not observer.is_alive()
    watcher.stop()  # idempotent


async def test_watcher_ignores_mere_reads(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.fasta")
    wake = asyncio.Event()
    watcher = InboxWatcher(tmp_path, asyncio.get_running_loop(), wake)
    watcher.start()
    try:
        await asyncio.sleep(0.2)
        wake.clear()
        for _ in range(5):
            path.read_bytes()
            scan_inbox(tmp_path)
        await asyncio.sleep(0.5)
        assert not wake.is_set()
        path.unlink()
        await _wait_woken(wake)
    finally:
        watcher.stop()


async def test_watcher_on_missing_inbox_raises(tmp_path: Path) -> None:
    for polling in (False, True):
        watcher = InboxWatcher(tmp_path / "nope", asyncio.get_running_loop(),
                               asyncio.Event(), polling=polling)
        with pytest.raises(OSError):
            watcher.start()
        watcher.stop()


# submit_files -----------------------------------------------------------------------

def test_submit_copies_and_leaves_no_temp(tmp_path: Path) -> None:
    inbox, src = tmp_path / "inbox", tmp_path / "src"
    inbox.mkdir()
    src.mkdir()
    a = _write(src / "a.fasta")
    b = _write(src / "b é c.fa", FASTA * 3)
    out = submit_files([a, b], inbox)
    assert out == [inbox / "a.fasta", inbox / "b é c.fa"]
    assert sorted(os.listdir(inbox)) == ["a.fasta", "b é c.fa"]
    assert out[0].read_bytes() == FASTA and out[1].read_bytes() == FASTA * 3
    assert a.exists() and b.exists()  # copied, not moved


def test_submit_from_another_filesystem(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem here")
    src_dir = Path(tempfile.mkdtemp(dir=shm))
    try:
        src = _write(src_dir / "remote.fasta")
        (dest,) = submit_files([src], tmp_path)
        assert dest.read_bytes() == FASTA and os.listdir(tmp_path) == ["remote.fasta"]
    finally:
        shutil.rmtree(src_dir)


def test_submit_picks_a_fresh_name_on_collision(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    src = _write(tmp_path / "x.fasta", b">new\nMK\n")
    noext = _write(tmp_path / "reads", b">r\nMK\n")
    _write(inbox / "x.fasta", b"already here")
    names = [p.name for p in submit_files([src, src, noext, noext], inbox)]
    assert names == ["x.1.fasta", "x.2.fasta", "reads", "reads.1"]
    assert (inbox / "x.fasta").read_bytes() == b"already here"
    assert (inbox / "x.2.fasta").read_bytes() == b">new\nMK\n"


def test_submit_without_hard_links_never_replaces_a_file(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """On a filesystem without hard links, submit renames after a check, still no clobber."""
    def refuse(src: object, dst: object, **_: object) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")
    monkeypatch.setattr(os, "link", refuse)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    src = _write(tmp_path / "x.fasta", b">new\nMK\n")
    _write(inbox / "x.fasta", b"already here")
    assert [p.name for p in submit_files([src, src], inbox)] == ["x.1.fasta", "x.2.fasta"]
    assert (inbox / "x.fasta").read_bytes() == b"already here"
    assert sorted(os.listdir(inbox)) == ["x.1.fasta", "x.2.fasta", "x.fasta"]  # no temp left


def test_submit_refuses_non_regular_sources_before_copying(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    good = _write(tmp_path / "good.fasta")
    (tmp_path / "adir").mkdir()
    os.mkfifo(tmp_path / "pipe.fasta")
    with pytest.raises(IsADirectoryError, match="adir"):
        submit_files([good, tmp_path / "adir"], inbox)
    with pytest.raises(OSError, match="not a regular file") as info:
        _in_thread(lambda: submit_files([good, tmp_path / "pipe.fasta"], inbox))
    assert info.value.errno == errno.EINVAL
    with pytest.raises(FileNotFoundError):
        submit_files([good, tmp_path / "missing.fasta"], inbox)
    assert os.listdir(inbox) == []  # nothing submitted when any source is bad


@pytest.mark.parametrize("name", [".hidden.fasta", "x.fasta.part", "x.tmp"])
def test_submit_refuses_names_the_daemon_would_ignore(tmp_path: Path, name: str) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with pytest.raises(OSError, match="ignores"):
        submit_files([_write(tmp_path / name)], inbox)
    assert os.listdir(inbox) == []


def test_submit_never_exposes_a_partial_file(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    size = 96 << 20
    src = tmp_path / "big.fasta"
    with open(src, "wb") as fh:
        line = b"MKTAYIAKQRQISFVKSHFSRQ" * 3 + b"\n"
        fh.write(b">big\n" + line * (size // len(line)))
    size = src.stat().st_size
    seen_sizes: list[int] = []
    hidden: set[str] = set()
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            seen_sizes.extend(c.size for c in scan_inbox(inbox))
            hidden.update(n for n in os.listdir(inbox) if n.startswith("."))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        (dest,) = submit_files([src], inbox)
        # The poller's last scan may have come just before the rename: let it scan after.
        deadline = time.monotonic() + 30
        while not seen_sizes and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        done.set()
        poller.join(10)
    assert hidden, "the poller never saw the copy in progress"
    assert all(re.fullmatch(r"\.big\.fasta\.[0-9a-f]{12}\.part", n) for n in hidden)
    assert seen_sizes and set(seen_sizes) <= {size}  # a candidate is always complete
    assert os.listdir(inbox) == ["big.fasta"] and dest.stat().st_size == size


def test_submit_then_settle_then_claim(tmp_path: Path) -> None:
    inbox, claimed = tmp_path / "inbox", tmp_path / "claimed"
    inbox.mkdir()
    (dest,) = submit_files([_write(tmp_path / "s.fasta")], inbox)
    clock = FakeClock()
    tracker = SettleTracker(0.5, clock=clock)
    assert tracker.observe(scan_inbox(inbox)) == []
    clock.now += 0.5
    (candidate,) = tracker.observe(scan_inbox(inbox))
    assert candidate.path == dest
    job = claim_file(candidate, claimed, "00000001-s.fasta")
    tracker.forget(candidate.path)
    assert job.read_bytes() == FASTA and os.listdir(inbox) == []
