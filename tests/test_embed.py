"""`vnpd embed` end to end: real files, the CLI in a subprocess, the HDF5 schema."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import random

import h5py
import numpy as np
import pytest

from tests.conftest import random_sequences, write_fasta
import torch

from tests.compute.families.test_esm2 import fair_esm_means, fair_esm_representations
from tests.inputs.test_nucleotide import phage_like, random_dna
from vnpd.inputs.nucleotide_source import NucleotideSource
from vnpd.inputs.source import SourceSettings
from vnpd.output.verify import read_output
from vnpd import __version__
from vnpd.embed import embed_file, progress_bar
from vnpd.compute.families.esm2_checkpoint import load_esm2
from vnpd.inputs.index import sha256_file


def run_embed(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vnpd", "embed", *args],
                          capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})


def test_embed_schema_and_values_match_fair_esm(tmp_path: Path, wide_model: Path) -> None:
    seqs = random_sequences([1, 2, 3, 1021, 1022, 1023, 1500, 80] * 3, seed=21)
    src = write_fasta(tmp_path / "in.fasta", seqs)
    out = tmp_path / "out" / "in.h5"
    result = run_embed(str(src), "-o", str(out), "--model", str(wide_model), "--layer", "-2",
                       "--max-tokens", "3000")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # nothing on stdout the user did not ask for
    with h5py.File(out, "r") as f:
        assert f["embeddings"].dtype == np.float32 and f["embeddings"].shape == (24, 96)
        assert f["lengths"].dtype == np.int32
        assert f["lengths"][:].tolist() == [len(s) for s in seqs]
        assert [s.decode() for s in f["ids"][:]] == [f"seq{i}" for i in range(24)]
        attrs = dict(f.attrs)
        emb = f["embeddings"][:]
    assert attrs["layer"] == 2 and attrs["pooling"] == "mean" and attrs["truncation"] == 1022
    assert attrs["dtype"] == "float32" and attrs["attention_backend"] == "exact"
    assert attrs["source_name"] == "in.fasta" and attrs["source_sha256"] == sha256_file(src)
    assert attrs["num_sequences"] == 24 and attrs["vnpd_version"] == __version__
    assert attrs["model"] == str(wide_model) and attrs["created_utc"].endswith("Z")
    model, alphabet = load_esm2(wide_model)
    np.testing.assert_allclose(emb, fair_esm_means(model, alphabet, seqs, 2), atol=1e-5)
    assert [p.name for p in out.parent.iterdir()] == ["in.h5"]  # no temp file left


@pytest.mark.parametrize("proteins", ["six_frame", "genes"])
def test_embed_nucleotide_matches_fair_esm_on_the_proteins(tmp_path: Path, wide_model: Path,
                                                           proteins: str) -> None:
    rng = random.Random(4)
    records = {f"c{i}": random_dna(rng, rng.randint(200, 1500)) for i in range(5)}
    records["phage"] = phage_like(rng, 5)[0]
    records["n"] = "N" * 90
    src = tmp_path / "in.fna"
    src.write_text("".join(f">{k} x\n{v}\n" for k, v in records.items()))
    out = tmp_path / "out" / "in.h5"
    threads = ["--gene-workers" if proteins == "genes" else "--six-frame-workers", "3"]
    result = run_embed(str(src), "-o", str(out), "--model", str(wide_model), "--kind",
                       "nucleotide", "--proteins", proteins, "--chunk-length", "500", *threads)
    assert result.returncode == 0, result.stderr
    source = NucleotideSource.build(src, tmp_path / "ref",  # serial: the reference
                                    SourceSettings("nucleotide", proteins, 500, gene_workers=1,
                                                   six_frame_workers=1))
    rows = list(source.rows())
    emb, ids, lengths, attrs = read_output(out)
    assert ids == [r.id for r in rows] and len(ids) > 5
    assert lengths.tolist() == [len(r.sequence) for r in rows]
    with h5py.File(out, "r") as f:
        assert [str(s) for s in f["source_ids"].asstr()[:]] == \
            source.row_fields()["source_ids"].tolist()
        for name in ("strand", "nt_start", "nt_end"):
            assert f[name][:].tolist() == source.row_fields()[name].tolist()
    assert attrs["input_kind"] == "nucleotide" and attrs["proteins"] == proteins
    assert attrs["source_sha256"] == sha256_file(src) and attrs["records_without_proteins"] >= 1
    model, alphabet = load_esm2(wide_model)
    np.testing.assert_allclose(emb, fair_esm_means(model, alphabet, [r.sequence for r in rows],
                                                   model.num_layers), atol=1e-5)
    assert [p.name for p in out.parent.iterdir()] == ["in.h5"]  # no temp file or directory left


def test_embed_bad_dna_names_record_and_line(tmp_path: Path, tiny_model: Path) -> None:
    src = tmp_path / "bad.fna"
    src.write_text(">ok\nACGT\n>rna\nACGU\n")
    result = run_embed(str(src), "-o", str(tmp_path / "bad.h5"), "--model", str(tiny_model),
                       "--kind", "nucleotide")
    assert result.returncode == 65
    assert "'rna'" in result.stderr and "line 3" in result.stderr and "'U'" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.fna"]
    result = run_embed(str(src), "-o", str(tmp_path / "bad.h5"), "--model", str(tiny_model),
                       "--kind", "nucleotide", "--chunk-length", "2")
    assert result.returncode == 2 and "at least 3" in result.stderr


def test_embed_float16_output_and_bfloat16_compute(tmp_path: Path, tiny_model: Path) -> None:
    src = write_fasta(tmp_path / "a.fa", random_sequences([10, 300, 40], seed=2))
    out = tmp_path / "a.h5"
    result = run_embed(str(src), "-o", str(out), "--model", str(tiny_model),
                       "--dtype", "bfloat16", "--output-dtype", "float16")
    assert result.returncode == 0, result.stderr
    with h5py.File(out, "r") as f:
        assert f["embeddings"].dtype == np.float16 and f.attrs["dtype"] == "bfloat16"


def test_embed_attention_from_environment_alias_and_flag(tmp_path: Path,
                                                         tiny_model: Path) -> None:
    """VNPD_ATTENTION still reaches the engine (through the config), and a flag beats it."""
    src = write_fasta(tmp_path / "a.fa", random_sequences([10, 40], seed=3))
    out = tmp_path / "a.h5"
    forced = run_embed(str(src), "-o", str(out), "--model", str(tiny_model),
                       env={"VNPD_ATTENTION": "torch_varlen"})  # a GPU backend, on the CPU
    assert forced.returncode == 78 and "'torch_varlen' is not available" in forced.stderr
    bad = run_embed(str(src), "-o", str(out), "--model", str(tiny_model),
                    env={"VNPD_COMPILE_MODE": "fast"})
    assert bad.returncode == 78 and "model.compile_mode (from VNPD_COMPILE_MODE)" in bad.stderr
    flag = run_embed(str(src), "-o", str(out), "--model", str(tiny_model), "--attention", "exact",
                     "--compile-mode", "off", env={"VNPD_ATTENTION": "torch_varlen"})
    assert flag.returncode == 0, flag.stderr
    with h5py.File(out, "r") as f:
        assert f.attrs["attention_backend"] == "exact"


def test_embed_bad_input_names_record_and_line_and_writes_nothing(tmp_path: Path,
                                                                  tiny_model: Path) -> None:
    src = tmp_path / "bad.fasta"
    src.write_text(">ok\nMKV\n>bad one\nMKV\nMK#V\n")
    out = tmp_path / "bad.h5"
    result = run_embed(str(src), "-o", str(out), "--model", str(tiny_model))
    assert result.returncode == 65
    assert "bad" in result.stderr and "line 5" in result.stderr and "'#'" in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_progress_bar_only_on_a_tty(tmp_path: Path) -> None:
    class Tty:
        def __init__(self) -> None:
            self.text = ""

        def isatty(self) -> bool:
            return True

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

    tty = Tty()
    bar = progress_bar(10, stream=tty)  # type: ignore[arg-type]
    bar.set_postfix_str("123 tok/s", refresh=False)
    bar.update(5)
    bar.close()
    assert "5/10" in tty.text and "seq" in tty.text and "123 tok/s" in tty.text
    with open(tmp_path / "log", "w") as f:
        quiet = progress_bar(10, stream=f)
        quiet.update(5)
        quiet.close()
    assert (tmp_path / "log").read_text() == ""


def test_embed_file_progress_shows_the_token_rate_on_a_tty(tmp_path: Path,
                                                           tiny_model: Path) -> None:
    from vnpd.compute.engine import Engine

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    src = write_fasta(tmp_path / "a.fa", random_sequences([10, 40, 7], seed=4))
    engine = Engine.load(str(tiny_model), device="cpu", dtype="float32")
    tty = Tty()
    assert embed_file(src, tmp_path / "a.h5", engine, progress_stream=tty) == 3
    assert "3/3" in tty.getvalue() and "tok/s" in tty.getvalue()


def test_python_dash_m_and_version() -> None:
    result = subprocess.run([sys.executable, "-m", "vnpd", "--version"], capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == f"vnpd {__version__}"


def fair_esm_windowed(model, alphabet, seqs: list[str], layers: list[int], truncation: int,
                      stride: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The window-mode reference, from fair-esm alone: each window through ESM2.forward by
    itself; a residue's row is the mean over the windows that contain it, the sequence's
    mean the mean over its residues. Returns (per-residue (L, n_layers, D), mean) lists."""
    converter = alphabet.get_batch_converter()
    per_residue, means = [], []
    for s in seqs:
        starts = list(range(0, max(len(s) - truncation, 0), stride)) + [max(len(s) - truncation, 0)]
        sums = np.zeros((len(s), len(layers), model.embed_dim), np.float64)
        counts = np.zeros(len(s))
        for a in starts:
            window = s[a:a + truncation]
            _, _, toks = converter([("w", window)])
            with torch.no_grad():
                reps = model(toks, repr_layers=layers)["representations"]
            for j, layer in enumerate(layers):
                sums[a:a + len(window), j] += reps[layer][0, 1:len(window) + 1].numpy()
            counts[a:a + len(window)] += 1
        rows = sums / counts[:, None, None]
        per_residue.append(rows)
        means.append(rows.mean(0) if len(s) else np.zeros_like(sums[:1].sum(0)))
    return per_residue, means


