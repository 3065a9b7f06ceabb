"""Hostile input, end to end: one real daemon receives a corpus of bad, odd and valid inputs.

The corpus (``hostile_corpus``) has one :class:`Case` per inbox entry, each with what must
become of it (docs/INPUT.md, docs/INBOX.md):

- :class:`Refused`: moved to ``failed/<name>`` unchanged, with ``<name>.error.json``
  whose reason says what is wrong, and the record and line where there is one;
- :class:`Processed`: published with the expected ids and lengths, and rows equal to a
  reference (``vnpd embed`` of a canonical file) where the case is a variant of it;
- :class:`Skipped`: not a regular file the daemon may take (symlink, FIFO, directory,
  socket, undecodable or overlong name): left where it is, logged once as ``inbox_skip``;
- ``IGNORED``: a hidden or in-progress name: left where it is, silently.

All of it is dropped into one running daemon (two CPU workers, the tiny test model, a
real watchdog observer) at once, then files that change or vanish while they settle. The
daemon must stay up and take new work afterwards, exit 0 on SIGTERM, never open a FIFO,
never follow a symlink, and write nothing outside its four directories: the test tree
around them, the daemon's HOME and its TMPDIR are compared before and after.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import json
import lzma
import os
import random
import socket
import sys
import threading
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import random_sequences
from tests.daemon_harness import REPO, Daemon, DaemonDirs, write_config
from tests.daemon.test_app import embed_reference
from vnpd.daemon.inbox import MAX_NAME_BYTES
from vnpd.output.verify import read_output, verify_output

pytestmark = pytest.mark.timeout(600)

SETTLE_S = 1.0  # long enough that the writers below never pause that long between writes
MILLION = 1_000_000


@dataclass(frozen=True)
class Refused:
    reason: str  # a substring of the report's reason
    line: int | None = None
    record: str | None = None


@dataclass(frozen=True)
class Processed:
    ids: list[str]
    lengths: list[int]
    same_as: str | None = None  # a case whose rows these must equal


@dataclass(frozen=True)
class Skipped:
    reason: str  # a substring of the inbox_skip reason


IGNORED = "ignored"  # left in place, silently
VANISHED = "vanished"  # deleted before it settled: nothing may happen
Expect = Refused | Processed | Skipped | str


@dataclass
class Case:
    name: str
    expect: Expect
    content: bytes | None = None  # dropped by rename; None: ``make`` creates the entry
    make: Callable[[Path], None] | None = field(default=None, repr=False)


def fasta(records: list[tuple[str, str]], newline: str = "\n") -> str:
    return "".join(f">{rid} hostile corpus{newline}{seq}{newline}" for rid, seq in records)


def small_valid(tag: str, n: int = 3) -> tuple[bytes, Processed]:
    """A distinct small valid file, so that no two cases share content."""
    seqs = random_sequences([5 + 11 * i for i in range(n)], seed=zlib.crc32(tag.encode()))
    ids = [f"{tag}_{i}" for i in range(n)]
    return fasta(list(zip(ids, seqs))).encode(), Processed(ids, [len(s) for s in seqs])


def hdf5_bytes() -> bytes:
    buffer = BytesIO()
    with h5py.File(buffer, "w") as f:
        f["embeddings"] = np.zeros((2, 4), np.float32)
    return buffer.getvalue()


def zip_bytes(member: str, data: bytes) -> bytes:
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr(member, data)
    return buffer.getvalue()


def nul_line(data: bytes) -> int:
    return data[: data.index(b"\0")].count(b"\n") + 1


def hostile_corpus(outside: Path) -> list[Case]:
    """Every case; entries that are not plain files are made in ``outside`` and the inbox."""
    cases: list[Case] = []

    def refused(name: str, content: bytes, reason: str, line: int | None = None,
                record: str | None = None) -> None:
        cases.append(Case(name, Refused(reason, line, record), content))

    # --- not FASTA at all -------------------------------------------------------------
    refused("empty.fasta", b"", "no FASTA records")
    refused("blank.fasta", b"\n   \n\t\r\n", "no FASTA records")
    refused("comments_only.fasta", b";a comment\n;another\n", "no FASTA records")
    noise = random.Random(4).randbytes(4096)
    refused("random.bin", noise, "NUL byte: this is a binary file", nul_line(noise))
    program = Path(sys.executable).resolve().read_bytes()[:65536]
    refused("program.fasta", program, "NUL byte: this is a binary file", nul_line(program))
    refused("embeddings.h5", hdf5_bytes(), "the file is HDF5", 1)
    good = fasta([("p1", "MKTAYIAKQR")]).encode()
    refused("reads.fasta.gz", gzip.compress(good), "gzip-compressed; decompress it first", 1)
    refused("reads.fasta.bz2", bz2.compress(good), "bzip2-compressed", 1)
    refused("reads.fasta.xz", lzma.compress(good), "xz-compressed", 1)
    refused("reads.fasta.zst", b"\x28\xb5\x2f\xfd\x04\x58" + good, "zstd-compressed", 1)
    refused("reads.zip", zip_bytes("reads.fasta", good), "zip archive; extract it first", 1)
    refused("no_header.fasta", b"MKVLAAGG\nGHHH\n",
            "not FASTA: expected a '>' header line, found 'MKVLAAGG'", 1)
    refused("table.csv", b"id,sequence\np1,MKV\n", "found 'id,sequence'", 1)
    refused("reads.fastq", b"@r1\nACGT\n+\nIIII\n", "this looks like FASTQ", 1)
    refused("genome.gb", b"LOCUS       NC_001 5386 bp DNA\n", "this looks like GenBank", 1)
    # --- FASTA with a broken record ---------------------------------------------------
    refused("header_only.fasta", b">lonely the only line\n", "empty sequence (no residues)", 1,
            "lonely")
    refused("header_then_header.fasta", b">p1\n>p2\nMKV\n", "empty sequence", 1, "p1")
    refused("star_only.fasta", b">p1\n*\n", "empty sequence (only a '*')", 1, "p1")
    refused("empty_id.fasta", b"> no id here\nMKV\n", "empty record id", 1)
    refused("duplicate_ids.fasta", b">p1\nMKV\n>p2\nMKV\n>p1\nGGG\n",
            "duplicate id 'p1' (first at line 1)", 5, "p1")
    refused("digits.fasta", b">ok\nMKV\n>num\nMKV1LAA\n", "invalid residue '1' at position 4",
            4, "num")
    refused("symbols.fasta", b">sym\nMKV#LAA\n", "invalid residue '#' at position 4", 2, "sym")
    refused("alignment.fasta", b">aln1\nMKV-LAA\n", "'-' at position 4 (alignment gap", 2,
            "aln1")
    refused("inner_stop.fasta", b">orf7\nMKV*LAA\n", "'*' at position 4 is not at the end", 2,
            "orf7")
    refused("nucleotide.fasta", b">contig_1 len=40\n" + b"ACGT" * 10 + b"\n",
            "looks like a nucleotide sequence", 1, "contig_1")
    refused("crlf_bad.fasta", b">a\r\nMKV\r\n>b\r\nMKV\r\n>c\r\nMKJV\r\n",
            "invalid residue 'J' at position 3", 6, "c")
    refused("bare_cr.fasta", b">p1\rMKV\r>p2\rMKV\r", "bare carriage-return", 1)
    late_nul = "".join(f">a{i}\nMKV\n" for i in range(2000)).encode() + b">b\nM\x00V\n"
    refused("late_nul.fasta", late_nul, "NUL byte", 4002, "b")
    # --- encodings --------------------------------------------------------------------
    refused("latin1_header.fasta", b">ok\nMKV\n>caf\xe9\nMKV\n",
            "header is not valid UTF-8 (byte 0xe9 at column 5)", 3)
    refused("latin1_sequence.fasta", b">p1\nMK\xe9V\n",
            "sequence is not valid UTF-8 (byte 0xe9 at column 3)", 2)
    refused("fullwidth.fasta", ">fw\nMKＶLA\n".encode(), "non-ASCII character 'Ｖ' (U+FF36)",
            2, "fw")
    text = ">a\nMKV\n"
    refused("utf16le.fasta", ("\ufeff" + text).encode("utf-16-le"), "UTF-16-LE encoded", 1)
    refused("utf16be.fasta", ("\ufeff" + text).encode("utf-16-be"), "UTF-16-BE encoded", 1)
    refused("utf16_no_bom.fasta", text.encode("utf-16-le"), "NUL byte", 1)
    refused("utf32.fasta", ("\ufeff" + text).encode("utf-32-le"), "UTF-32-LE encoded", 1)
    # --- size -------------------------------------------------------------------------
    refused("one_giant_line.fasta", b">giant\n" + b"M" * (MILLION + 1) + b"\n",
            "sequence longer than max_residues=1000000", 1, "giant")
    refused("huge_header.fasta", b">" + b"h" * (1 << 20) + b"\nMKV\n",
            "header line longer than 1048576 bytes", 1)
    # A million tiny records whose last repeats the first: the cheapest honest million.
    # It must be read through in bounded time and memory, and the line found exactly.
    million = "".join(f">r{i}\nM\n" for i in range(MILLION)) + ">r0\nM\n"
    refused("million_tiny.fasta", million.encode(), "duplicate id 'r0' (first at line 1)",
            2 * MILLION + 1, "r0")

    def sparse(path: Path) -> None:  # 64 MiB of zeros that take no disk
        with open(path, "wb") as fh:
            fh.truncate(64 << 20)

    cases.append(Case("disk_image.fasta", Refused("NUL byte", 1), make=sparse))

    # --- valid, however it is written -------------------------------------------------
    seqs = random_sequences([30, 64, 100, 7, 1100], seed=21)
    ids = [f"sp|Q{i}|CANON_{i}" for i in range(len(seqs))]
    lengths = [len(s) for s in seqs]
    canonical = Processed(ids, lengths)
    cases.append(Case("canonical.fasta", canonical, fasta(list(zip(ids, seqs))).encode()))
    same = Processed(ids, lengths, same_as="canonical.fasta")
    cases.append(Case("crlf.fasta", same, fasta(list(zip(ids, seqs)), "\r\n").encode()))
    messy = "\ufeff;exported by a spreadsheet\n" + "".join(
        f">{rid}\tmessy\n\n" + "\n".join(f" {s[j:j + 7].lower()}\t" for j in range(0, len(s), 7))
        + "*\n;comment\n\n" for rid, s in zip(ids, seqs))
    cases.append(Case("messy.fasta", same, messy.rstrip("\n").encode()))
    halves = [fasta(list(zip(ids[:2], seqs[:2]))), fasta(list(zip(ids[2:], seqs[2:])))]
    cases.append(Case("concatenated_boms.fasta", same,
                      b"".join(b"\xef\xbb\xbf" + h.encode() for h in halves)))
    long_seq = random_sequences([300_000], seed=3, rare_every=0)[0]
    cases.append(Case("long_line.fasta", Processed(["long", "short"], [300_000, 3]),
                      f">long\n{long_seq}\n>short\nMKV\n".encode()))
    uids = ["protéine_α|蛋白", "ü-1", "emoji_🧬", "quote'\"id"]
    cases.append(Case("unicode_ids.fasta", Processed(uids, [4] * 4),
                      fasta([(u, "MKVL") for u in uids]).encode()))
    tiny_ids = [f"t{i}" for i in range(20_000)]
    cases.append(Case("many_tiny.fasta", Processed(tiny_ids, [1] * len(tiny_ids)),
                      "".join(f">{t}\nW\n" for t in tiny_ids).encode()))
    # --- names --------------------------------------------------------------------
    names = ["with space.fasta", "ünïcødé 蛋白质.fasta", "-leading-dash.fasta", "--version",
             "a..b.fasta", "x..", "line\nbreak.fasta", "$(touch PWNED).fasta", "*.fasta",
             "same.fasta", "same.fa", "already.h5", "x.PART", "n" * (MAX_NAME_BYTES - 6) + ".fa"]
    for i, name in enumerate(names):
        content, expect = small_valid(f"name{i}")
        cases.append(Case(name, expect, content))
    content, expect = small_valid("hardlinked")
    source = outside / "linked_source.fasta"
    source.write_bytes(content)
    cases.append(Case("hardlink.fasta", expect,
                      make=lambda path: os.link(source, path)))  # a regular file: taken
    # --- entries that are not the daemon's to take ----------------------------------------
    secret = outside / "secret.fasta"
    secret.write_bytes(good)
    (outside / "dir").mkdir()
    (outside / "dir" / "inside.fasta").write_bytes(good)
    os.mkfifo(outside / "pipe")

    def link(target: Path | str) -> Callable[[Path], None]:
        return lambda path: path.symlink_to(target)

    def unix_socket(path: Path) -> None:
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.close()  # the socket file stays

    def directory(path: Path) -> None:
        path.mkdir()
        (path / "nested.fasta").write_bytes(good)

    for name, make, why in [
        ("symlink_out.fasta", link(secret), "symlink"),
        ("symlink_dotdot.fasta", link("../../outside/secret.fasta"), "symlink"),
        ("symlink_parent.fasta", link(".."), "symlink"),
        ("symlink_in.fasta", link("canonical.fasta"), "symlink"),
        ("symlink_dir.fasta", link(outside / "dir"), "symlink"),
        ("symlink_fifo.fasta", link(outside / "pipe"), "symlink"),
        ("dangling.fasta", link(outside / "nowhere"), "symlink"),
        ("pipe.fasta", lambda path: os.mkfifo(path), "FIFO (never opened)"),
        ("folder.fasta", directory, "directory"),
        ("socket.fasta", unix_socket, "not a regular file"),
    ]:
        cases.append(Case(name, Skipped(why), make=make))
    cases.append(Case(os.fsdecode(b"caf\xe9-latin1-name.fasta"), Skipped("not valid UTF-8"),
                      good))
    cases.append(Case("L" * 230 + ".fasta", Skipped(f"longer than {MAX_NAME_BYTES} bytes"), good))
    for name in ("..hidden.fasta", ".hidden.fasta", "upload.fasta.part", "upload.fasta.tmp"):
        cases.append(Case(name, IGNORED, good))
    return cases


def drop_bytes(inbox: Path, name: str, data: bytes) -> None:
    """The writer contract: a hidden temp name, then one rename."""
    tmp = inbox / f".{zlib.crc32(name.encode('utf-8', 'surrogateescape')):08x}.part"
    tmp.write_bytes(data)
    os.rename(tmp, inbox / name)


def snapshot(root: Path, exclude: Path) -> dict[str, tuple[object, ...]]:
    """Type, size, mtime and content hash (or link target) of everything under ``root``."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == exclude:
            dirnames.clear()
            continue
        for name in dirnames + filenames:
            path = here / name
            if path == exclude:
                continue
            st = os.lstat(path)
            if os.path.islink(path):
                detail: object = os.readlink(path)
            elif path.is_file() and not path.is_fifo():
                detail = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                detail = None
            out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, detail)
    return out


