"""Tests for vnpd.output.hdf5, vnpd.output.verify and vnpd.output.outbox: partial HDF5 outputs, finalize, verify
and atomic publish."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import vnpd
from vnpd.output import schema
from vnpd.output.outbox import (
    fsync_dir,
    link_without_replacing,
    output_name_for,
    publish_atomically,
    unique_destination,
)
from vnpd.output.hdf5 import SCHEMA_VERSION, OutputMeta, PartialOutput
from vnpd.output.verify import REQUIRED_ATTRS, IncompleteOutputError, read_output, verify_output

REPO = Path(__file__).resolve().parents[1]
META = OutputMeta(model="esm2_t6_8M_UR50D", layer=6, dtype="bfloat16", truncation=1022,
                  attention_backend="exact", source_name="sample.fasta",
                  source_sha256="ab" * 32)


def tagged_rows(positions: np.ndarray, dim: int) -> np.ndarray:
    """Rows whose every value encodes the row's position, so misplacement shows."""
    return np.repeat(positions.astype(np.float64)[:, None], dim, axis=1) + 0.25


def filled_partial(path: Path, n: int, dim: int, output_dtype: str = "float32") -> PartialOutput:
    out = PartialOutput.create(path, n, dim, output_dtype)
    out.write_ids_lengths(0, [f"seq{i}" for i in range(n)], np.arange(n) + 1)
    out.write_rows(np.arange(n), tagged_rows(np.arange(n), dim))
    return out


def test_schema_dtypes_and_attrs(tmp_path: Path) -> None:
    path = tmp_path / "job.partial.h5"
    filled_partial(path, 5, 8).finalize(META)
    verify_output(path)
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"embeddings", "ids", "lengths"}
        assert f["embeddings"].dtype == np.float32 and f["embeddings"].shape == (5, 8)
        string_info = h5py.check_string_dtype(f["ids"].dtype)
        assert string_info is not None and string_info.encoding == "utf-8"
        assert string_info.length is None  # variable length
        assert f["lengths"].dtype == np.int32 and f["lengths"].shape == (5,)
        assert set(f.attrs.keys()) == set(REQUIRED_ATTRS) | {"layer", "long_sequences"}
    emb, ids, lengths, attrs = read_output(path)
    assert ids == [f"seq{i}" for i in range(5)]
    assert lengths.tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(emb, tagged_rows(np.arange(5), 8))
    assert attrs["model"] == "esm2_t6_8M_UR50D" and attrs["layer"] == 6
    assert attrs["dtype"] == "bfloat16" and attrs["pooling"] == "mean"
    assert attrs["truncation"] == 1022 and attrs["attention_backend"] == "exact"
    assert attrs["vnpd_version"] == vnpd.__version__
    assert attrs["source_name"] == "sample.fasta" and attrs["source_sha256"] == "ab" * 32
    assert attrs["num_sequences"] == 5 and attrs["quarantined_ids"] == []
    assert attrs["schema_version"] == SCHEMA_VERSION
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", attrs["created_utc"])


def test_unicode_ids_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "u.h5"
    out = PartialOutput.create(path, 2, 4, "float32")
    out.write_ids_lengths(0, ["contig_α|1", "ωmega"], np.array([3, 4]))
    out.write_rows(np.array([0, 1]), np.ones((2, 4)))
    out.finalize(META)
    assert read_output(path)[1] == ["contig_α|1", "ωmega"]


def test_rows_out_of_order_land_at_their_positions(tmp_path: Path) -> None:
    n, dim = 300, 16
    path = tmp_path / "p.h5"
    out = PartialOutput.create(path, n, dim, "float32")
    out.write_ids_lengths(0, [f"s{i}" for i in range(100)], np.full(100, 7))
    out.write_ids_lengths(100, [f"s{i}" for i in range(100, n)], np.full(200, 7))
    order = np.random.default_rng(1).permutation(n)
    # scattered batches (fancy-index path), then reversed contiguous runs (slice path)
    for batch in np.array_split(order[:200], 7):
        out.write_rows(batch, tagged_rows(batch, dim))
    rest = np.sort(order[200:])
    for batch in (rest[:50][::-1], rest[50:]):
        out.write_rows(batch, tagged_rows(batch, dim))
    out.finalize(META)
    verify_output(path)
    emb, ids, _, _ = read_output(path)
    np.testing.assert_array_equal(emb, tagged_rows(np.arange(n), dim))
    assert ids == [f"s{i}" for i in range(n)]


