"""The daemon with several layers and per-residue rows (issue 16), end to end: real
workers, real files; outputs compared with `vnpd embed` on the same file (itself checked
against fair-esm in tests/test_embed.py). Window mode: tests/daemon/test_window_rows.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import random_sequences
from tests.daemon_harness import Daemon, DaemonDirs, drop, fasta_text, write_config
from vnpd.compute.engine import Engine
from vnpd.embed import EmbedOptions, embed_file
from vnpd.output.verify import verify_output

pytestmark = pytest.mark.timeout(600)


def read_all(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        data = {name: f[name][:] for name in ("embeddings", "residues", "residue_offsets")
                if name in f}
        data["layers"] = np.asarray(f.attrs["layers"])
    return data


def test_daemon_writes_several_layers_and_residues_like_embed(tmp_path: Path,
                                                              tiny_model: Path) -> None:
    dirs = DaemonDirs(tmp_path)
    config = write_config(dirs, tiny_model, max_tokens=1100,
                          extra="[output]\nper_residue = true\n")
    texts = {"a.fasta": fasta_text(random_sequences([3 + 41 * j % 700 for j in range(40)],
                                                    seed=1)),
             "b.fasta": fasta_text(random_sequences([1, 1100, 5, 30], seed=2))}
    daemon = Daemon(config, dirs, env={"VNPD_MODEL_LAYERS": "-1,1",
                                       "VNPD_MODEL_OUTPUT_DTYPE": "float16"})
    try:
        daemon.wait_ready()
        for name, text in texts.items():
            drop(dirs.inbox, name, text)
        outputs = daemon.wait_outputs(["a.h5", "b.h5"])
    finally:
        assert daemon.terminate() == 0
    engine = Engine.load(str(tiny_model), layers=(-1, 1), max_tokens=2048)
    for (name, text), out in zip(texts.items(), outputs):
        verify_output(out)
        src = tmp_path / f"copy-{name}"
        src.write_text(text)
        ref = tmp_path / f"ref-{name}.h5"
        embed_file(src, ref, engine, output_dtype="float16",
                   options=EmbedOptions(per_residue=True))
        got, want = read_all(out), read_all(ref)
        assert got["layers"].tolist() == [2, 1] == want["layers"].tolist()
        assert got["embeddings"].shape == want["embeddings"].shape
        assert got["embeddings"].shape[1] == 2 and got["residues"].dtype == np.float16
        np.testing.assert_array_equal(got["residue_offsets"], want["residue_offsets"])
        np.testing.assert_allclose(got["embeddings"], want["embeddings"], atol=2e-3)
        np.testing.assert_allclose(got["residues"], want["residues"], atol=2e-3)


def run_validate(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vnpd", "validate-config", str(config)],
                          capture_output=True, text=True)


def test_validate_config_warns_on_float32_residues(tmp_path: Path, tiny_model: Path) -> None:
    dirs = DaemonDirs(tmp_path)
    config = write_config(dirs, tiny_model, extra="[output]\nper_residue = true\n")
    result = run_validate(config)
    assert result.returncode == 0, result.stderr
    assert "warning: output.per_residue" in result.stderr and "float16" in result.stderr
