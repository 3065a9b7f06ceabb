"""Configuration: typed dataclasses from defaults < TOML file < environment < CLI overrides.

Every setting is ``<section>.<key>``. The environment names it ``VNPD_<SECTION>_<KEY>``
(``VNPD_MODEL_DTYPE=float16``); the CLI passes ``{"model.dtype": "float16"}``.
:func:`load_config` checks syntax, types and ranges and touches nothing on disk;
``vnpd.daemon.preflight.validate_config`` then checks the machine (directories, GPUs, model
file). Both raise :class:`ConfigError` listing every problem; the CLI exits
:data:`EX_CONFIG` on it. Nothing here imports torch or initialises CUDA.

Example::

    cfg = load_config(Path("/etc/vnpd/config.toml"), overrides={"model.dtype": "float16"})
    cfg.model.dtype                                  # "float16"
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

EX_CONFIG = 78  # sysexits.h: configuration error

DTYPES = ("float32", "bfloat16", "float16")
OUTPUT_DTYPES = ("float32", "float16")
ON_POISON = ("quarantine", "fail")
AFTER_DONE = ("move", "delete")
LOG_FORMATS = ("json", "console", "auto")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
BACKENDS = ("local", "ray")  # workers.backend: processes on this host | a Ray cluster
MAX_TRUNCATION = 1022  # fair-esm's positional limit is 1024 tokens including BOS and EOS
ENV_PREFIX = "VNPD_"


class ConfigError(Exception):
    """The configuration is unusable. ``problems`` has one line per problem; so does str()."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class PathsConfig:
    """Working directories. inbox, state, outbox and failed must share one filesystem."""

    inbox: Path = Path("/var/lib/vnpd/inbox")
    outbox: Path = Path("/var/lib/vnpd/outbox")
    state: Path = Path("/var/lib/vnpd/state")
    failed: Path = Path("/var/lib/vnpd/failed")


@dataclass
class ModelConfig:
    """Which ESM-2 checkpoint, which layer, and the compute and output dtypes."""

    checkpoint: str = "esm2_t36_3B_UR50D"
    layer: int = -1
    dtype: str = "bfloat16"
    output_dtype: str = "float32"
    truncation: int = 1022
    max_tokens_per_batch: int = 0  # 0 = size from device memory


@dataclass
class WorkersConfig:
    """One worker process per device, with its health and restart policy."""

    devices: list[str] | str = "auto"
    heartbeat_interval_s: float = 2.0
    heartbeat_timeout_s: float = 30.0
    batches_in_flight: int = 2
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 60.0
    batch_deadline_base_s: float = 120.0
    batch_deadline_per_1k_tokens_s: float = 5.0
    crash_budget: int = 5
    crash_window_s: float = 600.0
    degraded_retry_s: float = 900.0
    backend: str = "local"  # "local" (processes here) | "ray" (actors on a Ray cluster)


@dataclass
class RayConfig:
    """The Ray cluster of ``workers.backend = "ray"`` (docs/CLUSTER.md).

    ``address``: "" = a local Ray that the daemon starts and stops; "auto" = join the
    cluster running here (``ray start``), left running on exit; "HOST:PORT" (the GCS
    address) or "ray://HOST:10001" (Ray Client) = join that cluster.
    """

    address: str = "auto"


@dataclass
class InboxConfig:
    """How new input files are noticed, and what happens to them once published."""

    settle_s: float = 1.0
    rescan_interval_s: float = 30.0
    polling: bool = False
    after_done: str = "move"  # "move" (to state/done/) | "delete"


@dataclass
class JobsConfig:
    """Per-file job policy."""

    on_poison: str = "quarantine"  # "quarantine" | "fail"
    max_active_jobs: int = 8
    publish_retry_max_s: float = 300.0


@dataclass
class MetricsConfig:
    """Prometheus endpoint as HOST:PORT; "" disables it."""

    listen: str = "127.0.0.1:9464"


@dataclass
class LoggingConfig:
    """Log renderer (json | console | auto = console on a TTY, else json) and level."""

    format: str = "auto"
    level: str = "info"


