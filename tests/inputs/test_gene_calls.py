"""vnpd/inputs/gene_calls.py: gene calling on threads, with real pyrodigal-gv.

The reference is ``ref_genes`` of tests/inputs/test_nucleotide.py: pyrodigal-gv called
directly on each contig. Batches are made small here (``small_batches``) so that a file of
a few hundred kbp goes through many batches and the in-flight limits.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pyrodigal_gv
import pytest

from tests.inputs.test_nucleotide import phage_like, random_dna, ref_genes
from tests.inputs.test_nucleotide_source import write_dna
from vnpd.inputs import gene_calls
from vnpd.inputs.fasta import FastaError, FastaRecord
from vnpd.inputs.gene_calls import call_genes, resolve_workers, usable_cores
from vnpd.inputs.nucleotide import make_gene_finder
from vnpd.inputs.nucleotide_source import NucleotideSource, record_genes
from vnpd.inputs.source import SourceSettings


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gene_calls, "BATCH_BASES", 3_000)
    monkeypatch.setattr(gene_calls, "BATCH_RECORDS", 4)
    monkeypatch.setattr(gene_calls, "IN_FLIGHT_BASES", 12_000)


def mixed_contigs(count: int, seed: int = 1) -> dict[str, str]:
    """Phage-like contigs (many genes, some lower case), short ones (1-200 bp), N runs,
    all-N and GC-only contigs (no genes), in a shuffled order."""
    rng = random.Random(seed)
    records = {}
    for i in range(count):
        kind = i % 6
        if kind in (0, 1):
            seq = phage_like(rng, rng.randint(1, 5))[0]
            seq = seq.lower() if rng.random() < 0.3 else seq
        elif kind == 2:
            seq = random_dna(rng, rng.randint(1, 200))
        elif kind == 3:
            seq = phage_like(rng, 3)[0]
            at = rng.randrange(len(seq))
            seq = seq[:at] + "N" * rng.randint(50, 500) + seq[at:]
        elif kind == 4:
            seq = "N" * rng.randint(1, 3000)
        else:
            seq = "".join(rng.choices("GC", k=rng.randint(100, 4000)))
        records[f"c{i}"] = seq
    return records


def as_records(contigs: dict[str, str]) -> list[FastaRecord]:
    return [FastaRecord(i, rid, seq, 2 * i + 1, 0) for i, (rid, seq) in enumerate(contigs.items())]


def flat(pairs: Iterator[tuple[FastaRecord, list]]) -> list[tuple[str, list]]:
    return [(record.id, list(proteins)) for record, proteins in pairs]


def genes_of(finder: pyrodigal_gv.ViralGeneFinder | None = None):
    return partial(record_genes, finder=finder or make_gene_finder())


def gene_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vnpd-genes")]


def test_threads_equal_serial_and_pyrodigal_gv_in_input_order(small_batches: None) -> None:
    contigs = mixed_contigs(90)
    records = as_records(contigs)
    want = [(rid, ref_genes(rid, seq)) for rid, seq in contigs.items()]
    assert sum(len(p) for _, p in want) > 100
    assert sum(1 for _, p in want if not p) >= 10  # all N, some short ones: no genes
    shared = genes_of()
    assert flat(call_genes(records, shared, workers=1)) == want
    for workers in (2, 3, 8):
        assert flat(call_genes(iter(records), shared, workers)) == want, workers
    assert not gene_threads()


def test_text_in_flight_stays_bounded(small_batches: None) -> None:
    records = as_records(mixed_contigs(240, seed=2))
    pulled = 0

    def reader() -> Iterator[FastaRecord]:
        nonlocal pulled
        for record in records:
            pulled += len(record.sequence)
            yield record

    workers, longest = 2, max(len(r.sequence) for r in records)
    bound = 12_000 + 2 * (3_000 + longest)  # in flight, or one batch alone + the batch being read
    total = sum(len(r.sequence) for r in records)
    assert total > 5 * bound
    done, ahead = 0, []
    for record, _ in call_genes(reader(), genes_of(), workers):
        done += len(record.sequence)
        ahead.append(pulled - done)
    assert done == total and max(ahead) <= bound, (max(ahead), bound)


@pytest.mark.parametrize("workers", [1, 3])
def test_reader_error_comes_after_every_record_before_it(small_batches: None,
                                                         workers: int) -> None:
    contigs = mixed_contigs(40, seed=3)
    records = as_records(contigs)

    def reader() -> Iterator[FastaRecord]:
        yield from records[:31]
        raise FastaError("invalid character 'J' at position 7", record_id="bad",
                         record_index=31, line=63)

    got = []
    with pytest.raises(FastaError, match="record 'bad'") as caught:
        for record, proteins in call_genes(reader(), genes_of(), workers):
            got.append((record.id, proteins))
    assert caught.value.line == 63
    assert got == [(rid, ref_genes(rid, seq)) for rid, seq in list(contigs.items())[:31]]
    assert not gene_threads()


@pytest.mark.parametrize("workers", [1, 3])
def test_pyrodigal_failure_names_the_record_and_line(small_batches: None, workers: int) -> None:
    # A real pyrodigal-gv failure: a finder in single mode that was never trained raises
    # RuntimeError. Record c14 gets it, in the middle of a batch of 4.
    contigs = mixed_contigs(40, seed=4)
    good, untrained = genes_of(), genes_of(pyrodigal_gv.ViralGeneFinder(meta=False))

    def fails_on_c14(record: FastaRecord) -> list:
        return (untrained if record.id == "c14" else good)(record)

    got = []
    with pytest.raises(FastaError, match="pyrodigal-gv could not call genes: RuntimeError") \
            as caught:
        for record, proteins in call_genes(as_records(contigs), fails_on_c14, workers):
            got.append((record.id, proteins))
    assert (caught.value.record_id, caught.value.line) == ("c14", 29)
    assert got == [(rid, ref_genes(rid, seq)) for rid, seq in list(contigs.items())[:14]]
    assert not gene_threads()


def test_contigs_longer_than_a_batch_still_run_at_once(small_batches: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Each contig is a batch alone (> BATCH_BASES); IN_FLIGHT_BASES lets several run at once.
    monkeypatch.setattr(gene_calls, "IN_FLIGHT_BASES", 1_000_000)
    rng = random.Random(8)
    contigs = {f"p{i}": phage_like(rng, 8)[0] for i in range(12)}
    assert all(len(c) > 3_000 for c in contigs.values())
    running, most, lock = 0, 0, threading.Lock()
    shared = genes_of()

    def counted(record: FastaRecord) -> list:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return shared(record)
        finally:
            with lock:
                running -= 1

    got = flat(call_genes(as_records(contigs), counted, workers=3))
    assert got == [(rid, ref_genes(rid, seq)) for rid, seq in contigs.items()]
    assert most >= 2


def test_closing_early_stops_the_threads(small_batches: None) -> None:
    made = call_genes(as_records(mixed_contigs(60, seed=5)), genes_of(), workers=3)
    next(made)
    assert gene_threads()
    made.close()
    assert not gene_threads()


def test_resolve_workers() -> None:
    assert resolve_workers(1) == 1 and resolve_workers(5) == 5
    assert resolve_workers(0) == max(1, min(usable_cores(), gene_calls.MAX_AUTO_WORKERS))
    with pytest.raises(ValueError, match="gene_workers"):
        resolve_workers(-1)
    with pytest.raises(ValueError, match="workers"):
        list(call_genes([], genes_of(), 0))


def test_files_built_with_threads_equal_serial(tmp_path: Path, small_batches: None) -> None:
    contigs = mixed_contigs(60, seed=6)
    src = write_dna(tmp_path / "in.fna", contigs)
    built = {}
    for workers in (1, 3):
        settings = SourceSettings("nucleotide", "genes", gene_workers=workers)
        built[workers] = NucleotideSource.build(src, tmp_path / f"w{workers}", settings)
    serial, threaded = built[1], built[3]
    assert (tmp_path / "w3" / "proteins.fasta").read_bytes() == \
        (tmp_path / "w1" / "proteins.fasta").read_bytes()
    assert (tmp_path / "w3" / "records.txt").read_bytes() == \
        (tmp_path / "w1" / "records.txt").read_bytes()
    for name in ("source_index", "strand", "nt_start", "nt_end"):
        np.testing.assert_array_equal(threaded.arrays[name], serial.arrays[name])
    assert threaded.attributes() == serial.attributes()
    want = [p for rid, seq in contigs.items() for p in ref_genes(rid, seq.upper())]
    assert [(r.id, r.sequence) for r in threaded.rows()] == [(p.id, p.sequence) for p in want]


def test_bad_dna_late_in_a_threaded_file_names_record_and_line(tmp_path: Path,
                                                               small_batches: None) -> None:
    contigs = mixed_contigs(30, seed=7)
    src = write_dna(tmp_path / "in.fna", contigs, width=10_000_000)  # one line per record
    with open(src, "a") as fh:
        fh.write(">broken contig\nACGTACGTJ\n")
    with pytest.raises(FastaError, match="invalid character 'J' at position 9") as caught:
        NucleotideSource.build(src, tmp_path / "i",
                               SourceSettings("nucleotide", "genes", gene_workers=3))
    assert (caught.value.record_id, caught.value.line) == ("broken", 61)
    assert not gene_threads()