def test_float16_output(tmp_path: Path) -> None:
    path = tmp_path / "h.h5"
    out = PartialOutput.create(path, 4, 8, "float16")
    out.write_ids_lengths(0, list("abcd"), np.arange(4))
    values = np.random.default_rng(0).standard_normal((4, 8))
    out.write_rows(np.array([3, 1, 0, 2]), values)
    with pytest.raises(ValueError, match="non-finite"):
        out.write_rows(np.array([0]), np.full((1, 8), 1e6))  # overflows float16
    out.finalize(META)
    verify_output(path)
    emb = read_output(path)[0]
    assert emb.dtype == np.float16
    np.testing.assert_allclose(emb[[3, 1, 0, 2]], values.astype(np.float16), rtol=0)


def test_write_rows_rejects_bad_input(tmp_path: Path) -> None:
    out = PartialOutput.create(tmp_path / "b.h5", 4, 3, "float32")
    with pytest.raises(ValueError, match="duplicate"):
        out.write_rows(np.array([1, 1]), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="outside"):
        out.write_rows(np.array([4]), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="shape"):
        out.write_rows(np.array([0]), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        out.write_rows(np.array([0]), np.full((1, 3), np.nan))
    with pytest.raises(ValueError, match="outside"):
        out.write_ids_lengths(3, ["a", "b"], np.array([1, 2]))
    with pytest.raises(ValueError):
        out.write_ids_lengths(0, ["a"], np.array([-1]))
    with pytest.raises(ValueError, match="output_dtype"):
        PartialOutput.create(tmp_path / "c.h5", 1, 1, "bfloat16")
    out.close()


def test_quarantine_compaction_keeps_alignment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(schema, "BLOCK_BYTES", 16 * 4 * 7)  # 7-row blocks: many blocks
    n, dim = 50, 16
    path = tmp_path / "q.h5"
    dropped = [0, 13, 14, 27, 49]
    filled_partial(path, n, dim).finalize(META, quarantined=[49, 13, 0, 27, 14])
    verify_output(path)
    emb, ids, lengths, attrs = read_output(path)
    kept = np.array([i for i in range(n) if i not in dropped])
    assert ids == [f"seq{i}" for i in kept]
    np.testing.assert_array_equal(emb, tagged_rows(kept, dim))
    assert lengths.tolist() == (kept + 1).tolist()
    assert attrs["quarantined_ids"] == [f"seq{i}" for i in dropped]
    assert attrs["num_sequences"] == n - len(dropped)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.h5"]  # no temp left


def test_quarantine_everything_and_empty_input(tmp_path: Path) -> None:
    path = tmp_path / "all.h5"
    filled_partial(path, 3, 4).finalize(META, quarantined=[0, 1, 2])
    verify_output(path)
    emb, ids, _, attrs = read_output(path)
    assert emb.shape == (0, 4) and ids == [] and attrs["quarantined_ids"] == ["seq0", "seq1", "seq2"]
    empty = tmp_path / "empty.h5"
    PartialOutput.create(empty, 0, 4, "float32").finalize(META)
    verify_output(empty)
    assert read_output(empty)[3]["num_sequences"] == 0


def test_long_quarantine_list_fits_in_attrs(tmp_path: Path) -> None:
    n = 6000  # far over the 64 KiB compact attribute limit
    path = tmp_path / "long.h5"
    filled_partial(path, n, 2).finalize(META, quarantined=range(0, n, 2))
    attrs = read_output(path)[3]
    assert len(attrs["quarantined_ids"]) == n // 2 and attrs["num_sequences"] == n // 2


def test_open_existing_after_close_continues(tmp_path: Path) -> None:
    path = tmp_path / "r.h5"
    out = PartialOutput.create(path, 6, 4, "float16")
    out.write_ids_lengths(0, list("abcdef"), np.arange(6))
    out.write_rows(np.array([0, 5]), tagged_rows(np.array([0, 5]), 4))
    out.close()
    out.close()  # idempotent
    with pytest.raises(IncompleteOutputError):
        verify_output(path)
    again = PartialOutput.open_existing(path)
    assert (again.num_sequences, again.dim, again.output_dtype) == (6, 4, "float16")
    again.write_rows(np.array([4, 1, 2, 3]), tagged_rows(np.array([4, 1, 2, 3]), 4))
    again.finalize(META)
    verify_output(path)
    np.testing.assert_array_equal(read_output(path)[0], tagged_rows(np.arange(6), 4))


def test_a_finalized_file_says_so_after_a_reopen(tmp_path: Path) -> None:
    """A daemon restarted after finalize must see it, so as not to compact twice."""
    path = tmp_path / "f.h5"
    out = filled_partial(path, 5, 4)
    assert not out.finalized and not out.closed
    out.finalize(META, quarantined=[1])
    assert out.closed
    again = PartialOutput.open_existing(path)
    assert again.finalized and again.num_sequences == 4
    again.close()
    assert read_output(path)[1] == ["seq0", "seq2", "seq3", "seq4"]


def test_finalize_with_ids_from_the_caller(tmp_path: Path) -> None:
    """The daemon's way: rows only in the partial file, ids and lengths given at the end."""
    path = tmp_path / "d.h5"
    out = PartialOutput.create(path, 5, 4, "float32")
    out.write_rows(np.arange(5), tagged_rows(np.arange(5), 4))
    with pytest.raises(ValueError, match="ids for 5 rows"):
        out.finalize(META, ids=iter(["a", "b"]), lengths=np.arange(5))
    with pytest.raises(ValueError, match="more ids"):
        out.finalize(META, ids=iter("abcdef"), lengths=np.arange(5))
    assert not out.finalized and not list(tmp_path.glob(".*compact*"))  # left as it was
    out.finalize(META, quarantined=[3], ids=iter("abcde"), lengths=np.arange(5) + 10)
    verify_output(path)
    emb, ids, lengths, attrs = read_output(path)
    assert ids == ["a", "b", "c", "e"] and attrs["quarantined_ids"] == ["d"]
    assert lengths.tolist() == [10, 11, 12, 14]
    np.testing.assert_array_equal(emb, tagged_rows(np.array([0, 1, 2, 4]), 4))


def test_finalize_with_row_fields_and_attributes(tmp_path: Path) -> None:
    """An input kind's per-row fields lose the quarantined rows as ids do; its attributes
    are written beside the standard ones."""
    fields = {"source_ids": np.array(["c1", "c1", "c2", "c\u00e9", "c3"], dtype=object),
              "strand": np.array([1, -1, 1, -1, 1], dtype=np.int8),
              "nt_start": np.arange(5, dtype=np.int64) * 300}
    extra = {"input_kind": "nucleotide", "proteins": "six_frame", "records": 7}
    path = tmp_path / "f.h5"
    out = PartialOutput.create(path, 5, 4, "float32")
    out.write_rows(np.arange(5), tagged_rows(np.arange(5), 4))
    with pytest.raises(ValueError, match="row field 'strand'"):
        out.finalize(META, ids=iter("abcde"), lengths=np.arange(5),
                     row_fields={"strand": np.zeros(4, dtype=np.int8)})
    out.finalize(META, quarantined=[1], ids=iter("abcde"), lengths=np.arange(5),
                 row_fields=fields, attributes=extra)
    verify_output(path)
    with h5py.File(path, "r") as f:
        assert [str(s) for s in f["source_ids"].asstr()[:]] == ["c1", "c2", "c\u00e9", "c3"]
        assert f["strand"].dtype == np.int8 and f["strand"][:].tolist() == [1, 1, -1, 1]
        assert f["nt_start"].dtype == np.int64 and f["nt_start"][:].tolist() == [0, 600, 900, 1200]
        assert f.attrs["input_kind"] == "nucleotide" and f.attrs["proteins"] == "six_frame"
        assert f.attrs["records"] == 7 and f.attrs["records"].dtype == np.int64
    # In place (vnpd embed's way: ids written before), and with zero rows.
    for n in (3, 0):
        path = tmp_path / f"g{n}.h5"
        out = PartialOutput.create(path, n, 4, "float32")
        out.write_ids_lengths(0, [f"s{i}" for i in range(n)], np.ones(n, dtype=np.int64))
        out.write_rows(np.arange(n), tagged_rows(np.arange(n), 4))
        out.finalize(META, row_fields={"source_ids": np.array(["x"] * n, dtype=object),
                                       "nt_end": np.arange(n, dtype=np.int64)},
                     attributes={"input_kind": "nucleotide"})
        verify_output(path)
        with h5py.File(path, "r") as f:
            assert f["source_ids"].shape == (n,) and f["nt_end"][:].tolist() == list(range(n))
            assert f.attrs["input_kind"] == "nucleotide"


def test_finalize_on_a_full_disk_fails_cleanly_and_can_run_again(tmp_path: Path) -> None:
    """A real full filesystem (a small tmpfs; needs root): OSError ENOSPC, the partial
    file untouched and no temp file left; once space is back, finalize succeeds."""
    fs = tmp_path / "fs"
    fs.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(fs)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        path, n = fs / "p.h5", 6000
        out = PartialOutput.create(path, n, 8, "float32")
        out.write_rows(np.arange(n), tagged_rows(np.arange(n), 8))
        out.flush()
        before = path.read_bytes()
        filler = fs / "filler"
        with open(filler, "wb", buffering=0) as fh:
            for size in (1 << 16, 1):
                try:
                    while True:
                        fh.write(b"\0" * size)
                except OSError:
                    pass
        ids = [f"record_{i}" for i in range(n)]
        with pytest.raises(OSError) as failure:
            out.finalize(META, ids=iter(ids), lengths=np.ones(n, dtype=np.int64))
        assert failure.value.errno == errno.ENOSPC
        assert path.read_bytes() == before and sorted(p.name for p in fs.iterdir()) == \
            ["filler", "p.h5"]
        filler.unlink()
        out.finalize(META, ids=iter(ids), lengths=np.ones(n, dtype=np.int64))
        verify_output(path)
        assert read_output(path)[1] == ids
    finally:
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)


