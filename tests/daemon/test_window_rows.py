"""The daemon in window mode (`[model] long_sequences = "window"`, issue 16), end to end:
real workers, real files, real HDF5. Outputs are checked against fair-esm's window
reference (each window through `ESM2.forward` alone, tests/test_embed.py) and against
`vnpd embed --long-sequences window` on the same file; also across a SIGKILL mid-job.

A small truncation (30) makes long sequences cheap, and a small token budget (100: three
windows) spreads one sequence's windows over several batches, which two workers take; a
larger one (1000) packs many windows, of several sequences, into one batch.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import random_sequences
from tests.daemon.test_outputs import read_all, run_validate
from tests.daemon_harness import Daemon, DaemonDirs, drop, fasta_text, write_config
from tests.test_embed import fair_esm_windowed
from vnpd.compute.engine import Engine
from vnpd.compute.families.esm2_checkpoint import load_esm2
from vnpd.compute.windows import PieceIndex
from vnpd.embed import EmbedOptions, embed_file
from vnpd.output.verify import verify_output

pytestmark = pytest.mark.timeout(600)

TRUNCATION = 30
# Lengths 1 to far beyond the truncation: at it, one over, a multiple of it, and long.
LENGTHS = [1, 2, 29, 30, 31, 45, 61, 130, 7, 300, 30, 41, 3, 90, 233]


def window_env(stride: int, layers: str = "-1") -> dict[str, str]:
    return {"VNPD_MODEL_TRUNCATION": str(TRUNCATION), "VNPD_MODEL_LONG_SEQUENCES": "window",
            "VNPD_MODEL_WINDOW_STRIDE": str(stride), "VNPD_MODEL_LAYERS": layers}


def job_sequences(seed: int) -> list[str]:
    """LENGTHS, then repeats of a long and a short one (copies of their rows)."""
    seqs = random_sequences(LENGTHS, seed=seed)
    return seqs + [seqs[9], seqs[4], seqs[7]]


def reference(model_path: Path, seqs: list[str], layers: list[int], stride: int
              ) -> tuple[list[np.ndarray], np.ndarray]:
    """fair-esm's window reference: (per-residue rows, (N, n_layers, D) means)."""
    model, alphabet = load_esm2(model_path)
    rows, means = fair_esm_windowed(model, alphabet, seqs, layers, TRUNCATION, stride)
    return rows, np.stack(means)


def run_jobs(dirs: DaemonDirs, config: Path, env: dict[str, str],
             texts: dict[str, str]) -> list[Path]:
    """Start a daemon, drop each ``name``.fasta, wait for the ``name``.h5 (verified), stop."""
    daemon = Daemon(config, dirs, env=env)
    try:
        daemon.wait_ready()
        for name, text in texts.items():
            drop(dirs.inbox, f"{name}.fasta", text)
        outputs = daemon.wait_outputs([f"{name}.h5" for name in texts])
    finally:
        assert daemon.terminate() == 0
    for out in outputs:
        verify_output(out)
    return outputs


def embed_reference(tmp_path: Path, model_path: Path, text: str, layers: tuple[int, ...],
                    stride: int, per_residue: bool) -> dict[str, np.ndarray]:
    src = tmp_path / "copy.fasta"
    src.write_text(text)
    engine = Engine.load(str(model_path), layers=layers, truncation=TRUNCATION, max_tokens=100)
    out = tmp_path / "embed.h5"
    embed_file(src, out, engine, options=EmbedOptions(
        per_residue=per_residue, long_sequences="window", window_stride=stride))
    return read_all(out)


@pytest.mark.parametrize("stride", [11, 1])
def test_window_means_match_fair_esm_and_embed(tmp_path: Path, tiny_model: Path,
                                               stride: int) -> None:
    """One layer, means only; stride 11 and stride 1 (a window per residue step, up to
    271 windows for one sequence). Repeated rows get their leader's row."""
    dirs = DaemonDirs(tmp_path)
    seqs = job_sequences(seed=3)
    text = fasta_text(seqs)
    short = random_sequences([1, 30, 17, 30], seed=5)  # a job with no window to combine
    out, short_out = run_jobs(dirs, write_config(dirs, tiny_model, max_tokens=100),
                              window_env(stride), {"long": text, "short": fasta_text(short)})
    with h5py.File(out, "r") as f:
        attrs = dict(f.attrs)
        got = f["embeddings"][:]
        assert "window_slots" not in f and "residues" not in f
        assert f["lengths"][:].tolist() == [len(s) for s in seqs]
    assert attrs["long_sequences"] == "window" and attrs["window_stride"] == stride
    assert attrs["truncation"] == TRUNCATION and attrs["duplicate_records"] == 3
    assert attrs["computed_sequences"] == len(LENGTHS)
    _, want = reference(tiny_model, seqs, [2], stride)
    assert got.shape == (len(seqs), 64)
    assert np.abs(got - want[:, 0]).max() <= 1e-5
    embedded = embed_reference(tmp_path, tiny_model, text, (-1,), stride, per_residue=False)
    assert np.abs(got - embedded["embeddings"]).max() <= 1e-5
    with h5py.File(short_out, "r") as f:
        _, want_short = reference(tiny_model, short, [2], stride)
        assert np.abs(f["embeddings"][:] - want_short[:, 0]).max() <= 1e-5
    # The windows of one sequence ran in several batches (two workers took them).
    index = PieceIndex.plan(np.array([len(s) for s in seqs]), TRUNCATION, stride)
    batches_of_row: dict[int, set[int]] = {}
    for batch_no, pieces in journaled_batches(dirs.state):
        for row in index.rows(pieces).tolist():
            batches_of_row.setdefault(row, set()).add(batch_no)
    assert max(len(b) for b in batches_of_row.values()) > 1
    assert sorted(batches_of_row) == sorted(set(range(len(LENGTHS))))  # copies never ran


