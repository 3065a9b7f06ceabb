"""vnpd/inputs/six_frame_pool.py: six_frame on real processes gives the rows of one
thread byte for byte, in input order; those rows are checked against the literal VirNucPro
reference of tests/inputs/test_nucleotide.py."""

from __future__ import annotations

import multiprocessing
import random
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from tests.inputs.test_index import assert_same_index
from tests.inputs.test_nucleotide import random_dna, ref_six_frame
from tests.inputs.test_nucleotide_source import write_dna
from vnpd.inputs import six_frame_pool
from vnpd.inputs.fasta import FastaError, FastaRecord
from vnpd.inputs.index import index_fasta
from vnpd.inputs.nucleotide import piece_batches, six_frame_proteins, translate_pieces
from vnpd.inputs.nucleotide_source import NucleotideSource
from vnpd.inputs.six_frame_pool import translate_in_processes
from vnpd.inputs.source import SourceSettings

SMALL_BATCH = 5_000  # bases: the records below make tens of batches, pieces of long ones
SMALL_POOL_MIN = 20_000  # bytes: the files below get processes, but a file of a few records


def varied_records(seed: int = 11) -> dict[str, str]:
    """Lengths 1..2000 (each chunk-count edge of 300 and 157), N runs, IUPAC codes, lower
    case, a record with no stop-free frame, one with every frame kept, and records longer
    than ``SMALL_BATCH`` (several pieces)."""
    rng = random.Random(seed)
    lengths = [1, 2, 3, 4, 156, 157, 158, 299, 300, 301, 314, 599, 600, 601, 1999, 2000]
    lengths += rng.sample(range(1, 2001), 60)
    records = {f"r{i}_len{n}": random_dna(rng, n) for i, n in enumerate(lengths)}
    records["n_runs"] = random_dna(rng, 700) + "N" * 40 + random_dna(rng, 500) + "NNNN"
    records["lower"] = random_dna(rng, 1800).lower()
    records["no_stop_free"] = "TTAA" * 250
    records["all_frames"] = "".join(rng.choices("GC", k=2500))
    records["long1"] = "".join(rng.choices("GCGCAT", k=23_456))
    records["after_long"] = random_dna(rng, 900)
    records["long2"] = "".join(rng.choices("GGCCAT", k=5_001))
    return records


class CountedPool(ProcessPoolExecutor):
    """The real pool, counted: which pools were made and shut down."""

    made: ClassVar[list[CountedPool]] = []

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.shut = False
        CountedPool.made.append(self)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.shut = True
        super().shutdown(wait, cancel_futures=cancel_futures)


@pytest.fixture
def pools(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[CountedPool]]:
    monkeypatch.setattr(six_frame_pool, "BATCH_BASES", SMALL_BATCH)
    monkeypatch.setattr(six_frame_pool, "POOL_MIN_BYTES", SMALL_POOL_MIN)
    monkeypatch.setattr(six_frame_pool, "ProcessPoolExecutor", CountedPool)
    CountedPool.made = []
    yield CountedPool.made


def as_records(records: dict[str, str]) -> list[FastaRecord]:
    return [FastaRecord(i, rid, seq, 2 * i + 1, 0) for i, (rid, seq) in enumerate(records.items())]


@pytest.mark.parametrize("chunk_length", [300, 157])
def test_processes_give_the_rows_of_one_thread_and_of_virnucpro(
        pools: list[CountedPool], chunk_length: int) -> None:
    records = varied_records()
    batches = piece_batches(as_records(records), chunk_length, SMALL_BATCH)
    blocks = list(translate_in_processes(batches, translate_pieces, workers=2,
                                         file_bytes=SMALL_POOL_MIN))
    assert len(pools) == 1 and pools[0].shut and len(blocks) > 10
    text = b"".join(b.text for b in blocks).decode()
    want = [(i, p) for i, (rid, seq) in enumerate(records.items())
            for p in six_frame_proteins(rid, seq.upper(), chunk_length)]
    assert text == "".join(f">{p.id}\n{p.sequence}\n" for _, p in want)
    got = {name: np.concatenate([getattr(b, name) for b in blocks]).tolist()
           for name in ("lengths", "source_index", "strand", "nt_start", "nt_end")}
    assert got == {"lengths": [len(p.sequence) for _, p in want],
                   "source_index": [i for i, _ in want], "strand": [p.strand for _, p in want],
                   "nt_start": [p.nt_start for _, p in want], "nt_end": [p.nt_end for _, p in want]}
    lines = text.splitlines(keepends=True)
    assert np.concatenate([b.line_bytes for b in blocks]).tolist() == \
        [len(a) + len(b) for a, b in zip(lines[::2], lines[1::2])]
    reference = [pair for rid, seq in records.items() for pair in ref_six_frame(rid, seq, chunk_length)]
    assert [(p.id, p.sequence) for _, p in want] == reference
    with_rows = {p.source_id for _, p in want}
    assert {"n_runs", "lower", "all_frames", "long1", "after_long", "long2"} <= with_rows
    assert "no_stop_free" not in with_rows


def build(src: Path, directory: Path, workers: int, chunk_length: int = 300) -> NucleotideSource:
    return NucleotideSource.build(src, directory, SourceSettings(
        "nucleotide", "six_frame", chunk_length, six_frame_workers=workers))


def test_build_on_two_processes_writes_the_files_of_one_thread(
        tmp_path: Path, pools: list[CountedPool]) -> None:
    src = write_dna(tmp_path / "in.fna", varied_records(12), width=61)
    one = build(src, tmp_path / "w1", workers=1)
    assert pools == []
    two = build(src, tmp_path / "w2", workers=2)
    assert len(pools) == 1 and pools[0].shut
    assert one.num_rows > 100
    for name in ("proteins.fasta", "records.txt"):
        assert (tmp_path / "w2" / name).read_bytes() == (tmp_path / "w1" / name).read_bytes()
    for name, values in one.arrays.items():
        assert two.arrays[name].dtype == values.dtype
        assert two.arrays[name].tolist() == values.tolist()
    assert two.attributes() == one.attributes()
    assert two.attributes()["records_without_proteins"] >= 1  # no_stop_free
    assert_same_index(two.index, index_fasta(two.proteins_path, kind="translated"))
    assert list(two.rows()) == list(one.rows())


def test_a_small_file_starts_no_processes(tmp_path: Path, pools: list[CountedPool]) -> None:
    records = {f"r{i}": random_dna(random.Random(i), 1200) for i in range(15)}  # 3 batches
    src = write_dna(tmp_path / "in.fna", records)
    assert SMALL_BATCH * 2 < src.stat().st_size < SMALL_POOL_MIN
    one, two = build(src, tmp_path / "w1", 1), build(src, tmp_path / "w2", 3)
    assert pools == [] and two.num_rows == one.num_rows > 0
    assert two.proteins_path.read_bytes() == one.proteins_path.read_bytes()


def test_a_bad_record_after_many_batches_fails_the_file_and_stops_the_pool(
        tmp_path: Path, pools: list[CountedPool]) -> None:
    records = varied_records(13)
    src = write_dna(tmp_path / "in.fna", records | {"bad": "ACGT" * 10 + "ACJT"}, width=80)
    header = src.read_text().splitlines().index(">bad some description") + 1
    with pytest.raises(FastaError) as caught:
        build(src, tmp_path / "w2", workers=2)
    err = caught.value
    assert err.record_id == "bad" and err.line == header > 100
    assert "invalid character 'J' at position 43" in str(err)
    assert f"line {header}" in str(err)
    assert len(pools) == 1 and pools[0].shut
    assert multiprocessing.active_children() == []