def test_open_existing_rejects_broken_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(IncompleteOutputError, match="cannot reopen"):
        PartialOutput.open_existing(junk)
    partial = tmp_path / "nolengths.h5"
    with h5py.File(partial, "w") as f:
        f.create_dataset("embeddings", (2, 3), "f4")
        f.create_dataset("ids", (2,), h5py.string_dtype())
    with pytest.raises(IncompleteOutputError, match="lengths"):
        PartialOutput.open_existing(partial)


def test_publish_refuses_to_overwrite(tmp_path: Path) -> None:
    state, outbox = tmp_path / "state", tmp_path / "outbox"
    state.mkdir(), outbox.mkdir()
    src = state / "job.h5"
    filled_partial(src, 2, 4).finalize(META)
    existing = outbox / "sample.h5"
    existing.write_bytes(b"someone else's file")
    with pytest.raises(FileExistsError):
        publish_atomically(src, existing)
    assert existing.read_bytes() == b"someone else's file" and src.exists()
    dest = unique_destination(outbox, "sample.h5")
    assert dest == outbox / "sample.1.h5"
    assert publish_atomically(src, dest) == dest
    assert not src.exists()
    verify_output(dest)
    assert unique_destination(outbox, "sample.h5") == outbox / "sample.2.h5"
    assert unique_destination(outbox, "other.h5") == outbox / "other.h5"


