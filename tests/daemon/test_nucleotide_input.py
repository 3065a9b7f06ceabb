"""End-to-end: a daemon with ``[input] kind = "nucleotide"``, real workers, real DNA files.

The published file is compared with NucleotideSource run directly on the same file (rows,
row fields, attributes) and, for its embeddings, with fair-esm's ESM2.forward on those proteins.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.compute.families.test_esm2 import fair_esm_means
from tests.daemon_harness import Daemon, DaemonDirs, drop, write_config
from tests.inputs.test_nucleotide import phage_like, random_dna
from vnpd.compute.families.esm2_checkpoint import load_esm2
from vnpd.inputs.nucleotide_source import NucleotideSource
from vnpd.inputs.source import SourceSettings
from vnpd.output.verify import read_output, verify_output

pytestmark = pytest.mark.timeout(600)

NUCLEOTIDE = ('\n[input]\nkind = "nucleotide"\n\n[nucleotide]\nproteins = "{}"\nchunk_length = {}\n'
              'gene_workers = {}\nsix_frame_workers = {}\n')


def dna_text(records: dict[str, str]) -> str:
    return "".join(f">{rid} contig\n{seq[:80]}\n{seq[80:]}\n" for rid, seq in records.items())


@pytest.mark.parametrize("proteins, chunk, workers", [
    ("six_frame", 300, 1), ("six_frame", 300, 2), ("genes", 300, 1), ("genes", 300, 3)])
def test_dna_is_published_with_source_fields_and_bad_dna_fails(
        tmp_path: Path, tiny_model: Path, proteins: str, chunk: int, workers: int) -> None:
    dirs = DaemonDirs(tmp_path)
    rng = random.Random(17)
    records = {f"c{i}": random_dna(rng, rng.randint(100, 1300)) for i in range(6)}
    records["phage"] = phage_like(rng, 6)[0]
    records["all_n"] = "N" * 400
    if workers > 1:  # rows in later batches (gene_calls.BATCH_BASES; six_frame_pool's
        # processes start for a file of POOL_MIN_BYTES)
        records |= {"n_run": "N" * (60_000 if proteins == "genes" else 2_100_000),
                    "after": phage_like(rng, 6)[0]}
    text = dna_text(records)
    bad = ">ok\nACGTACGTAC\n>broken contig\nACGTAC\nACGTJACG\n"
    daemon = Daemon(write_config(dirs, tiny_model, extra=NUCLEOTIDE.format(proteins, chunk, workers, workers)),
                    dirs)
    try:
        daemon.wait_ready()
        drop(dirs.inbox, "bad.fna", bad)
        drop(dirs.inbox, "contigs.fna", text)
        drop(dirs.inbox, "nothing.fna", ">n\nNNNNNNNNNNNN\n>tiny\nAC\n")
        out, empty = daemon.wait_outputs(["contigs.h5", "nothing.h5"])
        report_path = dirs.failed / "bad.fna.error.json"
        daemon.wait_for(report_path.exists, 60, "error report")
    finally:
        assert daemon.terminate() == 0
    report = json.loads(report_path.read_text())
    assert report["record"] == "broken" and report["line"] == 3
    assert "'J' at position 11" in report["reason"]
    assert (dirs.failed / "bad.fna").read_text() == bad

    verify_output(out)
    src = tmp_path / "copy.fna"
    src.write_text(text)
    settings = SourceSettings("nucleotide", proteins, chunk, gene_workers=1,  # serial reference
                              six_frame_workers=1)
    source = NucleotideSource.build(src, tmp_path / "ref", settings)
    rows = list(source.rows())
    emb, ids, lengths, attrs = read_output(out)
    assert ids == [r.id for r in rows] and len(ids) == source.num_rows > 0
    assert lengths.tolist() == source.lengths.tolist()
    with h5py.File(out, "r") as f:
        fields = {name: f[name][:] for name in ("strand", "nt_start", "nt_end")}
        source_ids = [str(s) for s in f["source_ids"].asstr()[:]]
    want = source.row_fields()
    assert source_ids == want["source_ids"].tolist()
    for name, values in fields.items():
        assert values.dtype == want[name].dtype and values.tolist() == want[name].tolist()
    assert attrs["input_kind"] == "nucleotide" and attrs["proteins"] == proteins
    assert attrs["records"] == len(records)
    assert attrs["records_with_proteins"] + attrs["records_without_proteins"] == len(records)
    assert attrs["records_without_proteins"] >= 1  # all_n
    assert attrs["source_name"] == "contigs.fna" and attrs["source_sha256"] == source.sha256
    model, alphabet = load_esm2(tiny_model)
    np.testing.assert_allclose(
        emb, fair_esm_means(model, alphabet, [r.sequence for r in rows], model.num_layers),
        atol=1e-5)

    verify_output(empty)
    emb, ids, _, attrs = read_output(empty)
    assert emb.shape[0] == 0 and ids == []
    assert attrs["records"] == 2 and attrs["records_without_proteins"] == 2
