"""Row writes on a thread of their own (vnpd/output/background.py), alone and through
PartialOutput.write_in_background: real threads, real files."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.output.test_hdf5 import tagged_rows
from tests.output.test_residues import residue_rows
from vnpd.output import background
from vnpd.output.background import BackgroundWriter
from vnpd.output.hdf5 import PartialOutput


def open_file(path: Path, size: int) -> int:
    path.write_bytes(b"\0" * size)
    return os.open(path, os.O_WRONLY)


def test_writes_land_at_their_offsets_once_drained(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = open_file(path, 4096)
    writer = BackgroundWriter(fd, limit_bytes=64)
    rng = np.random.default_rng(0)
    want = bytearray(4096)
    for offset in rng.permutation(256).tolist():  # 256 writes of 16 bytes, any order
        data = rng.integers(0, 256, 16, dtype=np.uint8)
        want[offset * 16:(offset + 1) * 16] = data.tobytes()
        writer.submit([(memoryview(data), offset * 16)], 16)
    writer.drain()
    os.close(fd)
    assert path.read_bytes() == bytes(want)


def test_submit_waits_while_the_queue_is_over_its_limit(tmp_path: Path) -> None:
    fd = open_file(tmp_path / "f", 64)
    release, started = threading.Event(), threading.Event()

    def held(data: bytes, offset: int) -> Iterator[tuple[memoryview, int]]:
        started.set()
        release.wait(10)  # the thread holds this submission until released
        yield memoryview(data), offset

    writer = BackgroundWriter(fd, limit_bytes=8)
    writer.submit(held(b"a" * 8, 0), 8)  # taken by the thread, which holds it
    assert started.wait(10)
    writer.submit([(memoryview(b"b" * 8), 8)], 8)  # over the limit, but none queued: in
    done = threading.Event()

    def third() -> None:
        writer.submit([(memoryview(b"c" * 8), 16)], 8)
        done.set()

    threading.Thread(target=third).start()
    assert not done.wait(0.5), "a submission past the limit did not wait"
    release.set()
    assert done.wait(10), "the waiting submission never went in"
    writer.drain()
    os.close(fd)
    assert (tmp_path / "f").read_bytes()[:24] == b"a" * 8 + b"b" * 8 + b"c" * 8


def test_a_failed_write_is_raised_by_every_later_drain_and_submit(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\0" * 64)
    fd = os.open(path, os.O_RDONLY)  # pwrite fails: EBADF
    writer = BackgroundWriter(fd, limit_bytes=1 << 20)
    writer.submit([(memoryview(b"x" * 8), 0)], 8)
    for _ in range(2):
        with pytest.raises(OSError, match="an earlier row write failed"):
            writer.drain()
    with pytest.raises(OSError, match="an earlier row write failed"):
        writer.submit([(memoryview(b"y" * 8), 8)], 8)
    os.close(fd)


def test_the_thread_ends_when_idle_and_starts_again(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(background, "IDLE_S", 0.1)
    path = tmp_path / "f"
    fd = open_file(path, 32)

    def writers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "vnpd-row-writer"]

    before = len(writers())
    writer = BackgroundWriter(fd, limit_bytes=1 << 20)
    writer.submit([(memoryview(b"a" * 8), 0)], 8)
    writer.drain()
    deadline = time.monotonic() + 5
    while len(writers()) > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(writers()) == before, "an idle writer thread did not end"
    writer.submit([(memoryview(b"b" * 8), 8)], 8)
    writer.drain()
    os.close(fd)
    assert path.read_bytes()[:16] == b"a" * 8 + b"b" * 8


@pytest.mark.parametrize("output_dtype", ["float32", "float16"])
def test_partial_output_in_background_equals_writes_in_place(tmp_path: Path,
                                                             output_dtype: str) -> None:
    """Scattered rows and residue rows, several layers: the same bytes either way, after
    flush; and close waits for what is still queued."""
    n, dim = 40, 6
    counts = np.random.default_rng(1).integers(0, 7, n)
    batches = np.array_split(np.random.default_rng(2).permutation(n), 7)
    files = {}
    for mode in ("in_place", "background"):
        path = tmp_path / f"{mode}.h5"
        out = PartialOutput.create(path, n, dim, output_dtype, num_layers=2,
                                   residue_counts=counts)
        if mode == "background":
            out.write_in_background(64)  # small: most submissions wait for the thread
        for batch in batches:
            rows = np.repeat(tagged_rows(batch, dim)[:, None], 2, axis=1)
            out.write_rows(batch, rows)
            out.write_residues(batch, residue_rows(batch.tolist(), counts, (2, dim)),
                               counts[batch])
        out.close()
        with h5py.File(path, "r") as f:
            files[mode] = (f["embeddings"][:], f["residues"][:])
    for got, want in zip(files["background"], files["in_place"]):
        np.testing.assert_array_equal(got, want)
    emb, res = files["background"]
    np.testing.assert_array_equal(emb[:, 1, 0], np.arange(n) + 0.25)
    np.testing.assert_array_equal(
        res, residue_rows(list(range(n)), counts, (2, dim)).astype(output_dtype))


def test_row_checks_still_raise_at_the_call_in_background(tmp_path: Path) -> None:
    out = PartialOutput.create(tmp_path / "a.h5", 4, 3, "float16")
    out.write_in_background(1 << 20)
    with pytest.raises(ValueError, match="non-finite"):
        out.write_rows(np.array([0]), np.full((1, 3), 1e6))  # inf as float16
    with pytest.raises(ValueError, match="duplicate"):
        out.write_rows(np.array([1, 1]), np.ones((2, 3)))
    out.write_rows(np.array([2]), np.ones((1, 3)))
    out.flush()
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert f["embeddings"][2].tolist() == [1.0, 1.0, 1.0]
    out.close()


def test_no_rows_and_sequences_without_residues_in_background(tmp_path: Path) -> None:
    """A batch of no rows, and rows with no residues (length 0), write nothing and fail
    nothing: the next flush raises no earlier error."""
    counts = np.array([0, 2, 0])
    out = PartialOutput.create(tmp_path / "a.h5", 3, 2, "float32", residue_counts=counts)
    out.write_in_background(1 << 20)
    out.write_rows(np.zeros(0, dtype=np.int64), np.zeros((0, 2)))
    out.write_residues(np.zeros(0, dtype=np.int64), np.zeros((0, 2)), np.zeros(0, np.int64))
    out.write_residues(np.array([0, 2]), np.zeros((0, 2)), np.array([0, 0]))
    out.write_rows(np.array([1]), np.ones((1, 2)))
    out.write_residues(np.array([1]), np.full((2, 2), 3.0), np.array([2]))
    out.flush()
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert f["residues"][:].tolist() == [[3.0, 3.0], [3.0, 3.0]]
    out.close()