def test_publish_to_a_taken_name_and_resume_after_crash_between_link_and_unlink(tmp_path: Path) -> None:
    src = tmp_path / "job.partial.h5"
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    filled_partial(src, 2, 4).finalize(META)
    (outbox / "x.h5").write_bytes(b"taken")
    assert publish_atomically(src, unique_destination(outbox, "x.h5")) == outbox / "x.1.h5"
    src2 = tmp_path / "job2.partial.h5"
    filled_partial(src2, 2, 4).finalize(META)
    os.link(src2, outbox / "y.h5")  # as if the daemon died right after linking
    assert publish_atomically(src2, outbox / "y.h5") == outbox / "y.h5"
    assert not src2.exists()
    verify_output(outbox / "y.h5")


def no_hard_links(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make os.link fail as it does on a filesystem without hard links."""
    def refuse(src: object, dst: object, **_: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", refuse)


def test_link_without_replacing_falls_back_to_a_checked_rename(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    src, taken, free = tmp_path / "src", tmp_path / "taken", tmp_path / "free"
    src.write_bytes(b"new")
    taken.write_bytes(b"old")
    link_without_replacing(src, tmp_path / "linked")  # hard links work here
    assert src.exists() and (tmp_path / "linked").read_bytes() == b"new"
    no_hard_links(monkeypatch)
    with pytest.raises(FileExistsError):
        link_without_replacing(src, taken)
    assert taken.read_bytes() == b"old" and src.exists()
    link_without_replacing(src, free)
    assert free.read_bytes() == b"new" and not src.exists()


def test_publish_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    src = tmp_path / "job.partial.h5"
    filled_partial(src, 2, 4).finalize(META)
    (outbox / "x.h5").write_bytes(b"taken")
    no_hard_links(monkeypatch)
    with pytest.raises(FileExistsError):
        publish_atomically(src, outbox / "x.h5")
    assert publish_atomically(src, unique_destination(outbox, "x.h5")) == outbox / "x.1.h5"
    assert not src.exists() and (outbox / "x.h5").read_bytes() == b"taken"
    verify_output(outbox / "x.1.h5")


def test_verify_output_catches_incomplete_files(tmp_path: Path) -> None:
    def finished(name: str) -> Path:
        path = tmp_path / name
        filled_partial(path, 4, 3).finalize(META)
        return path

    path = finished("attr.h5")
    with h5py.File(path, "r+") as f:
        del f.attrs["source_sha256"]
    with pytest.raises(IncompleteOutputError, match="source_sha256"):
        verify_output(path)

    path = finished("count.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["num_sequences"] = np.int64(5)
    with pytest.raises(IncompleteOutputError, match="num_sequences"):
        verify_output(path)

    path = finished("shape.h5")
    with h5py.File(path, "r+") as f:
        del f["lengths"]
        f.create_dataset("lengths", (3,), np.int32)
    with pytest.raises(IncompleteOutputError, match="lengths"):
        verify_output(path)

    path = finished("missing.h5")
    with h5py.File(path, "r+") as f:
        del f["ids"]
    with pytest.raises(IncompleteOutputError, match="ids"):
        verify_output(path)

    path = finished("nan.h5")
    with h5py.File(path, "r+") as f:
        f["embeddings"][2, 1] = np.nan
    with pytest.raises(IncompleteOutputError, match="NaN"):
        verify_output(path)

    unwritten = tmp_path / "unwritten.h5"  # rows never written, lengths never written
    out = PartialOutput.create(unwritten, 3, 2, "float32")
    out.write_rows(np.arange(3), np.ones((3, 2)))
    out.finalize(META)
    with pytest.raises(IncompleteOutputError, match="lengths"):
        verify_output(unwritten)

    no_ids = tmp_path / "no_ids.h5"  # rows and lengths written, ids never: "" reads
    out = PartialOutput.create(no_ids, 3, 2, "float32")
    out.write_rows(np.arange(3), np.ones((3, 2)))
    out.write_ids_lengths(2, ["c"], np.arange(1))
    out.write_ids_lengths(0, ["a", "b"], np.arange(2))
    out.write_ids_lengths(1, [""], np.arange(1))  # as if row 1 had never been written
    out.finalize(META)
    with pytest.raises(IncompleteOutputError, match="empty"):
        verify_output(no_ids)

    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(finished("whole.h5").read_bytes()[:1000])
    with pytest.raises(ValueError):
        verify_output(truncated)


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    from vnpd.output.outbox import publish_atomically
    from vnpd.output.hdf5 import OutputMeta, PartialOutput
    partial, dest, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    n, dim = 4000, 64
    out = PartialOutput.create(partial, n, dim, "float32")
    out.write_ids_lengths(0, [f"s{i}" for i in range(n)], np.arange(n) + 1)
    out.write_rows(np.arange(100), np.ones((100, dim)))
    out.flush()
    print("flushed", flush=True)
    rng = np.random.default_rng(0)
    if mode == "forever":  # keep rewriting rows 100..2999; rows 3000.. stay unwritten
        while True:
            pos = 100 + rng.choice(2900, 300, replace=False)
            out.write_rows(pos, np.full((300, dim), 2.0))
    for pos in np.array_split(100 + rng.permutation(n - 100), 100):
        out.write_rows(pos, np.full((len(pos), dim), 2.0))
        out.flush()
    out.finalize(OutputMeta("m", 1, "float32", 1022, "exact", "in.fa", "0" * 64),
                 quarantined=[5, 7])
    publish_atomically(partial, dest)
    print("published", flush=True)
""")


