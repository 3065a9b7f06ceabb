"""Static checks of a ``Config``: ranges, enumerations, cross-key rules, devices, listen.

Nothing here touches the machine; ``vnpd.daemon.preflight.validate_config`` does that.
``parse_listen`` and ``parse_devices`` are the one parser of their values, used by the
daemon too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from vnpd.compute.tokenizer import FAIR_ESM_TRUNCATION
from vnpd.config.schema import ENUMS, NON_NEGATIVE, POSITIVE, Config

_CUDA_RE = re.compile(r"cuda(?::(\d+))?")


def check_values(cfg: Config, origins: Mapping[str, str] | None = None) -> list[str]:
    """Range, enum and cross-field problems of ``cfg``, without touching the machine.

    ``origins`` maps ``"section.key"`` to where the value came from, for the messages.
    """
    origins = origins or {}

    def name(dotted: str) -> str:
        return f"{dotted} (from {origins[dotted]})" if dotted in origins else dotted

    def get(dotted: str) -> object:
        section, key = dotted.split(".")
        return getattr(getattr(cfg, section), key)

    problems = []
    for dotted, allowed in ENUMS.items():
        if get(dotted) not in allowed:
            problems.append(f"{name(dotted)}: {get(dotted)!r} is not one of {', '.join(allowed)}")
    for dotted in POSITIVE:
        if not get(dotted) > 0:  # type: ignore[operator]
            problems.append(f"{name(dotted)}: must be greater than 0, got {get(dotted)!r}")
    for dotted in NON_NEGATIVE:
        if not get(dotted) >= 0:  # type: ignore[operator]
            problems.append(f"{name(dotted)}: must be 0 or more, got {get(dotted)!r}")
    m, w = cfg.model, cfg.workers
    if not 1 <= m.truncation <= FAIR_ESM_TRUNCATION:
        problems.append(f"{name('model.truncation')}: must be in 1..{FAIR_ESM_TRUNCATION} (fair-esm "
                        f"ESM-2 has 1024 positions including BOS and EOS), got {m.truncation}")
    elif 0 < m.max_tokens_per_batch < m.truncation + 2:
        problems.append(f"{name('model.max_tokens_per_batch')}: {m.max_tokens_per_batch} cannot "
                        f"hold one sequence of truncation + 2 = {m.truncation + 2} tokens; "
                        f"use 0 (size from device memory) or at least {m.truncation + 2}")
    if not m.checkpoint.strip():
        problems.append(f"{name('model.checkpoint')}: must name a model or a .pt file")
    if w.heartbeat_interval_s > 0 and not w.heartbeat_timeout_s > w.heartbeat_interval_s:
        problems.append(f"{name('workers.heartbeat_timeout_s')}: must be greater than "
                        f"heartbeat_interval_s ({w.heartbeat_interval_s}), "
                        f"got {w.heartbeat_timeout_s}")
    if w.restart_backoff_s > 0 and not w.restart_backoff_max_s >= w.restart_backoff_s:
        problems.append(f"{name('workers.restart_backoff_max_s')}: must be at least "
                        f"restart_backoff_s ({w.restart_backoff_s}), got {w.restart_backoff_max_s}")
    if w.devices != "auto":
        devices = w.devices.split(",") if isinstance(w.devices, str) else w.devices
        problems += [f"{name('workers.devices')}: {p}" for p in parse_devices(devices)[1]]
    try:
        parse_listen(cfg.metrics.listen)
    except ValueError as exc:
        problems.append(f"{name('metrics.listen')}: {exc}")
    if m.layers and "model.layer" in origins and "model.layers" in origins \
            and m.layers != [m.layer]:
        problems.append(f"{name('model.layers')} and {name('model.layer')} disagree: "
                        f"set one (layers = {m.layers} computes all of them)")
    if len(set(m.layers)) != len(m.layers):
        problems.append(f"{name('model.layers')}: a layer is listed twice: {m.layers}")
    if 1 <= m.truncation <= FAIR_ESM_TRUNCATION and m.window_stride > m.truncation:
        problems.append(f"{name('model.window_stride')}: must be at most truncation "
                        f"({m.truncation}), or windows would leave gaps; got {m.window_stride}")
    problems += _check_ray_address(cfg.ray.address, name("ray.address"))
    if cfg.cache.max_gb * (1 << 30) < (1 << 20):
        problems.append(f"{name('cache.max_gb')}: must be at least 1 MiB (0.001), "
                        f"got {cfg.cache.max_gb!r}")
    if not cfg.nucleotide.chunk_length >= 3:
        problems.append(f"{name('nucleotide.chunk_length')}: must be at least 3 (one codon), "
                        f"got {cfg.nucleotide.chunk_length!r}")
    return problems


def _check_ray_address(address: str, name: str) -> list[str]:
    """``""``, ``"auto"``, ``"HOST:PORT"`` or ``"ray://HOST:PORT"``."""
    if address in ("", "auto"):
        return []
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if sep and host.strip("[]") and port.isdigit() and 0 < int(port) <= 65535 \
            and "/" not in host:
        return []
    return [f'{name}: expected "" (a local Ray started by the daemon), "auto" (join the '
            f'cluster running here), HOST:PORT or ray://HOST:PORT, got {address!r}']


def config_warnings(cfg: Config) -> list[str]:
    """Settings that work but are likely not what was meant (``vnpd validate-config``)."""
    warnings = []
    if cfg.output.per_residue and cfg.model.output_dtype == "float32":
        warnings.append("output.per_residue with model.output_dtype = \"float32\" writes "
                        "4 bytes per value per residue (3B: 10.2 GB per million residues "
                        "and layer); \"float16\" halves that (docs/OUTPUT.md)")
    return warnings


def parse_listen(listen: str) -> tuple[str, int] | None:
    """``metrics.listen`` as ``(host, port)``: ``"HOST:PORT"``, IPv6 as ``"[::1]:9464"``.

    The one parser of the address: the config check and the metrics endpoint both use it.
    ``""`` (the endpoint disabled) gives ``None``. Raises ``ValueError`` for a missing host
    or port, a port outside 0..65535, or an IPv6 address without brackets (``::1:9464``
    is ambiguous: port 9464 of ``::1``, or the address ``::1:9464`` with no port).

    >>> parse_listen("[::1]:9464")
    ('::1', 9464)
    """
    if not listen:
        return None
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"put an IPv6 host in brackets, e.g. [::1]:9464; got {listen!r}")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:9464 or [::1]:9464) or \"\" "
                         f"to disable, got {listen!r}")
    return host, int(port)


def parse_devices(devices: list[str]) -> tuple[list[str], list[str]]:
    """Normalise explicit device names ("cuda" -> "cuda:0"); return (devices, problems)."""
    normalized, problems = [], []
    if not devices:
        problems.append('the device list is empty; use "auto" or e.g. ["cpu"]')
    for device in (d.strip() for d in devices):
        match = _CUDA_RE.fullmatch(device)
        if device == "cpu":
            normalized.append(device)
        elif match:
            cuda = f"cuda:{int(match.group(1) or 0)}"
            if cuda in normalized:
                problems.append(f"{cuda} is listed twice; a GPU runs one worker")
            normalized.append(cuda)
        else:
            problems.append(f'{device!r} is not a device; use "cpu", "cuda" or "cuda:N"')
    return normalized, problems
