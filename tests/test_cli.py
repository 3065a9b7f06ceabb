"""CLI exit codes and stdout discipline for the daemon-side commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def vnpd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vnpd", *args], capture_output=True, text=True,
                          timeout=120)


def test_run_and_validate_config_exit_78_on_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f"""
[paths]
inbox = "{tmp_path}/in"
outbox = "{tmp_path}/out"
state = "{tmp_path}/state"
failed = "{tmp_path}/failed"
[model]
checkpoint = "{tmp_path}/missing.pt"
dtype = "fp16"
[workers]
devices = ["cpu"]
""")
    for args in (("run", "--config", str(cfg)), ("validate-config", str(cfg))):
        result = vnpd(*args)
        assert result.returncode == 78, result.stderr
        assert "model.dtype" in result.stderr and "'fp16'" in result.stderr
        assert result.stdout == ""
    cfg.write_text(cfg.read_text().replace('dtype = "fp16"', 'dtype = "float16"'))
    for args in (("run", "--config", str(cfg)), ("validate-config", str(cfg))):
        result = vnpd(*args)
        assert result.returncode == 78, result.stderr
        assert "missing.pt" in result.stderr and "make-test-model" in result.stderr


def test_validate_config_ok_and_submit_prints_paths(tmp_path: Path, tiny_model: Path) -> None:
    cfg = tmp_path / "ok.toml"
    cfg.write_text(f"""
[paths]
inbox = "{tmp_path}/in"
outbox = "{tmp_path}/out"
state = "{tmp_path}/state"
failed = "{tmp_path}/failed"
[model]
checkpoint = "{tiny_model}"
[workers]
devices = ["cpu"]
""")
    assert vnpd("validate-config", str(cfg)).returncode == 0
    src = tmp_path / "x.fasta"
    src.write_text(">a\nMKV\n")
    first = vnpd("submit", str(src), "--config", str(cfg))
    second = vnpd("submit", str(src), "--config", str(cfg))
    assert first.returncode == 0 and second.returncode == 0
    assert first.stdout.strip() == str(tmp_path / "in" / "x.fasta")
    assert second.stdout.strip() == str(tmp_path / "in" / "x.1.fasta")  # never overwrites
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["x.1.fasta", "x.fasta"]


def test_status_without_daemon_is_an_error(tmp_path: Path, tiny_model: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[paths]\nstate = "{tmp_path}/state"\n[model]\ncheckpoint = "{tiny_model}"\n')
    result = vnpd("status", "--config", str(cfg))
    assert result.returncode == 1 and "no daemon status" in result.stderr
