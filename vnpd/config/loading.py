"""Loading: defaults < TOML file < environment < CLI overrides, into a ``Config``.

Every value is checked against its key's type here, and then by ``vnpd.config.checks``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

from vnpd.compute.choices import COMPILE_OFF
from vnpd.config.checks import check_values
from vnpd.config.schema import (ENV_PREFIX, LEGACY_COMPILE_SWITCH, LEGACY_ENV, SCHEMA, SECTIONS,
                                Config, ConfigError)


def load_config(path: Path | None, *, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, object] | None = None) -> Config:
    """Build a :class:`Config` from defaults, then ``path``, then ``env``, then ``overrides``.

    ``env`` defaults to ``os.environ``; only ``VNPD_<SECTION>_<KEY>`` variables are read
    (strings, parsed by the key's type; lists as TOML/JSON ``["cpu","cpu"]`` or ``cpu,cpu``),
    and the aliases of ``LEGACY_ENV`` and ``VNPD_COMPILE``, which the ``VNPD_MODEL_*``
    names override.
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
    env = os.environ if env is None else env
    problems += _apply_legacy_env(env, values, origins)
    problems += _apply_env(env, values, origins)
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


def _apply_legacy_env(env: Mapping[str, str], values: dict,
                      origins: dict[str, str]) -> list[str]:
    """The older engine variables, as the settings they now are; "" counts as unset."""
    problems = []
    for name, dotted in LEGACY_ENV.items():
        if env.get(name):
            section, _, key = dotted.partition(".")
            problems += _set(values, origins, section, key, env[name], name, True, Path.cwd())
    if env.get(LEGACY_COMPILE_SWITCH, "").strip() == "0":  # it wins over VNPD_COMPILE_MODE
        problems += _set(values, origins, "model", "compile_mode", COMPILE_OFF,
                         f"{LEGACY_COMPILE_SWITCH}=0", True, Path.cwd())
    return problems


def _apply_env(env: Mapping[str, str], values: dict, origins: dict[str, str]) -> list[str]:
    problems = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in LEGACY_ENV or name == LEGACY_COMPILE_SWITCH:
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
    if hint == list[int]:  # model.layers: [-1, 20], or "-1,20" from the environment
        if isinstance(value, str):
            try:
                return [int(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise ValueError("a list of integers such as [-1, 20] or -1,20") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        if isinstance(value, (list, tuple)) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        raise ValueError("a list of integers such as [-1, 20]")
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


def load_engine_choices(env: Mapping[str, str] | None = None, *, attention: str | None = None,
                        compile_mode: str | None = None) -> tuple[str, str]:
    """``(model.attention, model.compile_mode)`` for ``vnpd embed``, which has no config file.

    The same order as :func:`load_config` over those two keys only: defaults < the
    environment (``VNPD_MODEL_ATTENTION``, ``VNPD_MODEL_COMPILE_MODE`` and the aliases
    ``VNPD_ATTENTION``, ``VNPD_COMPILE_MODE``, ``VNPD_COMPILE=0``) < the arguments (CLI
    flags; None = not given). Other variables are not read. Raises :class:`ConfigError`.
    """
    env = os.environ if env is None else env
    names = {*LEGACY_ENV, LEGACY_COMPILE_SWITCH, f"{ENV_PREFIX}MODEL_ATTENTION",
             f"{ENV_PREFIX}MODEL_COMPILE_MODE"}
    cfg = load_config(None, env={k: v for k, v in env.items() if k in names},
                      overrides={"model.attention": attention, "model.compile_mode": compile_mode})
    return cfg.model.attention, cfg.model.compile_mode