@pytest.mark.parametrize("mode", ["window", "truncate"])
def test_embed_layers_residues_windows_match_fair_esm(tmp_path: Path, tiny_model: Path,
                                                      mode: str) -> None:
    """`vnpd embed --layers=-1,1 --per-residue --long-sequences window` against fair-esm:
    a small truncation (30) makes long sequences cheap; a small budget spreads one
    sequence's windows over several batches."""
    truncation, stride = 30, 11
    seqs = random_sequences([1, 2, 29, 30, 31, 45, 61, 130, 7, 300, 30, 1100, 3], seed=31)
    src = write_fasta(tmp_path / "in.fasta", seqs)
    out = tmp_path / "in.h5"
    result = run_embed(str(src), "-o", str(out), "--model", str(tiny_model), "--layers=-1,1",
                       "--per-residue", "--long-sequences", mode, "--window-stride", str(stride),
                       "--truncation", str(truncation), "--max-tokens", "100")
    assert result.returncode == 0, result.stderr
    model, alphabet = load_esm2(tiny_model)
    layers = [2, 1]
    if mode == "window":
        want_rows, want_means = fair_esm_windowed(model, alphabet, seqs, layers, truncation,
                                                  stride)
    else:
        reps = fair_esm_representations(model, alphabet, seqs, layers, truncation)
        want_rows = [np.stack([reps[layer][i] for layer in layers], 1) for i in range(len(seqs))]
        want_means = [r.mean(0) for r in want_rows]
    with h5py.File(out, "r") as f:
        emb, residues, offsets = f["embeddings"][:], f["residues"][:], f["residue_offsets"][:]
        attrs = dict(f.attrs)
    assert emb.shape == (len(seqs), 2, model.embed_dim)
    assert list(attrs["layers"]) == layers and "layer" not in attrs
    assert attrs["long_sequences"] == mode
    assert (attrs["window_stride"] == stride) if mode == "window" else "window_stride" not in attrs
    kept = [len(s) if mode == "window" else min(len(s), truncation) for s in seqs]
    assert offsets.tolist() == np.r_[0, np.cumsum(kept)].tolist()
    assert residues.shape == (sum(kept), 2, model.embed_dim) and residues.dtype == np.float32
    for i in range(len(seqs)):
        assert np.abs(residues[offsets[i]:offsets[i + 1]] - want_rows[i]).max() <= 1e-5
        assert np.abs(emb[i] - want_means[i]).max() <= 1e-5


