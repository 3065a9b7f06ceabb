"""Configuration: typed dataclasses from defaults < TOML file < environment < CLI overrides.

Every setting is ``<section>.<key>``. The environment names it ``VNPD_<SECTION>_<KEY>``
(``VNPD_MODEL_DTYPE=float16``); the CLI passes ``{"model.dtype": "float16"}``. Three older
variables are aliases, read here and nowhere else (``LEGACY_ENV``): ``VNPD_ATTENTION``
(``model.attention``), ``VNPD_COMPILE_MODE`` (``model.compile_mode``) and ``VNPD_COMPILE=0``
(``model.compile_mode = "off"``).
:func:`load_config` checks syntax, types and ranges and touches nothing on disk;
``vnpd.daemon.preflight.validate_config`` then checks the machine (directories, GPUs, model
file). Both raise :class:`ConfigError` listing every problem; the CLI exits
:data:`EX_CONFIG` on it. Nothing here imports torch or initialises CUDA.

Example::

    cfg = load_config(Path("/etc/vnpd/config.toml"), overrides={"model.dtype": "float16"})
    cfg.model.dtype                                  # "float16"
"""

from vnpd.config.checks import check_values, config_warnings, parse_devices, parse_listen
from vnpd.config.loading import load_config, load_engine_choices
from vnpd.config.schema import (AFTER_DONE, ENUMS, ENV_PREFIX, EX_CONFIG, LEGACY_COMPILE_SWITCH,
                                LEGACY_ENV, LOG_FORMATS, LOG_LEVELS, NON_NEGATIVE, ON_POISON,
                                POSITIVE, SCHEMA, SECTIONS, Config, ConfigError, InboxConfig,
                                JobsConfig, LoggingConfig, MetricsConfig, ModelConfig,
                                PathsConfig, WorkersConfig)

__all__ = ["AFTER_DONE", "ENUMS", "ENV_PREFIX", "EX_CONFIG", "LEGACY_COMPILE_SWITCH", "LEGACY_ENV",
           "LOG_FORMATS", "LOG_LEVELS", "NON_NEGATIVE", "ON_POISON", "POSITIVE", "SCHEMA",
           "SECTIONS", "Config", "ConfigError", "InboxConfig", "JobsConfig", "LoggingConfig",
           "MetricsConfig", "ModelConfig", "PathsConfig", "WorkersConfig", "check_values",
           "config_warnings",
           "load_config", "load_engine_choices", "parse_devices", "parse_listen"]
