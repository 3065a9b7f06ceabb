"""The on-disk index: one validating pass, 16 bytes per record, memory-mapped back."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import random_sequences, write_fasta
from vnpd.inputs.fasta import FastaError
from vnpd.inputs import index as index_module
from vnpd.inputs.index import FileIndex, index_fasta, iter_indexed, iter_windows, sha256_file


def test_index_offsets_lengths_and_windows(tmp_path: Path) -> None:
    seqs = random_sequences([5, 1500, 1, 300] * 10, seed=2)
    src = write_fasta(tmp_path / "a.fasta", seqs)
    index = index_fasta(src)
    assert index.num_records == 40 and index.sha256 == sha256_file(src)
    assert index.lengths.tolist() == [len(s) for s in seqs]
    raw = src.read_bytes()
    assert all(raw[o:o + 1] == b">" for o in index.offsets.tolist())
    index.save(tmp_path / "idx")
    loaded = FileIndex.load(tmp_path / "idx")
    assert isinstance(loaded.offsets, np.memmap)
    np.testing.assert_array_equal(loaded.offsets, index.offsets)
    windows = list(iter_windows(src, loaded, 7, start=3))
    assert [w[0] for w in windows] == [3, 10, 17, 24, 31, 38]
    got = [r.sequence for _, records in windows for r in records]
    assert got == seqs[3:]


def test_index_records_the_identity_of_the_file_it_describes(tmp_path: Path) -> None:
    src = write_fasta(tmp_path / "a.fasta", random_sequences([5, 7], seed=1))
    index = index_fasta(src)
    st = src.stat()
    assert (index.size, index.mtime_ns, index.inode) == (st.st_size, st.st_mtime_ns, st.st_ino)
    index.save(tmp_path / "idx")
    loaded = FileIndex.load(tmp_path / "idx")
    assert (loaded.size, loaded.mtime_ns, loaded.inode) == (index.size, index.mtime_ns, index.inode)


def test_file_written_while_being_indexed_is_refused(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that still holds the file open appends while the daemon reads it."""
    src = write_fasta(tmp_path / "a.fasta", random_sequences([5, 7], seed=1))

    def writer_appends_then_hash(path: Path) -> str:
        with open(path, "a") as fh:
            fh.write(">late\nMKV\n")
        return sha256_file(path)

    monkeypatch.setattr(index_module, "sha256_file", writer_appends_then_hash)
    with pytest.raises(FastaError, match="changed while it was being indexed; a writer"):
        index_fasta(src)


def test_file_changed_after_indexing_is_never_read_as_indexed(tmp_path: Path) -> None:
    seqs = random_sequences([5, 7, 9], seed=1)
    src = write_fasta(tmp_path / "a.fasta", seqs)
    index = index_fasta(src)
    assert [r.sequence for r in iter_indexed(src, index, 1)] == seqs[1:]
    with open(src, "a") as fh:  # a stalled writer goes on after the claim
        fh.write(">late\nMK1V\n")
    for read in (lambda: list(iter_indexed(src, index)), lambda: list(iter_windows(src, index, 2))):
        with pytest.raises(FastaError, match="changed after it was indexed"):
            read()


def test_index_without_identity_still_stops_at_the_last_indexed_record(tmp_path: Path) -> None:
    """An index saved before size/mtime/inode were recorded: the bounds still hold."""
    seqs = random_sequences([5, 7, 9], seed=1)
    src = write_fasta(tmp_path / "a.fasta", seqs)
    full = index_fasta(src)
    index = FileIndex(full.num_records, full.offsets, full.lengths, full.sha256)
    with open(src, "a") as fh:
        fh.write(">late\nMK1V\n")
    assert [r.sequence for r in iter_indexed(src, index)] == seqs  # the bad record is not read
    src.write_bytes(src.read_bytes()[: int(full.offsets[2])])  # truncated before record #3
    with pytest.raises(FastaError, match="ends before record #3"):
        list(iter_indexed(src, index))


def test_index_refuses_duplicates_before_any_compute(tmp_path: Path) -> None:
    src = tmp_path / "d.fasta"
    src.write_text(">a\nMKV\n>b\nMKV\n>a\nMKV\n")
    with pytest.raises(FastaError) as err:
        index_fasta(src)
    assert err.value.record_id == "a" and err.value.line == 5