def start_child(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, Path, Path]:
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "outbox").mkdir(exist_ok=True)
    partial, dest = tmp_path / "state" / "job.partial.h5", tmp_path / "outbox" / "in.h5"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(partial), str(dest), mode],
                             stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "flushed"
    return child, partial, dest


def test_sigkill_mid_write_leaves_no_output_and_a_resumable_partial(tmp_path: Path) -> None:
    child, partial, dest = start_child(tmp_path, "forever")
    time.sleep(0.3)  # well into the write loop
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    with pytest.raises(IncompleteOutputError):
        verify_output(partial)
    # What was flushed before the kill is intact, and the file can be finished.
    out = PartialOutput.open_existing(partial)
    rest = np.arange(100, 4000)
    out.write_rows(rest, np.full((len(rest), 64), 3.0))
    out.finalize(META)
    publish_atomically(partial, dest)
    verify_output(dest)
    emb, ids, _, _ = read_output(dest)
    assert (emb[:100] == 1.0).all() and (emb[100:] == 3.0).all()
    assert ids == [f"s{i}" for i in range(4000)]


# The child runs ~0.15 s after its first flush here; the delays spread kills over the
# row writes, finalize (with compaction) and publish.
@pytest.mark.parametrize("delay", [0.0, 0.01, 0.03, 0.06, 0.09, 0.11, 0.13, 0.15, 0.3])
def test_sigkill_at_any_instant_leaves_no_file_or_a_complete_one(tmp_path: Path,
                                                                 delay: float) -> None:
    child, partial, dest = start_child(tmp_path, "finish")
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    if dest.exists():
        verify_output(dest)
        _, ids, _, attrs = read_output(dest)
        assert len(ids) == 3998 and attrs["quarantined_ids"] == ["s5", "s7"]
    assert [p.name for p in dest.parent.iterdir()] in ([], ["in.h5"])