def write_slowly(path: Path, pieces: list[bytes], pause_s: float) -> None:
    """A writer that does not follow the contract: in place, in pieces, with pauses."""
    with open(path, "wb") as fh:
        for piece in pieces:
            fh.write(piece)
            fh.flush()
            time.sleep(pause_s)


def settle_races(inbox: Path) -> list[Case]:
    """Files that change or vanish while they settle; returns their cases.

    Every pause is under SETTLE_S, so none may be claimed before its writer is done.
    """
    cases = []
    # Grows record by record: only the complete file may be taken.
    grow_ids = [f"g{i}" for i in range(6)]
    pieces = [fasta([(g, "MKVLAAG" * (i + 1))]).encode() for i, g in enumerate(grow_ids)]
    cases.append(Case("growing.fasta", Processed(grow_ids, [7 * (i + 1) for i in range(6)])))
    # Written in place, then replaced by a rename: only the new file may be taken.
    content, expect = small_valid("replacement")
    cases.append(Case("replaced.fasta", expect))
    # Written in place, touched, then deleted: nothing may happen.
    cases.append(Case("vanishing.fasta", VANISHED))

    grower = threading.Thread(target=write_slowly,
                              args=(inbox / "growing.fasta", pieces, SETTLE_S / 5))
    grower.start()
    write_slowly(inbox / "replaced.fasta", [b">r\nMK1\n", b">r2\nMKV\n"], SETTLE_S / 5)
    drop_bytes(inbox, "replaced.fasta", content)
    vanishing = inbox / "vanishing.fasta"
    write_slowly(vanishing, [b">v\nMK1\n"] * 3, SETTLE_S / 5)
    vanishing.unlink()
    grower.join()
    return cases