@dataclass
class Config:
    """The whole configuration; ``source`` is the TOML file it came from, if any."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    inbox: InboxConfig = field(default_factory=InboxConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    source: Path | None = None


_CONFIG_HINTS = typing.get_type_hints(Config)
SECTIONS: dict[str, type] = {f.name: _CONFIG_HINTS[f.name] for f in dataclasses.fields(Config)
                             if f.name != "source"}
# section -> key -> type hint (int, float, bool, str, Path, or list[str] | str for devices)
SCHEMA: dict[str, dict[str, object]] = {
    name: typing.get_type_hints(cls) for name, cls in SECTIONS.items()}

ENUMS: dict[str, tuple[str, ...]] = {
    "model.dtype": DTYPES, "model.output_dtype": OUTPUT_DTYPES, "jobs.on_poison": ON_POISON,
    "inbox.after_done": AFTER_DONE, "logging.format": LOG_FORMATS, "logging.level": LOG_LEVELS}
ENUMS["workers.backend"] = BACKENDS
POSITIVE = (
    "workers.heartbeat_interval_s", "workers.heartbeat_timeout_s", "workers.batches_in_flight",
    "workers.restart_backoff_s", "workers.restart_backoff_max_s",
    "workers.batch_deadline_base_s", "workers.crash_budget", "workers.crash_window_s",
    "workers.degraded_retry_s", "inbox.rescan_interval_s", "jobs.max_active_jobs",
    "jobs.publish_retry_max_s")
NON_NEGATIVE = ("model.max_tokens_per_batch", "workers.batch_deadline_per_1k_tokens_s",
                "inbox.settle_s")
_CUDA_RE = re.compile(r"cuda(?::(\d+))?")


# ---------------------------------------------------------------- loading

def load_config(path: Path | None, *, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, object] | None = None) -> Config:
    """Build a :class:`Config` from defaults, then ``path``, then ``env``, then ``overrides``.

    ``env`` defaults to ``os.environ``; only ``VNPD_<SECTION>_<KEY>`` variables are read
    (strings, parsed by the key's type; lists as TOML/JSON ``["cpu","cpu"]`` or ``cpu,cpu``).
    ``overrides`` maps ``"section.key"`` to a typed value or a string parsed like the
    environment; ``None`` values are skipped (an unset CLI flag). Relative paths resolve
    against the file's directory (file) or the working directory (env, overrides).
    Raises :class:`ConfigError` listing every syntax, type, name and range problem.
    Reads nothing but ``path``; the machine is checked by ``vnpd.daemon.preflight.validate_config``.
    """
    problems: list[str] = []
    values = {s: dataclasses.asdict(cls()) for s, cls in SECTIONS.items()}
    origins: dict[str, str] = {}
    source = None
    if path is not None:
        source = Path(path).expanduser().absolute()
        problems += _apply_file(source, values, origins)
    problems += _apply_env(os.environ if env is None else env, values, origins)
    problems += _apply_overrides(overrides or {}, values, origins)
    cfg = Config(**{s: SECTIONS[s](**values[s]) for s in SECTIONS}, source=source)
    cfg.logging.level = cfg.logging.level.lower()
    problems += check_values(cfg, origins)
    if problems:
        raise ConfigError(problems)
    return cfg


def _apply_file(source: Path, values: dict, origins: dict[str, str]) -> list[str]:
    try:
        with source.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as e:
        return [f"cannot read config file {str(source)!r}: {e.strerror or e}"]
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        return [f"invalid TOML in {str(source)!r}: {e}"]
    problems = []
    for section, table in data.items():
        if section not in SCHEMA:
            hint = _suggest(section, list(SCHEMA), "[{}]") or _suggest_key(section, "{}")
            kind = "section" if isinstance(table, dict) else "top-level key"
            problems.append(f"{source}: unknown {kind} {section!r}{hint}")
        elif not isinstance(table, dict):
            problems.append(f"{source}: {section} must be a table ([{section}]), "
                            f"got {type(table).__name__} {table!r}")
        else:
            for key, raw in table.items():
                problems += _set(values, origins, section, key, raw, str(source), False,
                                 source.parent)
    return problems


def _apply_env(env: Mapping[str, str], values: dict, origins: dict[str, str]) -> list[str]:
    problems = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("_")
        if section not in SCHEMA:
            # Other VNPD_* variables may exist; only a near-miss of a section is flagged.
            hint = _suggest(section, list(SCHEMA), ENV_PREFIX + "{}_...", upper=True)
            if hint:
                problems.append(f"{name}: unknown config section {section!r}{hint}")
            continue
        if key not in SCHEMA[section]:
            hint = _suggest(key, list(SCHEMA[section]), f"{ENV_PREFIX}{section}_{{}}", upper=True)
            problems.append(f"{name}: unknown setting {section}.{key}{hint}")
            continue
        problems += _set(values, origins, section, key, env[name], name, True, Path.cwd())
    return problems


def _apply_overrides(overrides: Mapping[str, object], values: dict,
                     origins: dict[str, str]) -> list[str]:
    problems = []
    for dotted, raw in overrides.items():
        if raw is None:
            continue
        section, _, key = dotted.partition(".")
        if section not in SCHEMA or key not in SCHEMA[section]:
            names = [f"{s}.{k}" for s in SCHEMA for k in SCHEMA[s]]
            problems.append(f"override {dotted!r}: unknown setting{_suggest(dotted, names, '{}')}")
            continue
        problems += _set(values, origins, section, key, raw, f"override {dotted}",
                         isinstance(raw, str), Path.cwd())
    return problems


def _set(values: dict, origins: dict[str, str], section: str, key: str, raw: object,
         origin: str, from_text: bool, base: Path) -> list[str]:
    """Check one raw value against its key's type and store it; return the problems."""
    if key not in SCHEMA[section]:
        hint = _suggest(key, list(SCHEMA[section]), section + ".{}") or _suggest_key(key, "{}")
        return [f"{origin}: unknown key {section}.{key}{hint}"]
    hint = SCHEMA[section][key]
    try:
        value = _coerce(_parse_text(raw, hint) if from_text else raw, hint)
    except ValueError as e:
        return [f"{section}.{key} (from {origin}): expected {e}, "
                f"got {type(raw).__name__} {raw!r}"]
    if isinstance(value, Path):
        value = base / value.expanduser()
    elif section == "model" and key == "checkpoint" and _is_path_spec(value):
        value = str(base / Path(value).expanduser())
    values[section][key] = value
    origins[f"{section}.{key}"] = origin
    return []


def _is_path_spec(spec: str) -> bool:
    # Same rule as vnpd.compute.families.esm2_checkpoint.is_path_spec, repeated so that loading a config does not
    # import torch.
    return spec.endswith(".pt") or os.sep in spec or "/" in spec


def _parse_text(text: object, hint: object) -> object:
    """An environment or CLI string -> the TOML-typed value it spells."""
    assert isinstance(text, str)
    s = text.strip()
    if hint is bool:
        flags = {"true": True, "1": True, "yes": True, "on": True,
                 "false": False, "0": False, "no": False, "off": False}
        if s.lower() not in flags:
            raise ValueError("a boolean (true/false, 1/0, yes/no, on/off)")
        return flags[s.lower()]
    if hint is int:
        try:
            return int(s)
        except ValueError:
            raise ValueError("an integer") from None
    if hint is float:
        try:
            return float(s)
        except ValueError:
            raise ValueError("a number") from None
    if hint in (str, Path) or not s.startswith("["):
        return text
    try:
        return tomllib.loads(f"v = {s}")["v"]
    except tomllib.TOMLDecodeError:
        raise ValueError('a list such as ["cuda:0", "cuda:1"] or cuda:0,cuda:1') from None


def _coerce(value: object, hint: object) -> object:
    """A TOML-typed value -> the field's value; ValueError(what was expected) otherwise."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError("a boolean (true or false)")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value):
            return float(value)
        raise ValueError("a finite number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError("a string")
    if hint is Path:
        if isinstance(value, (str, os.PathLike)) and str(value).strip():
            return Path(value)
        raise ValueError("a non-empty path string")
    # workers.devices: "auto", a list of device strings, or a comma-separated string.
    if isinstance(value, str):
        return "auto" if value.strip() == "auto" else [d.strip() for d in value.split(",")]
    if isinstance(value, (list, tuple)) and all(isinstance(d, str) for d in value):
        return [d.strip() for d in value]
    raise ValueError('"auto" or a list of devices such as ["cuda:0", "cuda:1"] or ["cpu"]')


def _suggest(name: str, candidates: list[str], fmt: str, upper: bool = False) -> str:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if not match:
        return ""
    text = fmt.format(match[0])
    return f"; did you mean {text.upper() if upper else text}?"


def _suggest_key(key: str, fmt: str) -> str:
    """Suggest ``section.key`` for a key that was put in the wrong section (or at top level)."""
    names = {k: f"{s}.{k}" for s in SCHEMA for k in SCHEMA[s]}
    match = difflib.get_close_matches(key, list(names), n=1, cutoff=0.8)
    return f"; did you mean {fmt.format(names[match[0]])}?" if match else ""


# ---------------------------------------------------------------- static checks

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
    if not 1 <= m.truncation <= MAX_TRUNCATION:
        problems.append(f"{name('model.truncation')}: must be in 1..{MAX_TRUNCATION} (fair-esm "
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
    if cfg.metrics.listen and not _valid_listen(cfg.metrics.listen):
        problems.append(f"{name('metrics.listen')}: expected HOST:PORT (e.g. 127.0.0.1:9464) "
                        f"or \"\" to disable, got {cfg.metrics.listen!r}")
    problems += _check_ray_address(cfg.ray.address, name("ray.address"))
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


def _valid_listen(listen: str) -> bool:
    host, sep, port = listen.rpartition(":")
    return bool(sep and host.strip("[]") and port.isdigit() and 0 <= int(port) <= 65535)


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


# ---------------------------------------------------------------- output

def config_to_dict(cfg: Config) -> dict:
    """``cfg`` as plain JSON-ready data (paths as str), e.g. for ``vnpd status --json``."""
    def plain(value: object) -> object:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value
    return typing.cast(dict, plain(dataclasses.asdict(cfg)))