@pytest.mark.parametrize("source, expected", [
    ("sample.fasta", "sample.h5"),
    ("sample.FASTA", "sample.h5"),
    ("x.fa", "x.h5"),
    ("x.faa", "x.h5"),
    ("x.fna", "x.h5"),
    ("x.fas", "x.h5"),
    ("x.txt", "x.h5"),
    ("x.fa.txt", "x.fa.h5"),
    ("reads.dat", "reads.dat.h5"),
    ("sample", "sample.h5"),
    ("run.v2.fasta", "run.v2.h5"),
    (".fa", ".fa.h5"),
    ("/some/dir/sample.fasta", "sample.h5"),
])
def test_output_name_for(source: str, expected: str) -> None:
    assert output_name_for(source) == expected


def test_fsync_dir_runs_on_a_directory(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    with pytest.raises(NotADirectoryError):
        (tmp_path / "f").write_bytes(b"")
        fsync_dir(tmp_path / "f")


def test_create_on_a_full_disk_raises_enospc_and_leaves_no_file(tmp_path: Path) -> None:
    """A real full disk (a 1 MiB tmpfs): create reports ENOSPC as OSError, which the daemon
    retries (h5py raises ValueError for some of these writes), and leaves nothing behind."""
    import errno
    import subprocess

    fs = tmp_path / "fs"
    fs.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(fs)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        path = fs / "partial.h5"
        with pytest.raises(OSError) as caught:
            PartialOutput.create(path, 4000, 1280, "float32")
        assert caught.value.errno == errno.ENOSPC
        assert not path.exists()
        small = PartialOutput.create(path, 10, 8, "float32")  # the retry starts afresh
        small.close()
        assert path.exists()
    finally:
        subprocess.run(["umount", str(fs)], check=False)


def test_window_slots_survive_a_reopen_and_stay_out_of_the_output(tmp_path: Path) -> None:
    """The daemon's window scratch: written by slot (again = replaced), reopened after a
    restart, and never copied into the finalized file, even with nothing to drop."""
    path = tmp_path / "w.h5"
    out = PartialOutput.create(path, 3, 4, "float32", window_slots=(5, 4))
    assert out.window_slots_shape == (5, 4)
    out.write_window_slots(np.array([3, 0]), np.full((2, 4), 7.0, np.float32))
    out.write_window_slots(np.array([3]), np.full((1, 4), 2.0, np.float32))
    out.flush()
    out.close()
    again = PartialOutput.open_existing(path)
    assert again.window_slots_shape == (5, 4)
    np.testing.assert_array_equal(again.read_window_slots(0, 4)[[0, 3], 0], [7.0, 2.0])
    again.write_ids_lengths(0, list("abc"), np.array([1, 2, 3]))
    again.write_rows(np.arange(3), tagged_rows(np.arange(3), 4))
    again.finalize(META)
    verify_output(path)
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"embeddings", "ids", "lengths"}
    assert PartialOutput.create(tmp_path / "t.h5", 2, 4, "float32").window_slots_shape is None
    plan = PartialOutput.create(tmp_path / "p.h5", 2, 4, "float32", window_slots=(1, 4),
                                window_plan=(30, 11))
    assert plan.window_plan == (30, 11)
    plan.close()
    assert PartialOutput.open_existing(tmp_path / "p.h5").window_plan == (30, 11)
    assert PartialOutput.open_existing(tmp_path / "t.h5").window_plan == ()


# Prefilled partial files (the daemon's): ids, lengths, fields, attributes at create ------

def prefilled(path: Path, n: int, dim: int, **fields: np.ndarray) -> PartialOutput:
    out = PartialOutput.create(path, n, dim, "float32", ids=(f"seq{i}" for i in range(n)),
                               lengths=np.arange(n) + 1, meta=META, row_fields=fields,
                               attributes={"input_kind": "test", "chunk_length": 300,
                                           "cache_hits": -1})
    out.write_rows(np.arange(n)[::-1].copy(), tagged_rows(np.arange(n)[::-1], dim))
    return out


def test_prefilled_file_finalizes_in_place(tmp_path: Path) -> None:
    path = tmp_path / "p.h5"
    out = prefilled(path, 7, 4, frame=np.arange(7) % 6)
    assert out.prefilled and not out.finalized
    out.flush()
    with pytest.raises(IncompleteOutputError, match="not finalized"):
        verify_output(path)  # every row written, but not marked: never published
    inode = path.stat().st_ino
    out.finalize(META, attributes={"cache_hits": 5, "computed_sequences": 2})
    assert path.stat().st_ino == inode  # no new file: the rows were not copied
    verify_output(path)
    emb, ids, lengths, attrs = read_output(path)
    assert ids == [f"seq{i}" for i in range(7)] and lengths.tolist() == list(range(1, 8))
    assert np.array_equal(emb, tagged_rows(np.arange(7), 4))
    assert attrs["schema_version"] == SCHEMA_VERSION and attrs["num_sequences"] == 7
    assert attrs["input_kind"] == "test" and attrs["chunk_length"] == 300
    assert attrs["cache_hits"] == 5 and attrs["computed_sequences"] == 2  # placeholder, new
    assert attrs["quarantined_ids"] == [] and attrs["source_name"] == META.source_name
    with h5py.File(path, "r") as f:
        assert f["frame"][:].tolist() == (np.arange(7) % 6).tolist()
        assert f.attrs["cache_hits"].dtype == np.int64


