"""Checkpoint resolution, safe loading and the random test model's file format."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path, PurePosixPath

import esm.pretrained
import pytest
import torch

from vnpd.compute.families.esm2_checkpoint import (CheckpointError, ModelNotFoundError, load_esm2, make_test_model,
                        regression_path_for, resolve_checkpoint)


def test_test_model_is_fair_esm_format(tmp_path: Path) -> None:
    ckpt, reg = make_test_model(tmp_path / "esm2_t2_test.pt", layers=2, dim=32, heads=4, seed=3)
    assert reg == regression_path_for(ckpt) and reg.name == "esm2_t2_test-contact-regression.pt"
    # fair-esm's own local loader (which needs the regression file beside it) accepts it,
    # once argparse.Namespace is allow-listed for torch>=2.6's weights_only loading.
    with torch.serialization.safe_globals([argparse.Namespace]):
        model, alphabet = esm.pretrained.load_model_and_alphabet_local(str(ckpt))
    assert model.num_layers == 2 and model.embed_dim == 32 and model.attention_heads == 4
    ours, _ = load_esm2(ckpt)
    for (name, a), (_, b) in zip(model.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), name


def test_plain_torch_load_refuses_namespace_but_we_load_safely(tmp_path: Path) -> None:
    ckpt, _ = make_test_model(tmp_path / "m.pt")
    with pytest.raises(Exception, match="Namespace|weights_only|Unsupported"):
        torch.load(str(ckpt))  # the pitfall: default weights_only=True on torch>=2.6
    model, _ = load_esm2(ckpt)
    assert model.num_layers == 2


def test_loader_rejects_arbitrary_pickles(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"cfg": {"model": PurePosixPath("/etc/passwd")}, "model": {}}, str(evil))
    with pytest.raises(CheckpointError):
        load_esm2(evil)  # only argparse.Namespace is allow-listed, nothing else


def test_seed_determines_weights(tmp_path: Path) -> None:
    a, _ = make_test_model(tmp_path / "a.pt", seed=1)
    b, _ = make_test_model(tmp_path / "b.pt", seed=1)
    c, _ = make_test_model(tmp_path / "c.pt", seed=2)
    sa, sb, sc = (load_esm2(p)[0].state_dict() for p in (a, b, c))
    key = "layers.0.fc1.weight"
    assert torch.equal(sa[key], sb[key]) and not torch.equal(sa[key], sc[key])


def test_missing_path_names_path_and_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        resolve_checkpoint(str(tmp_path / "nope.pt"))
    assert "nope.pt" in str(err.value) and "make-test-model" in str(err.value)


def test_model_name_looked_up_in_torch_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as err:
        resolve_checkpoint("esm2_t33_650M_UR50D")
    msg = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / "esm2_t33_650M_UR50D.pt") in msg
    assert "vnpd fetch-model esm2_t33_650M_UR50D" in msg
    make_test_model(tmp_path / "hub" / "checkpoints" / "esm2_t33_650M_UR50D.pt")
    assert resolve_checkpoint("esm2_t33_650M_UR50D").is_file()


def test_make_test_model_cli_says_random(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "vnpd", "make-test-model", str(tmp_path / "x.pt"),
                          "--layers", "1", "--dim", "32", "--heads", "2"],
                         capture_output=True, text=True, check=True)
    assert "RANDOM" in out.stdout
    assert (tmp_path / "x-contact-regression.pt").is_file()


def test_embed_never_downloads(tmp_path: Path) -> None:
    fasta = tmp_path / "a.fasta"
    fasta.write_text(">a\nMKV\n")
    env = {"TORCH_HOME": str(tmp_path / "th"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "vnpd", "embed", str(fasta), "-o",
                          str(tmp_path / "a.h5"), "--model", "esm2_t6_8M_UR50D"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 78
    assert "vnpd fetch-model esm2_t6_8M_UR50D" in out.stderr
    assert not (tmp_path / "th" / "hub" / "checkpoints" / "esm2_t6_8M_UR50D.pt").exists()