def test_window_layers_and_residues_match_fair_esm_and_embed(tmp_path: Path,
                                                             tiny_model: Path) -> None:
    """Two layers and per-residue rows (R counts every residue); stride equal to the
    truncation (windows meet end to end, only the last one overlaps); about 30 windows
    to a batch."""
    stride = TRUNCATION
    dirs = DaemonDirs(tmp_path)
    config = write_config(dirs, tiny_model, max_tokens=1000,
                          extra="[output]\nper_residue = true\n")
    seqs = job_sequences(seed=4)
    text = fasta_text(seqs)
    (out,) = run_jobs(dirs, config, {**window_env(stride, "-1,1"),
                                     "VNPD_MODEL_OUTPUT_DTYPE": "float32"}, {"res": text})
    got = read_all(out)
    want_rows, want_means = reference(tiny_model, seqs, [2, 1], stride)
    assert got["layers"].tolist() == [2, 1]
    assert got["embeddings"].shape == (len(seqs), 2, 64)
    assert got["residue_offsets"].tolist() == np.r_[0, np.cumsum([len(s) for s in seqs])].tolist()
    assert got["residues"].shape == (sum(map(len, seqs)), 2, 64)
    assert np.abs(got["embeddings"] - want_means).max() <= 1e-5
    offsets = got["residue_offsets"]
    for i in range(len(seqs)):
        assert np.abs(got["residues"][offsets[i]:offsets[i + 1]] - want_rows[i]).max() <= 1e-5
    embedded = embed_reference(tmp_path, tiny_model, text, (-1, 1), stride, per_residue=True)
    assert np.abs(got["embeddings"] - embedded["embeddings"]).max() <= 1e-5
    assert np.abs(got["residues"] - embedded["residues"]).max() <= 1e-5


def journaled_batches(state: Path, done_only: bool = False) -> list[tuple[int, np.ndarray]]:
    """(batch number, positions: pieces) of every journaled batch (or the done ones)."""
    db = sqlite3.connect(str(state / "journal.sqlite3"))
    try:
        rows = db.execute("SELECT batch_no, positions FROM batches"
                          + (" WHERE done=1" if done_only else "")).fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        db.close()
    return [(no, np.frombuffer(blob, dtype=np.int64)) for no, blob in rows]


@pytest.mark.parametrize("how", ["rows_flushed", "sigkill"])
def test_window_job_survives_sigkill(tmp_path: Path, tiny_model: Path, how: str) -> None:
    """The daemon dies mid-job: at its first flush (windows written, their batches not
    journaled done: they run again and overwrite their slots), or by SIGKILL from
    outside once some batches are done (their windows are never run again). The
    restart's output equals the reference: nothing lost, nothing counted twice."""
    stride = 11
    dirs = DaemonDirs(tmp_path)
    config = write_config(dirs, tiny_model, max_tokens=100, devices=("cpu",))
    # Long enough that the kill after 5 done batches lands before the publish (which,
    # finalized in place, follows the last batch closely).
    seqs = random_sequences([400, 31, 5, 260, 90, 700, 12, 333] * 8, seed=8)
    env = window_env(stride)
    first = Daemon(config, dirs, env={**env, "VNPD_TEST_CRASH_AT": how}
                   if how == "rows_flushed" else env)
    try:
        first.wait_ready()
        drop(dirs.inbox, "kill.fasta", fasta_text(seqs))
        if how == "rows_flushed":
            first.wait_for(lambda: first.proc.poll() is not None, 120, "the crash")
        else:
            first.wait_for(lambda: len(journaled_batches(dirs.state, True)) >= 5, 120,
                           "5 done batches")
    finally:
        first.kill()
    assert not list(dirs.outbox.iterdir())
    done_before = sum(len(p) for _, p in journaled_batches(dirs.state, True))
    assert done_before > 0 if how == "sigkill" else done_before == 0
    assert sum(e["sequences"] for e in first.events("batch_done")) > 0  # windows were written
    second = Daemon(config, dirs, env=env)
    try:
        (out,) = second.wait_outputs(["kill.h5"])
    finally:
        assert second.terminate() == 0
    # Every window not journaled done ran once more; those done, never again.
    total = int(PieceIndex.plan(np.array([len(s) for s in seqs]), TRUNCATION,
                                stride).offsets[-1])
    assert sum(e["sequences"] for e in second.events("batch_done")) == total - done_before
    verify_output(out)
    with h5py.File(out, "r") as f:
        got = f["embeddings"][:]
    _, want = reference(tiny_model, seqs, [2], stride)
    assert np.abs(got - want[:, 0]).max() <= 1e-5