def test_prefilled_file_with_quarantine_is_rebuilt_with_its_fields(tmp_path: Path) -> None:
    path = tmp_path / "q.h5"
    out = prefilled(path, 6, 3, frame=np.arange(6) * 10,
                    protein=np.array([f"p{i}" for i in range(6)], dtype=object))
    out.finalize(META, quarantined=[1, 4], attributes={"cache_hits": 1})
    verify_output(path)
    emb, ids, lengths, attrs = read_output(path)
    kept = np.array([0, 2, 3, 5])
    assert ids == [f"seq{i}" for i in kept] and lengths.tolist() == (kept + 1).tolist()
    assert np.array_equal(emb, tagged_rows(kept, 3))
    assert attrs["quarantined_ids"] == ["seq1", "seq4"] and attrs["input_kind"] == "test"
    assert attrs["cache_hits"] == 1 and attrs["num_sequences"] == 4
    with h5py.File(path, "r") as f:
        assert f["frame"][:].tolist() == (kept * 10).tolist()
        assert [s.decode() for s in f["protein"][:]] == [f"p{i}" for i in kept]


def test_prefilled_file_with_other_meta_is_rebuilt_and_refuses_data(tmp_path: Path) -> None:
    path = tmp_path / "m.h5"
    out = prefilled(path, 3, 2)
    with pytest.raises(ValueError, match="prefilled"):
        out.finalize(META, ids=["a", "b", "c"], lengths=np.ones(3))
    other = OutputMeta(**{**vars(META), "attention_backend": "cudnn"})
    inode = path.stat().st_ino
    out.finalize(other)
    assert path.stat().st_ino != inode  # written anew, with the meta of now
    verify_output(path)
    assert read_output(path)[3]["attention_backend"] == "cudnn"


def test_prefilled_create_checks_the_ids(tmp_path: Path) -> None:
    for ids in (["a", "b"], ["a", "b", "c", "d"]):
        with pytest.raises(ValueError, match="ids"):
            PartialOutput.create(tmp_path / "x.h5", 3, 2, "float32", ids=ids,
                                 lengths=np.ones(3), meta=META)
        assert not (tmp_path / "x.h5").exists()


def test_prefilled_layers_residues_and_window_sidecar_finalize_in_place(tmp_path: Path
                                                                        ) -> None:
    """Several layers, per-residue rows (written raw) and the window scratch in its
    sidecar: reopened after a restart, the sidecar comes back; finalize copies nothing,
    leaves the scratch out of the output and removes the sidecar."""
    n, dim, counts = 4, 3, np.array([2, 0, 3, 1])
    path = tmp_path / "partial.h5"
    meta = OutputMeta(**{**vars(META), "layers": (6, 3), "long_sequences": "window",
                         "window_stride": 5})
    out = PartialOutput.create(path, n, dim, "float16", num_layers=2, residue_counts=counts,
                               window_slots=(3, 2, dim), window_plan=(10, 5),
                               ids=list("abcd"), lengths=counts + 7, meta=meta)
    side = tmp_path / "partial.slots.h5"
    assert side.exists() and out.window_slots_shape == (3, 2, dim)
    rows = np.stack([np.full((2, dim), p + 0.5) for p in range(n)])
    out.write_rows(np.array([3, 1, 0, 2]), rows[[3, 1, 0, 2]])
    residues = np.concatenate([np.full((c, 2, dim), 10.0 * p + np.arange(c)[:, None, None])
                               for p, c in enumerate(counts)])
    out.write_residues(np.arange(n), residues, counts)
    out.write_window_slots(np.array([2]), np.full((1, 2, dim), 9.0, np.float32))
    out.flush()
    out.close()
    again = PartialOutput.open_existing(path)
    assert again.prefilled and not again.finalized and again.window_plan == (10, 5)
    assert again.read_window_slots(2, 3)[0, 0, 0] == 9.0
    inode = path.stat().st_ino
    again.finalize(meta, attributes={"duplicate_records": 0})
    assert path.stat().st_ino == inode and not side.exists()
    verify_output(path)
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"embeddings", "ids", "lengths", "residues", "residue_offsets"}
        np.testing.assert_array_equal(f["embeddings"][:], rows.astype(np.float16))
        np.testing.assert_array_equal(f["residues"][:], residues.astype(np.float16))
        assert f.attrs["layers"].tolist() == [6, 3] and f.attrs["window_stride"] == 5


