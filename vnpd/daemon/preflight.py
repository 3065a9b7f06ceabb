"""Preflight: checks of this machine against a loaded config, before anything starts.

:func:`validate_config` checks the four directories (created if missing, writable, one
filesystem), the worker devices against the GPUs visible here, and the model file;
:func:`resolve_devices` turns ``workers.devices`` into worker devices ("auto" counts the
NVIDIA GPUs). GPUs are counted without torch or CUDA, so ``vnpd validate-config`` and the daemon's
start stay fast and never initialise a GPU. Problems raise ``ConfigError``, all at once.

Example::

    cfg = load_config(Path("/etc/vnpd/config.toml"))
    validate_config(cfg)
    devices = resolve_devices(cfg.workers.devices)   # e.g. ["cuda:0", "cuda:1"]
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from vnpd.config.checks import check_values, parse_devices
from vnpd.config.schema import Config, ConfigError, PathsConfig

PROC_NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


# ---------------------------------------------------------------- devices

def resolve_devices(devices: list[str] | str, *, env: Mapping[str, str] | None = None
                    ) -> list[str]:
    """The worker devices: ``"auto"`` -> every visible NVIDIA GPU as ``cuda:N``.

    GPUs are counted without torch or CUDA (see :func:`_count_visible_gpus`). Explicit lists
    hold ``"cpu"`` (may repeat) and ``"cuda:N"`` (``"cuda"`` means ``cuda:0``; no
    duplicates); a string other than "auto" is a comma-separated list. Explicit indexes
    are not checked against the GPUs present here; :func:`validate_config` does that.
    Raises :class:`ConfigError` for a bad list, or for "auto" when no GPU is visible.
    """
    if isinstance(devices, str):
        if devices.strip() != "auto":
            return resolve_devices(devices.split(","), env=env)
        count, how = _count_visible_gpus(os.environ if env is None else env)
        if count == 0:
            raise ConfigError(f'workers.devices = "auto" found no NVIDIA GPU ({how}); to run '
                              f'on the CPU set devices = ["cpu"] in [workers] '
                              f'(or VNPD_WORKERS_DEVICES=cpu)')
        return [f"cuda:{i}" for i in range(count)]
    normalized, problems = parse_devices(list(devices))
    if problems:
        raise ConfigError([f"workers.devices: {p}" for p in problems])
    return normalized


def _count_visible_gpus(env: Mapping[str, str]) -> tuple[int, str]:
    """(NVIDIA GPUs this process could use, how they were found, for the error messages).

    Counted without importing torch or initialising CUDA. Physical GPUs are counted with
    ``nvidia-smi -L`` when it is on PATH and succeeds, else from
    ``/proc/driver/nvidia/gpus/*``. ``CUDA_VISIBLE_DEVICES`` then applies with CUDA's
    rules: empty hides every GPU, and the list stops at the first invalid index.
    """
    physical, how = _count_physical_gpus(env)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return physical, how
    count = 0
    for entry in (e.strip() for e in visible.split(",")):
        if entry.lstrip("-").isdigit():
            if not 0 <= int(entry) < physical:
                break
        elif not entry or physical == 0:  # empty entry, or a UUID with no GPU present
            break
        count += 1
    return count, f"{how}; CUDA_VISIBLE_DEVICES={visible!r} leaves {count}"


def _count_physical_gpus(env: Mapping[str, str]) -> tuple[int, str]:
    smi = shutil.which("nvidia-smi", path=env.get("PATH", os.defpath))
    if smi:
        try:
            done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30,
                                  check=True)
            count = sum(1 for line in done.stdout.splitlines() if line.startswith("GPU "))
            return count, f"`nvidia-smi -L` listed {count}"
        except (OSError, subprocess.SubprocessError):
            pass  # driver not loaded, or a broken nvidia-smi: fall back to /proc
    try:
        count = sum(1 for p in PROC_NVIDIA_GPUS.iterdir() if p.is_dir())
    except OSError:
        count = 0
    return count, f"{PROC_NVIDIA_GPUS} lists {count}"


# ---------------------------------------------------------------- machine checks

def validate_config(cfg: Config, *, check_model: bool = True,
                    env: Mapping[str, str] | None = None) -> None:
    """Check ``cfg`` against this machine; raise :class:`ConfigError` listing every problem.

    - each of inbox, outbox, state and failed exists or is created (mode 0o750, less the
      umask), is a directory, and is writable (a temp file is created and removed);
      they are four different directories on one filesystem, since files move between
      them by rename(2), which is atomic only within a filesystem;
    - the devices resolve (:func:`resolve_devices`), and each ``cuda:N`` has N < visible GPUs;
    - with ``check_model``, the checkpoint file exists (``vnpd.compute.families.esm2_checkpoint.resolve_checkpoint``).
    ``env`` (default ``os.environ``) is used for PATH and CUDA_VISIBLE_DEVICES.
    """
    env = os.environ if env is None else env
    problems = check_values(cfg) + _check_paths(cfg.paths)
    if cfg.workers.backend != "ray":  # a Ray pool's devices are the cluster's, not this host's
        problems += _check_devices(cfg.workers.devices, env)
    if check_model:
        problems += _check_model(cfg.model.checkpoint)
    if problems:
        raise ConfigError(problems)


def _check_paths(paths: PathsConfig) -> list[str]:
    problems = []
    devs: dict[str, int] = {}
    named = {f.name: getattr(paths, f.name) for f in dataclasses.fields(paths)}
    for key, path in named.items():
        # Nothing but complete outputs may ever show in the outbox, not even a probe
        # file for a moment (a user's pipeline may be reading it): ask access(2) there.
        problem = _ensure_writable_dir(Path(path), probe=key != "outbox")
        if problem:
            problems.append(f"paths.{key} = {str(path)!r}: {problem}")
        else:
            devs[key] = Path(path).stat().st_dev
    seen: dict[Path, str] = {}
    for key, path in named.items():
        real = Path(path).resolve()
        if real in seen:
            problems.append(f"paths.{seen[real]} and paths.{key} are the same directory "
                            f"({str(real)!r}); each needs its own")
        seen.setdefault(real, key)
    if len(set(devs.values())) > 1:
        where = "; ".join(f"{k} = {str(named[k])!r} on device "
                          f"{os.major(d)}:{os.minor(d)}" for k, d in devs.items())
        problems.append("paths: inbox, state, outbox and failed must be on one filesystem, "
                        "because vnpd moves files between them with rename(2), which is "
                        "atomic only within one filesystem (across filesystems it fails, and "
                        f"a copy could expose half-written files); now {where}")
    return problems


def _ensure_writable_dir(path: Path, probe: bool = True) -> str | None:
    """Create ``path`` if missing and prove it writable (with a probe file, or with
    access(2) when ``probe`` is False); return a problem or None."""
    try:
        path.mkdir(mode=0o750, parents=True, exist_ok=True)
    except FileExistsError:
        return "exists but is not a directory"
    except OSError as e:
        return f"cannot create the directory: {e.strerror or e}"
    if not probe:
        effective = os.access in os.supports_effective_ids
        if os.access(path, os.W_OK | os.X_OK, effective_ids=effective):
            return None
        return f"directory is not writable by uid {os.geteuid()}: {os.strerror(errno.EACCES)}"
    try:
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".vnpd-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return f"directory is not writable by uid {os.geteuid()}: {e.strerror or e}"
    return None


def _check_devices(devices: list[str] | str, env: Mapping[str, str]) -> list[str]:
    try:
        resolved = resolve_devices(devices, env=env)
    except ConfigError as e:
        return e.problems
    cuda = [int(d.split(":")[1]) for d in resolved if d != "cpu"]
    if devices == "auto" or not cuda:
        return []
    count, how = _count_visible_gpus(env)
    return [f"workers.devices: cuda:{i} is not available: {count} NVIDIA GPU(s) visible ({how})"
            for i in cuda if i >= count]


def _check_model(checkpoint: str) -> list[str]:
    try:
        from vnpd.compute.families.esm2_checkpoint import resolve_checkpoint  # imports torch, but does not touch CUDA
    except ImportError as e:
        return [f"model.checkpoint: cannot check the model file, vnpd.compute.families.esm2_checkpoint failed to import: {e}"]
    try:
        resolve_checkpoint(checkpoint)
    except FileNotFoundError as e:
        return [f"model.checkpoint: {e}"]
    return []