def expected_outputs(cases: list[Case]) -> int:
    return sum(isinstance(c.expect, Processed) for c in cases)


@pytest.fixture()
def sandbox(tmp_path: Path) -> tuple[DaemonDirs, Path, dict[str, str]]:
    """The daemon's dirs under tmp_path/vnpd; ``outside``, HOME and TMPDIR beside them."""
    for sub in ("outside", "home", "tmp"):
        (tmp_path / sub).mkdir()
    env = {"HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp")}
    return DaemonDirs(tmp_path / "vnpd"), tmp_path / "outside", env


def test_hostile_corpus_is_refused_skipped_or_processed_and_the_daemon_stays_up(
        sandbox: tuple[DaemonDirs, Path, dict[str, str]], tiny_model: Path) -> None:
    dirs, outside, env = sandbox
    dirs.inbox.mkdir(parents=True)
    cases = hostile_corpus(outside)
    assert len(cases) >= 30 and len({c.name for c in cases}) == len(cases)
    before = snapshot(dirs.root.parent, exclude=dirs.root)
    config = write_config(dirs, tiny_model, inbox={"settle_s": SETTLE_S})
    daemon = Daemon(config, dirs, env=env)
    try:
        daemon.wait_ready()
        for case in cases:
            if case.make is not None:
                case.make(dirs.inbox / case.name)
            else:
                drop_bytes(dirs.inbox, case.name, case.content or b"")
        cases += settle_races(dirs.inbox)
        refused = [c for c in cases if isinstance(c.expect, Refused)]
        skipped = [c for c in cases if isinstance(c.expect, Skipped)]
        daemon.wait_for(
            lambda: len(list(dirs.outbox.iterdir())) >= expected_outputs(cases)
            and all((dirs.failed / f"{c.name}.error.json").exists() for c in refused)
            and len(daemon.events("inbox_skip")) >= len(skipped),
            300, "every case to be published, refused or skipped")
        # Still up and still taking work after all of that.
        content, after = small_valid("after")
        drop_bytes(dirs.inbox, "after.fasta", content)
        cases.append(Case("after.fasta", after, content))
        daemon.wait_outputs(["after.h5"], timeout=120)
        time.sleep(2 * SETTLE_S)  # anything wrongly claimed late would show up now
        assert daemon.proc.poll() is None
    finally:
        code = daemon.terminate()
    assert code == 0
    assert not daemon.events("task_crashed")
    # Each file claimed once, and only the files that are the daemon's to take: not the
    # vanished one, not the replaced one's first version (it would have been refused).
    assert sorted(e["file"] for e in daemon.events("job_claimed")) == sorted(
        c.name for c in cases if isinstance(c.expect, (Processed, Refused)))
    # Nothing was written outside the four directories, HOME and TMPDIR included.
    assert snapshot(dirs.root.parent, exclude=dirs.root) == before
    assert {p.name for p in dirs.root.iterdir()} == {
        "inbox", "outbox", "state", "failed", "config.toml", daemon.log_path.name}
    assert not (REPO / "PWNED").exists() and not (dirs.root / "PWNED").exists()

    check_refused(dirs, [c for c in cases if isinstance(c.expect, Refused)])
    check_processed(dirs, [c for c in cases if isinstance(c.expect, Processed)], tiny_model)
    check_left_alone(dirs, daemon, outside, [c for c in cases
                                             if isinstance(c.expect, Skipped) or c.expect == IGNORED])
    # Every claimed file was finished: nothing is left in state/ but the journal.
    assert not list((dirs.state / "claimed").iterdir())
    assert not list((dirs.state / "jobs").iterdir())