def test_window_mode_without_per_residue_and_one_layer(tmp_path: Path, tiny_model: Path) -> None:
    """Window means need residue rows inside even when none are written; a sequence no
    longer than the truncation gives exactly what truncate gives."""
    from vnpd.compute.engine import Engine
    from vnpd.embed import EmbedOptions, embed_file

    seqs = random_sequences([5, 30, 31, 90, 2, 64], seed=5)
    src = write_fasta(tmp_path / "in.fasta", seqs)
    engine = Engine.load(str(tiny_model), layer=1, truncation=30, max_tokens=70)
    embed_file(src, tmp_path / "w.h5", engine,
               options=EmbedOptions(long_sequences="window", window_stride=13))
    embed_file(src, tmp_path / "t.h5", engine)
    w, _, _, wattrs = read_output(tmp_path / "w.h5")
    t, _, _, tattrs = read_output(tmp_path / "t.h5")
    assert w.shape == (6, 64) and wattrs["layer"] == 1 and wattrs["layers"] == [1]
    with h5py.File(tmp_path / "w.h5", "r") as f:
        assert "residues" not in f and "residue_offsets" not in f
    short = [i for i, s in enumerate(seqs) if len(s) <= 30]
    # Same function; only the batches differ (so the GEMMs' summation order may too).
    np.testing.assert_allclose(w[short], t[short], atol=1e-6)
    model, alphabet = load_esm2(tiny_model)
    _, means = fair_esm_windowed(model, alphabet, seqs, [1], 30, 13)
    np.testing.assert_allclose(w, np.stack(means)[:, 0], atol=1e-5)


