"""Tests for vnpd/daemon/preflight.py: GPU counting with a fake nvidia-smi, real directories."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from tests.test_config import problems_of, write
from vnpd.config import Config, ConfigError, ModelConfig, PathsConfig, WorkersConfig
from vnpd.daemon.preflight import resolve_devices, validate_config


@pytest.fixture
def fake_gpus(tmp_path: Path):
    """Return a function making an env whose PATH has a fake `nvidia-smi -L` with n GPUs."""
    def make(n: int, rc: int = 0) -> dict[str, str]:
        bindir = tmp_path / f"bin{n}-{rc}"
        lines = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})\\n" for i in range(n))
        script = write(bindir / "nvidia-smi", f"#!/bin/sh\nprintf '{lines}'\nexit {rc}\n")
        script.chmod(0o755)
        return {"PATH": str(bindir)}
    return make



def usable_config(tmp_path: Path, **model: object) -> Config:
    """Paths under tmp_path, two CPU workers, a model file that exists."""
    ckpt = write(tmp_path / "models" / "tiny.pt", "not really a checkpoint")
    paths = PathsConfig(*(tmp_path / "vnpd" / n for n in ("inbox", "outbox", "state", "failed")))
    return Config(paths=paths, model=ModelConfig(checkpoint=str(ckpt), **model),  # type: ignore[arg-type]
                  workers=WorkersConfig(devices=["cpu", "cpu"]))


# ------------------------------------------------------------------ devices

def test_auto_counts_gpus_with_nvidia_smi(fake_gpus):
    env = fake_gpus(2)
    assert resolve_devices("auto", env=env) == ["cuda:0", "cuda:1"]


@pytest.mark.parametrize("visible, expected", [
    ("1", ["cuda:0"]), ("1,0", ["cuda:0", "cuda:1"]), ("0,7,1", ["cuda:0"]),
    ("GPU-00000001", ["cuda:0"])])
def test_auto_honours_cuda_visible_devices(fake_gpus, visible: str, expected: list[str]):
    env = {**fake_gpus(2), "CUDA_VISIBLE_DEVICES": visible}
    assert resolve_devices("auto", env=env) == expected


@pytest.mark.parametrize("visible", ["", "-1", "5"])
def test_auto_with_no_visible_gpu_suggests_cpu(fake_gpus, visible: str):
    with pytest.raises(ConfigError) as excinfo:
        resolve_devices("auto", env={**fake_gpus(2), "CUDA_VISIBLE_DEVICES": visible})
    text = problems_of(excinfo)
    assert "found no NVIDIA GPU" in text and 'devices = ["cpu"]' in text
    assert f"CUDA_VISIBLE_DEVICES={visible!r}" in text


@pytest.mark.skipif(Path("/proc/driver/nvidia/gpus").exists(), reason="this machine has GPUs")
def test_auto_without_nvidia_smi_or_driver(tmp_path: Path, fake_gpus):
    for env in ({"PATH": str(tmp_path)}, fake_gpus(2, rc=9)):  # absent, and failing nvidia-smi
        with pytest.raises(ConfigError) as excinfo:
            resolve_devices("auto", env=env)
        assert "/proc/driver/nvidia/gpus lists 0" in problems_of(excinfo)


def test_explicit_devices_do_not_probe_gpus(tmp_path: Path):
    env = {"PATH": str(tmp_path)}  # no nvidia-smi: explicit lists need none
    assert resolve_devices(["cpu", "cpu"], env=env) == ["cpu", "cpu"]
    assert resolve_devices(["cuda", "cuda:1"], env=env) == ["cuda:0", "cuda:1"]
    assert resolve_devices("cpu,cuda:3", env=env) == ["cpu", "cuda:3"]
    with pytest.raises(ConfigError, match="cuda:0 is listed twice"):
        resolve_devices(["cuda:0", "cuda"], env=env)
    with pytest.raises(ConfigError, match="'tpu' is not a device"):
        resolve_devices(["tpu"], env=env)


# ------------------------------------------------------------------ validate_config

def test_validate_creates_missing_dirs(tmp_path: Path):
    pytest.importorskip("vnpd.compute.families.esm2_checkpoint")
    cfg = usable_config(tmp_path)
    validate_config(cfg)
    umask = os.umask(0)
    os.umask(umask)
    for path in (cfg.paths.inbox, cfg.paths.outbox, cfg.paths.state, cfg.paths.failed):
        assert path.is_dir() and stat.S_IMODE(path.stat().st_mode) == 0o750 & ~umask
        assert list(path.iterdir()) == []  # the write probe cleaned up


def test_validate_never_writes_into_the_outbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Only complete outputs may ever show in the outbox, not even a write probe: a
    reader of the outbox saw `.vnpd-write-test-*` while a daemon started."""
    cfg = usable_config(tmp_path)
    probed: list[str] = []
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args: object, **kwargs: object) -> tuple[int, str]:
        probed.append(str(kwargs.get("dir")))
        return real_mkstemp(*args, **kwargs)  # type: ignore[arg-type]
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    validate_config(cfg, check_model=False)
    assert str(cfg.paths.outbox) not in probed and str(cfg.paths.state) in probed