def check_refused(dirs: DaemonDirs, cases: list[Case]) -> None:
    for case in cases:
        assert isinstance(case.expect, Refused)
        moved = dirs.failed / case.name
        if case.content is not None:
            assert moved.read_bytes() == case.content, f"{case.name} changed on its way"
        report = json.loads((dirs.failed / f"{case.name}.error.json").read_text())
        where = f"{case.name}: {report}"
        assert report["file"] == case.name, where
        assert case.expect.reason in report["reason"], where
        assert report["line"] == case.expect.line, where
        assert report["record"] == case.expect.record, where
    outputs = {read_output(p)[3]["source_name"] for p in dirs.outbox.iterdir()}
    assert not outputs & {c.name for c in cases}


def check_processed(dirs: DaemonDirs, cases: list[Case], model: Path) -> None:
    by_source = {}
    for path in dirs.outbox.iterdir():
        verify_output(path)
        embeddings, ids, lengths, attrs = read_output(path)
        assert attrs["source_name"] not in by_source, f"two outputs for {attrs['source_name']}"
        by_source[attrs["source_name"]] = (path.name, embeddings, ids, lengths)
    assert set(by_source) == {c.name for c in cases}
    assert {by_source["same.fasta"][0], by_source["same.fa"][0]} == {"same.h5", "same.1.h5"}
    assert by_source["-leading-dash.fasta"][0] == "-leading-dash.h5"
    for case in cases:
        assert isinstance(case.expect, Processed)
        _, embeddings, ids, lengths = by_source[case.name]
        assert ids == case.expect.ids, case.name
        assert lengths.tolist() == case.expect.lengths, case.name
        assert embeddings.shape[0] == len(ids) and np.isfinite(embeddings).all(), case.name
        if case.expect.same_as:
            np.testing.assert_allclose(embeddings, by_source[case.expect.same_as][1], atol=1e-5,
                                       err_msg=case.name)
    canonical = next(c for c in cases if c.name == "canonical.fasta")
    src = dirs.root.parent / "reference" / "canonical.fasta"
    src.parent.mkdir()
    src.write_bytes(canonical.content or b"")
    np.testing.assert_allclose(by_source["canonical.fasta"][1],
                               embed_reference(src, model, src.parent), atol=1e-5)