def test_per_residue_float16(tmp_path: Path, tiny_model: Path) -> None:
    seqs = random_sequences([3, 50, 1], seed=2)
    src = write_fasta(tmp_path / "in.fasta", seqs)
    out = tmp_path / "in.h5"
    result = run_embed(str(src), "-o", str(out), "--model", str(tiny_model), "--per-residue",
                       "--output-dtype", "float16")
    assert result.returncode == 0, result.stderr
    model, alphabet = load_esm2(tiny_model)
    reps = fair_esm_representations(model, alphabet, seqs, [2])[2]
    with h5py.File(out, "r") as f:
        assert f["residues"].dtype == np.float16 and f["residues"].shape == (54, 64)
        offsets = f["residue_offsets"][:]
        for i in range(3):
            np.testing.assert_allclose(f["residues"][offsets[i]:offsets[i + 1]], reps[i],
                                       atol=2e-2, rtol=1e-2)


def test_embed_refuses_bad_layers_and_stride(tmp_path: Path, tiny_model: Path) -> None:
    src = write_fasta(tmp_path / "in.fasta", ["ACDE"])
    for args in (["--layers=-1,2"], ["--layers=7"], ["--long-sequences", "window",
                                                     "--window-stride", "2000"]):
        result = run_embed(str(src), "-o", str(tmp_path / "o.h5"), "--model", str(tiny_model),
                           *args)
        assert result.returncode == 78, (args, result.stderr)
        assert not (tmp_path / "o.h5").exists()