def test_a_finalized_file_reopened_drops_its_sidecar(tmp_path: Path) -> None:
    """Killed between finalize and the sidecar's removal: the restart removes it."""
    path = tmp_path / "partial.h5"
    out = prefilled(path, 2, 2)
    out.finalize(META)
    side = tmp_path / "partial.slots.h5"
    with h5py.File(side, "w") as f:
        f.create_dataset("window_slots", data=np.zeros((1, 2), np.float32)).attrs["plan"] = [1]
    again = PartialOutput.open_existing(path)
    assert again.finalized and again.window_slots_shape is None and not side.exists()


def test_an_earlier_versions_partial_with_the_scratch_inside_is_copied(tmp_path: Path
                                                                       ) -> None:
    """A partial file from before the sidecar (scratch inside, no marker) still serves
    its slots and finalizes through the copy that leaves them behind."""
    path = tmp_path / "old.h5"
    PartialOutput.create(path, 2, 3, "float32").close()
    with h5py.File(path, "r+") as f:  # as the earlier version wrote it
        f.create_dataset("window_slots", data=np.full((2, 3), 4.0, np.float32))
        f["window_slots"].attrs["plan"] = np.array([30, 11])
    out = PartialOutput.open_existing(path)
    assert not out.prefilled and out.window_plan == (30, 11)
    assert out.read_window_slots(0, 2)[1, 2] == 4.0
    out.write_rows(np.arange(2), tagged_rows(np.arange(2), 3))
    out.finalize(META, ids=["x", "y"], lengths=np.array([3, 4]))
    verify_output(path)
    with h5py.File(path, "r") as f:
        assert "window_slots" not in f and f["ids"].asstr()[:].tolist() == ["x", "y"]


KILLED = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import numpy as np
    from vnpd.output.hdf5 import OutputMeta, PartialOutput
    path, at = Path(sys.argv[1]), int(sys.argv[2])
    meta = OutputMeta("m", 1, "float32", 1022, "exact", "in.fa", "0" * 64)
    n, dim = 200_000, 8
    def ids():
        for i in range(n):
            if i == at:
                os.kill(os.getpid(), signal.SIGKILL)
            yield f"s{i}"
    out = PartialOutput.create(path, n, dim, "float32", ids=ids(), lengths=np.ones(n),
                               meta=meta, attributes={"cache_hits": -1})
    out.write_rows(np.arange(n), np.ones((n, dim)))
    out.flush()
    if at == n:  # killed while finalize marks the file
        signal.setitimer(signal.ITIMER_REAL, 0.0005)
        signal.signal(signal.SIGALRM, lambda *a: os.kill(os.getpid(), signal.SIGKILL))
    out.finalize(meta, attributes={"cache_hits": 3})
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("at", [100, 150_000, 200_000])
def test_sigkill_during_prefill_or_finalize_leaves_a_file_the_restart_handles(
        tmp_path: Path, at: int) -> None:
    """Killed while ids are written (at < n) or while finalize marks the file (at = n): a
    reopened file is either unreadable (the job starts anew), not prefilled (finalized
    from the input, as an earlier version's), prefilled (finalize again) or finalized
    and complete. Never a marked file that is not complete."""
    path = tmp_path / "k.h5"
    env = {**os.environ, "PYTHONPATH": str(Path(vnpd.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", KILLED, str(path), str(at)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    try:
        out = PartialOutput.open_existing(path)
    except IncompleteOutputError:
        return
    meta = OutputMeta("m", 1, "float32", 1022, "exact", "in.fa", "0" * 64)
    if out.finalized:
        out.close()
        verify_output(path)
        assert read_output(path)[3]["cache_hits"] == 3  # the counts come before the marker
    elif out.prefilled:
        assert at == 200_000  # the marker 0 is written only after every id
        out.finalize(meta, attributes={"cache_hits": 3})
        verify_output(path)
    else:
        assert at < 200_000
        out.close()


def test_create_reserves_the_rows_without_writing_and_verify_finds_unwritten(
        tmp_path: Path) -> None:
    """The embeddings' space is allocated at create (posix_fallocate: a full disk shows
    then), nothing is written there, and a row never written reads as zeros, which
    verify refuses."""
    n, dim = 2000, 256
    path = tmp_path / "a.h5"
    out = PartialOutput.create(path, n, dim, "float32")
    blocks = os.stat(path).st_blocks * 512
    assert blocks >= n * dim * 4  # reserved on disk, not a sparse hole
    out.write_ids_lengths(0, [f"s{i}" for i in range(n)], np.full(n, 5))
    written = np.delete(np.arange(n), 1234)
    out.write_rows(written, tagged_rows(written, dim))
    out.finalize(META)
    with pytest.raises(IncompleteOutputError, match="unwritten.*row 1234"):
        verify_output(path)