def check_left_alone(dirs: DaemonDirs, daemon: Daemon, outside: Path, cases: list[Case]) -> None:
    skips = {e["file"]: e["reason"] for e in daemon.events("inbox_skip")}
    for case in cases:
        path = dirs.inbox / case.name
        assert os.path.lexists(path), f"{case.name} was taken"
        shown = os.fsencode(case.name).decode("utf-8", "backslashreplace")
        if isinstance(case.expect, Skipped):
            assert case.expect.reason in skips.get(shown, ""), f"{case.name}: {skips.get(shown)}"
        else:
            assert shown not in skips
    assert len(daemon.events("inbox_skip")) == len(skips), "a skip was logged twice"
    assert (dirs.inbox / "folder.fasta" / "nested.fasta").exists()
    for fifo in (dirs.inbox / "pipe.fasta", outside / "pipe"):
        # Nobody holds it open for reading: a non-blocking writer open fails with ENXIO.
        with pytest.raises(OSError) as info:
            os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        assert info.value.errno == errno.ENXIO


def test_writer_still_writing_after_the_claim_fails_its_job_not_the_daemon(
        tmp_path: Path, tiny_model: Path) -> None:
    """``cp`` straight into the inbox, stalled past settle_s: the file is claimed and
    indexed, then its writer appends through the descriptor it still holds."""
    dirs = DaemonDirs(tmp_path)
    daemon = Daemon(write_config(dirs, tiny_model, inbox={"settle_s": 0.3}), dirs)
    report = dirs.failed / "stalled.fasta.error.json"
    try:
        daemon.wait_ready()
        # ~900k tokens: minutes of work for the tiny model on two CPU workers. Made before
        # the file is opened: on a loaded machine, making it took longer than settle_s,
        # and the empty file was claimed (and failed) before anything was written.
        text = fasta(list(zip([f"s{i}" for i in range(3000)],
                              random_sequences([300] * 3000, seed=1))))
        with open(dirs.inbox / "stalled.fasta", "w") as writer:
            writer.write(text)
            writer.flush()
            daemon.wait_for(lambda: any(e.get("file") == "stalled.fasta"
                                        for e in daemon.events("job_started")), 60, "the claim")
            writer.write(">late\nMK1V\n")
        drop_bytes(dirs.inbox, "good.fasta", b">g\nMKVL\n")
        daemon.wait_for(report.exists, 120, "the stalled file's report")
        daemon.wait_outputs(["good.h5"])
    finally:
        code = daemon.terminate()
    assert code == 0
    assert "changed after it was indexed" in json.loads(report.read_text())["reason"]
    assert not (dirs.outbox / "stalled.h5").exists()