def test_validate_config_accepts_window_mode(tmp_path: Path, tiny_model: Path) -> None:
    dirs = DaemonDirs(tmp_path)
    config = write_config(dirs, tiny_model)
    config.write_text(config.read_text().replace(
        "[model]\n", '[model]\nlong_sequences = "window"\nwindow_stride = 300\n'))
    result = run_validate(config)
    assert result.returncode == 0, result.stderr


def test_a_poison_long_sequence_is_quarantined_once(tmp_path: Path, tiny_model: Path) -> None:
    """A record whose every window kills its worker: its row is quarantined as a whole
    (once, not once per window: its other windows, split off to run alone, are dropped
    with it), and every other row, long ones included, is published as the reference."""
    stride = 15
    dirs = DaemonDirs(tmp_path)
    config = write_config(dirs, tiny_model, max_tokens=100, devices=("cpu",),
                          workers={"restart_backoff_s": 0.2, "restart_backoff_max_s": 1.0,
                                   "crash_budget": 50})
    # seq0: 60 residues, 3 windows, which fill the first batch (pieces pack longest first).
    seqs = random_sequences([60, 40, 12, 61, 5, 75], seed=9)
    daemon = Daemon(config, dirs, env={**window_env(stride), "VNPD_TEST_FAULT": "crash:seq0"})
    try:
        daemon.wait_ready()
        drop(dirs.inbox, "poison.fasta", fasta_text(seqs))
        (out,) = daemon.wait_outputs(["poison.h5"], timeout=240)
    finally:
        assert daemon.terminate() == 0
    verify_output(out)
    assert [e["record"] for e in daemon.events("sequence_poisoned")] == ["seq0"]
    assert len(daemon.events("worker_died")) == 3  # with others, alone, one window alone
    with h5py.File(out, "r") as f:
        assert [i.decode() for i in f["ids"][:]] == [f"seq{i}" for i in range(1, 6)]
        assert list(f.attrs["quarantined_ids"]) == ["seq0"]
        got = f["embeddings"][:]
    _, want = reference(tiny_model, seqs, [2], stride)
    assert np.abs(got - want[1:, 0]).max() <= 1e-5


def test_the_cache_serves_short_rows_only_in_window_mode(tmp_path: Path,
                                                         tiny_model: Path) -> None:
    """A second file repeats rows of the first: its rows of one window come from the
    cache, its long rows are computed again (never stored); all equal the reference."""
    stride = 11
    dirs = DaemonDirs(tmp_path)
    config = write_config(dirs, tiny_model, max_tokens=100)
    first = random_sequences([12, 90, 30, 45, 7], seed=10)
    second = [first[3], "MKV", first[0], first[1], first[4], first[2]]
    daemon = Daemon(config, dirs, env=window_env(stride))
    try:
        daemon.wait_ready()
        drop(dirs.inbox, "first.fasta", fasta_text(first))
        daemon.wait_outputs(["first.h5"])
        drop(dirs.inbox, "second.fasta", fasta_text(second))
        (out,) = daemon.wait_outputs(["second.h5"])
    finally:
        assert daemon.terminate() == 0
    verify_output(out)
    with h5py.File(out, "r") as f:
        attrs = dict(f.attrs)
        got = f["embeddings"][:]
    assert attrs["cache_hits"] == 3 and attrs["computed_sequences"] == 3  # 12, 7, 30 cached
    _, want = reference(tiny_model, second, [2], stride)
    assert np.abs(got - want[:, 0]).max() <= 1e-5


def test_a_restart_with_another_stride_computes_the_job_again(tmp_path: Path,
                                                              tiny_model: Path) -> None:
    """Windows done under stride 11, then the daemon restarts with stride 12, which gives
    these lengths as many windows (the slots have the same shape): the slots of the other
    stride are not read; the job is computed again, as the new settings say."""
    dirs = DaemonDirs(tmp_path)
    config = write_config(dirs, tiny_model, max_tokens=100, devices=("cpu",))
    seqs = random_sequences([52, 41, 5] * 150, seed=12)
    first = Daemon(config, dirs, env=window_env(11))
    try:
        first.wait_ready()
        drop(dirs.inbox, "restride.fasta", fasta_text(seqs))
        first.wait_for(lambda: len(journaled_batches(dirs.state, True)) >= 2, 120,
                       "2 done batches")
    finally:
        first.kill()
    assert not list(dirs.outbox.iterdir())
    second = Daemon(config, dirs, env=window_env(12))
    try:
        (out,) = second.wait_outputs(["restride.h5"])
    finally:
        assert second.terminate() == 0
    assert second.events("partial_shape_changed_restarting_job")
    verify_output(out)
    with h5py.File(out, "r") as f:
        assert f.attrs["window_stride"] == 12
        got = f["embeddings"][:]
    _, want = reference(tiny_model, seqs, [2], 12)
    assert np.abs(got - want[:, 0]).max() <= 1e-5