def test_validate_unwritable_and_uncreatable_dirs(tmp_path: Path):
    cfg = usable_config(tmp_path)
    blocker = write(tmp_path / "a-file", "")
    cfg.paths.inbox = blocker / "inbox"  # parent is a regular file: cannot be created
    cfg.paths.failed = blocker  # exists, not a directory
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    cfg.paths.outbox = locked
    with pytest.raises(ConfigError) as excinfo:
        validate_config(cfg, check_model=False)
    text = problems_of(excinfo)
    assert f"paths.inbox = {str(blocker / 'inbox')!r}: cannot create the directory" in text
    assert f"paths.failed = {str(blocker)!r}: exists but is not a directory" in text
    if os.geteuid() != 0:  # root writes through mode bits
        assert f"paths.outbox = {str(locked)!r}: directory is not writable" in text
    locked.chmod(0o700)


def test_validate_requires_one_filesystem(tmp_path: Path):
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a different filesystem from tmp_path")
    other = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="vnpd-test-"))
    try:
        cfg = usable_config(tmp_path)
        cfg.paths.outbox = other
        with pytest.raises(ConfigError) as excinfo:
            validate_config(cfg, check_model=False)
        text = problems_of(excinfo)
        assert "must be on one filesystem" in text and "rename(2)" in text
        assert str(other) in text and len(excinfo.value.problems) == 1
    finally:
        other.rmdir()


def test_validate_rejects_a_shared_directory(tmp_path: Path):
    cfg = usable_config(tmp_path)
    cfg.paths.failed = cfg.paths.inbox
    with pytest.raises(ConfigError, match="paths.inbox and paths.failed are the same directory"):
        validate_config(cfg, check_model=False)


def test_validate_missing_model_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("vnpd.compute.families.esm2_checkpoint")
    cfg = usable_config(tmp_path)
    cfg.model.checkpoint = str(tmp_path / "nope.pt")
    with pytest.raises(ConfigError) as excinfo:
        validate_config(cfg)
    text = problems_of(excinfo)
    assert text.startswith("model.checkpoint: ") and str(tmp_path / "nope.pt") in text
    assert len(excinfo.value.problems) == 1
    validate_config(cfg, check_model=False)  # the model check can be skipped

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # read by vnpd.compute.families.esm2_checkpoint via torch.hub
    cfg.model.checkpoint = "esm2_t6_8M_UR50D"
    with pytest.raises(ConfigError) as excinfo:
        validate_config(cfg)
    text = problems_of(excinfo)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "esm2_t6_8M_UR50D.pt") in text
    assert "fetch-model" in text


def test_validate_devices_against_visible_gpus(tmp_path: Path, fake_gpus):
    cfg = usable_config(tmp_path)
    cfg.workers.devices = ["cuda:1", "cuda:3"]
    with pytest.raises(ConfigError) as excinfo:
        validate_config(cfg, check_model=False, env=fake_gpus(2))
    text = problems_of(excinfo)
    assert "cuda:3 is not available: 2 NVIDIA GPU(s) visible" in text and "cuda:1 " not in text
    cfg.workers.devices = "auto"
    validate_config(cfg, check_model=False, env=fake_gpus(2))
    with pytest.raises(ConfigError, match='devices = \\["cpu"\\]'):
        validate_config(cfg, check_model=False, env={**fake_gpus(2), "CUDA_VISIBLE_DEVICES": ""})


def test_validate_lists_every_problem(tmp_path: Path, fake_gpus):
    pytest.importorskip("vnpd.compute.families.esm2_checkpoint")
    cfg = usable_config(tmp_path, truncation=2000)
    cfg.paths.state = write(tmp_path / "state-file", "")
    cfg.workers.devices = ["cuda:0"]
    cfg.model.checkpoint = str(tmp_path / "missing.pt")
    with pytest.raises(ConfigError) as excinfo:
        validate_config(cfg, env=fake_gpus(0))
    problems = excinfo.value.problems
    assert len(problems) == 4, problems
    assert [p.split(" ")[0].rstrip(":") for p in problems] == [
        "model.truncation", "paths.state", "workers.devices", "model.checkpoint"]