def test_parent_memory_stays_bounded_for_millions_of_records(tmp_path: Path) -> None:
    """3M records: indexing in a fresh process must not grow its memory by more than
    ~16 bytes per record plus buffers (the index itself is 48 MB for 3M records)."""
    n = 3_000_000
    src = tmp_path / "many.fasta"
    with open(src, "w") as f:
        block = "".join(f">r{i}\nMKVLAG\n" for i in range(100_000))
        for k in range(n // 100_000):
            f.write(block.replace(">r", f">b{k}_"))
    script = textwrap.dedent(f"""
        import json, resource
        from pathlib import Path
        import vnpd.inputs.index, vnpd.daemon.scheduler, vnpd.daemon.app  # everything the parent imports
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        idx = vnpd.inputs.index.index_fasta(Path({str(src)!r}))
        idx.save(Path({str(tmp_path / 'idx')!r}))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"n": idx.num_records, "before_kb": before, "after_kb": after}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == n
    growth_mb = (result["after_kb"] - result["before_kb"]) / 1024
    # 16 B/record index + 8 B/record id hashes, with growth slack: far below 1 GB.
    assert growth_mb < 250, f"indexing {n} records grew the process by {growth_mb:.0f} MB"


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    data = np.random.default_rng(3).bytes((3 << 20) + 12345)
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path, chunk=4096) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def assert_same_index(got: FileIndex, want: FileIndex) -> None:
    """Every field of two indexes equal, the arrays by value and dtype."""
    assert (got.num_records, got.sha256, got.size, got.mtime_ns, got.inode) == \
        (want.num_records, want.sha256, want.size, want.mtime_ns, want.inode)
    for name in ("offsets", "lengths"):
        assert getattr(got, name).dtype == getattr(want, name).dtype == np.int64
        assert getattr(got, name).tolist() == getattr(want, name).tolist()


@pytest.mark.parametrize("sizes, block_from", [([5, 1500, 1, 300] * 10, 40),  # add only
                                               ([3, 70, 900, 2, 12, 400] * 50, 7),  # mixed
                                               ([1], 0), ([8000] * 300, 120)])  # > FLUSH_BYTES
def test_indexing_writer_gives_the_index_of_index_fasta(tmp_path: Path, sizes: list[int],
                                                        block_from: int) -> None:
    seqs = random_sequences(sizes, seed=len(sizes))
    ids = [f"contig{i}_chunk_{i % 7 + 1}R{i % 3 + 1}" for i in range(len(seqs))]
    path = tmp_path / "proteins.fasta"
    with index_module.IndexingWriter(path) as out:
        for rid, seq in zip(ids[:block_from], seqs[:block_from]):
            out.add(rid, seq)
        rest = [f">{rid}\n{seq}\n".encode() for rid, seq in zip(ids[block_from:], seqs[block_from:])]
        for lo in range(0, len(rest), 37):  # several blocks
            part = rest[lo:lo + 37]
            out.add_block(b"".join(part), np.array([len(t) for t in part]),
                          np.array([len(s) for s in seqs[block_from + lo:block_from + lo + 37]]))
    assert out.index is not None
    assert_same_index(out.index, index_fasta(path, kind="translated"))


def test_indexing_writer_with_no_records_gives_an_empty_index(tmp_path: Path) -> None:
    path = tmp_path / "proteins.fasta"
    with index_module.IndexingWriter(path) as out:
        pass
    st = path.stat()
    empty = np.empty(0, dtype=np.int64)
    assert_same_index(out.close(), FileIndex(0, empty, empty, hashlib.sha256(b"").hexdigest(),
                                             0, st.st_mtime_ns, st.st_ino))
    assert list(iter_indexed(path, out.close())) == []


def test_indexing_writer_refuses_a_block_that_disagrees_and_keeps_no_index(tmp_path: Path) -> None:
    path = tmp_path / "proteins.fasta"
    with pytest.raises(ValueError, match="does not hold 1 records"):
        with index_module.IndexingWriter(path) as out:
            out.add_block(b">a\nMK\n", np.array([5]), np.array([2]))
    assert out.index is None


def test_ids_read_from_headers_are_the_ids_of_the_records(tmp_path: Path) -> None:
    # Descriptions, tabs, CRLF, a comment line (the parser's fallback from that window on),
    # lower case and more records than one fast window: ids equal iter_indexed's.
    rng = np.random.default_rng(5)
    seqs = random_sequences([int(n) for n in rng.integers(1, 60, 9000)], seed=5)
    lines = []
    for i, s in enumerate(seqs):
        header = [f">r{i}", f">r{i} some description", f">r{i}\tx=1", f">p|{i}|Q{i} OS=virus"][i % 4]
        lines.append(header + ("\r\n" if i % 7 == 0 else "\n") + (s.lower() if i % 5 == 0 else s)
                     + "\n")
        if i == 6000:
            lines.append("; a comment line, read by the validating parser\n")
    path = tmp_path / "in.fasta"
    path.write_text("".join(lines), newline="")
    index = index_fasta(path)
    expected = [r.id for r in iter_indexed(path, index)]
    assert len(expected) == 9000 and expected[3] == "p|3|Q3"
    assert list(index_module.iter_indexed_ids(path, index)) == expected


def test_ids_of_a_file_changed_after_indexing_are_refused(tmp_path: Path) -> None:
    path = write_fasta(tmp_path / "in.fasta", ["MKV", "MLA"])
    index = index_fasta(path)
    path.write_text(">seq0\nMKV\n>other\nMLA\n")
    with pytest.raises(FastaError):
        list(index_module.iter_indexed_ids(path, index))
