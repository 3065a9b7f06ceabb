"""Tests for vnpd/config/ (its public API, vnpd.config): real TOML files in tmp_path, env passed as dicts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from vnpd.config import (
    EX_CONFIG, SCHEMA, Config, ConfigError, load_config, load_engine_choices, parse_listen)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.toml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def problems_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> str:
    err = excinfo.value
    assert str(err) == "\n".join(err.problems)
    return str(err)


# ------------------------------------------------------------------ loading

def test_defaults():
    cfg = load_config(None, env={})
    assert cfg == Config()
    assert cfg.paths.inbox == Path("/var/lib/vnpd/inbox")
    assert cfg.model.checkpoint == "esm2_t36_3B_UR50D" and cfg.model.truncation == 1022
    assert cfg.workers.devices == "auto" and cfg.logging.format == "auto"
    assert cfg.source is None
    assert EX_CONFIG == 78


def test_file_overrides_defaults(tmp_path: Path):
    path = write(tmp_path / "vnpd.toml", """
[model]
dtype = "float16"
layer = 6
[workers]
devices = ["cpu", "cpu"]
heartbeat_timeout_s = 10          # an int where a float is expected is fine
[inbox]
polling = true
[metrics]
listen = ""
""")
    cfg = load_config(path, env={})
    assert cfg.model.dtype == "float16" and cfg.model.layer == 6
    assert cfg.workers.devices == ["cpu", "cpu"]
    assert cfg.workers.heartbeat_timeout_s == 10.0 and isinstance(cfg.workers.heartbeat_timeout_s, float)
    assert cfg.inbox.polling is True and cfg.metrics.listen == ""
    assert cfg.model.output_dtype == "float32"  # untouched keys keep defaults
    assert cfg.source == path


def test_env_overrides_file(tmp_path: Path):
    path = write(tmp_path / "vnpd.toml", '[model]\ndtype = "float16"\nlayer = 6\n')
    env = {"VNPD_MODEL_DTYPE": "float32", "VNPD_WORKERS_DEVICES": '["cpu","cpu"]',
           "VNPD_INBOX_POLLING": "yes", "VNPD_JOBS_MAX_ACTIVE_JOBS": "3",
           "VNPD_WORKERS_HEARTBEAT_INTERVAL_S": "0.5", "HOME": "/ignored", "VNPD_CONFIG": "x"}
    cfg = load_config(path, env=env)
    assert cfg.model.dtype == "float32" and cfg.model.layer == 6
    assert cfg.workers.devices == ["cpu", "cpu"]
    assert cfg.inbox.polling is True and cfg.jobs.max_active_jobs == 3
    assert cfg.workers.heartbeat_interval_s == 0.5


@pytest.mark.parametrize("text, expected", [
    ("cpu,cpu", ["cpu", "cpu"]), (" cuda:0 , cuda:1 ", ["cuda:0", "cuda:1"]),
    ("['cuda:1']", ["cuda:1"]), ('["cpu", "cpu"]', ["cpu", "cpu"]), ("auto", "auto"),
    ("cpu", ["cpu"])])
def test_env_device_list_syntax(text: str, expected: object):
    assert load_config(None, env={"VNPD_WORKERS_DEVICES": text}).workers.devices == expected


def test_cli_overrides_env(tmp_path: Path):
    env = {"VNPD_MODEL_DTYPE": "float32", "VNPD_MODEL_LAYER": "3"}
    overrides = {"model.dtype": "float16", "model.layer": None, "model.max_tokens_per_batch": 4096,
                 "workers.devices": ["cpu"], "logging.level": "DEBUG", "inbox.polling": "true",
                 "paths.inbox": tmp_path / "in"}
    cfg = load_config(None, env=env, overrides=overrides)
    assert cfg.model.dtype == "float16"
    assert cfg.model.layer == 3  # None = flag not given: the env value stands
    assert cfg.model.max_tokens_per_batch == 4096 and cfg.workers.devices == ["cpu"]
    assert cfg.logging.level == "debug" and cfg.inbox.polling is True
    assert cfg.paths.inbox == tmp_path / "in"


def test_unknown_names_are_named_with_suggestions(tmp_path: Path):
    path = write(tmp_path / "vnpd.toml", """
dtype = "float16"
[modle]
layer = 1
[model]
dtpye = "float16"
devices = ["cpu"]
[workers]
heartbeat_intervall_s = 1.0
""")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={"VNPD_MODEL_TRUNCATON": "5", "VNPD_WOKRERS_DEVICES": "cpu"},
                    overrides={"workers.hartbeat_timeout_s": 9})
    text = problems_of(excinfo)
    assert "unknown top-level key 'dtype'; did you mean model.dtype?" in text
    assert "unknown section 'modle'; did you mean [model]?" in text
    assert "unknown key model.dtpye; did you mean model.dtype?" in text
    assert "unknown key model.devices; did you mean workers.devices?" in text
    assert "unknown key workers.heartbeat_intervall_s; did you mean workers.heartbeat_interval_s?" in text
    assert "VNPD_MODEL_TRUNCATON: unknown setting model.truncaton; did you mean VNPD_MODEL_TRUNCATION?" in text
    assert "VNPD_WOKRERS_DEVICES: unknown config section 'wokrers'" in text
    assert "'workers.hartbeat_timeout_s': unknown setting; did you mean workers.heartbeat_timeout_s?" in text
    assert len(excinfo.value.problems) == 8


def test_type_errors_name_key_expected_and_got(tmp_path: Path):
    path = write(tmp_path / "vnpd.toml", """
[model]
layer = "last"
truncation = 1.5
[workers]
heartbeat_interval_s = "fast"
devices = [0, 1]
[inbox]
polling = "yes"
[paths]
inbox = 5
""")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={"VNPD_JOBS_MAX_ACTIVE_JOBS": "many", "VNPD_INBOX_SETTLE_S": "nan"})
    text = problems_of(excinfo)
    assert f"model.layer (from {path}): expected an integer, got str 'last'" in text
    assert "model.truncation" in text and "got float 1.5" in text
    assert "workers.heartbeat_interval_s" in text and "expected a finite number, got str 'fast'" in text
    assert "workers.devices" in text and "got list [0, 1]" in text
    assert "inbox.polling" in text and "expected a boolean" in text
    assert "paths.inbox" in text and "got int 5" in text
    assert "jobs.max_active_jobs (from VNPD_JOBS_MAX_ACTIVE_JOBS): expected an integer" in text
    assert "inbox.settle_s (from VNPD_INBOX_SETTLE_S): expected a finite number" in text
    assert len(excinfo.value.problems) == 8


def test_enum_errors():
    overrides = {"model.dtype": "fp16", "model.output_dtype": "bfloat16", "jobs.on_poison": "skip",
                 "inbox.after_done": "keep", "logging.format": "text", "logging.level": "loud"}
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, env={}, overrides=overrides)
    text = problems_of(excinfo)
    assert "model.dtype (from override model.dtype): 'fp16' is not one of float32, bfloat16, float16" in text
    assert "model.output_dtype (from override model.output_dtype): 'bfloat16' is not one of float32, float16" in text
    assert "'skip' is not one of quarantine, fail" in text
    assert "'keep' is not one of move, delete" in text
    assert "'text' is not one of json, console, auto" in text
    assert "'loud' is not one of debug, info, warning, error, critical" in text
    assert len(excinfo.value.problems) == 6


@pytest.mark.parametrize("overrides, fragment", [
    ({"model.truncation": 0}, "model.truncation (from override model.truncation): must be in 1..1022"),
    ({"model.truncation": 1023}, "must be in 1..1022"),
    ({"model.max_tokens_per_batch": -1}, "model.max_tokens_per_batch (from override "
                                         "model.max_tokens_per_batch): must be 0 or more"),
    ({"model.max_tokens_per_batch": 1000}, "cannot hold one sequence of truncation + 2 = 1024"),
    ({"workers.heartbeat_interval_s": 0}, "workers.heartbeat_interval_s (from override "
                                          "workers.heartbeat_interval_s): must be greater than 0"),
    ({"workers.heartbeat_timeout_s": 2}, "must be greater than heartbeat_interval_s (2.0)"),
    ({"workers.crash_budget": -1}, "workers.crash_budget"),
    ({"workers.batches_in_flight": 0}, "workers.batches_in_flight"),
    ({"workers.restart_backoff_max_s": 0.5}, "must be at least restart_backoff_s (1.0)"),
    ({"inbox.rescan_interval_s": 0}, "inbox.rescan_interval_s"),
    ({"jobs.max_active_jobs": 0}, "jobs.max_active_jobs"),
    ({"workers.devices": ["cuda:0", "cuda"]}, "cuda:0 is listed twice"),
    ({"workers.devices": ["gpu0"]}, "'gpu0' is not a device"),
    ({"workers.devices": []}, "the device list is empty"),
    ({"metrics.listen": "9464"}, "metrics.listen (from override metrics.listen): expected HOST:PORT"),
    ({"metrics.listen": "::1:9464"}, "metrics.listen (from override metrics.listen): put an IPv6 "
                                     "host in brackets"),
    ({"model.checkpoint": " "}, "model.checkpoint"),
    ({"ray.auto_device": "tpu"}, "ray.auto_device (from override ray.auto_device): 'tpu' is "
                                 "not one of gpu, cpu"),
    ({"ray.placement_timeout_s": -1}, "ray.placement_timeout_s (from override "
                                      "ray.placement_timeout_s): must be 0 or more"),
    ({"nucleotide.gene_workers": -1}, "nucleotide.gene_workers (from override "
                                      "nucleotide.gene_workers): must be 0 or more, got -1"),
    ({"jobs.index_processes": -2}, "jobs.index_processes (from override "
                                   "jobs.index_processes): must be 0 or more, got -2"),
    ({"nucleotide.six_frame_workers": -2}, "nucleotide.six_frame_workers (from override "
                                           "nucleotide.six_frame_workers): must be 0 or more, got -2"),
])
def test_range_errors(overrides: dict[str, object], fragment: str):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, env={}, overrides=overrides)
    assert fragment in problems_of(excinfo)


@pytest.mark.parametrize("listen, expected", [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("[::1]:9464", ("::1", 9464)),
    ("[::]:80", ("::", 80)),
    ("localhost:9464", ("localhost", 9464)),
    ("", None),  # the endpoint disabled
])
def test_parse_listen(listen: str, expected: tuple[str, int] | None) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9464", ":9464", "::1:9464", "host:", "host:x",
                                    "host:70000", "[]:9464"])
def test_parse_listen_rejects(listen: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(listen)


def test_config_and_metrics_agree_on_listen() -> None:
    """One parser: the config check refuses what the endpoint could not bind, and the
    endpoint binds exactly what the parser returns."""
    from vnpd.daemon.metrics import Metrics

    with pytest.raises(ConfigError, match="brackets"):
        load_config(None, env={"VNPD_METRICS_LISTEN": "::1:9464"})
    assert load_config(None, env={"VNPD_METRICS_LISTEN": ""}).metrics.listen == ""
    assert Metrics().start_server(parse_listen("")) is None
    metrics = Metrics()
    try:
        host, port = metrics.start_server(parse_listen("127.0.0.1:0"))
        assert host == "127.0.0.1" and port > 0
    finally:
        metrics.stop_server()


def test_engine_choices_default_to_auto_and_take_the_usual_order(tmp_path: Path):
    assert (Config().model.attention, Config().model.compile_mode) == ("auto", "auto")
    path = write(tmp_path / "vnpd.toml", '[model]\nattention = "cudnn"\ncompile_mode = "ops"\n')
    assert load_config(path, env={}).model.attention == "cudnn"
    cfg = load_config(path, env={"VNPD_MODEL_ATTENTION": "exact"},
                      overrides={"model.compile_mode": "layer"})
    assert (cfg.model.attention, cfg.model.compile_mode) == ("exact", "layer")


def test_old_engine_variables_are_aliases(tmp_path: Path):
    path = write(tmp_path / "vnpd.toml", '[model]\nattention = "cudnn"\n')
    cfg = load_config(path, env={"VNPD_ATTENTION": "torch_varlen",
                                 "VNPD_COMPILE_MODE": "fused-torch-gemm"})
    assert (cfg.model.attention, cfg.model.compile_mode) == ("torch_varlen", "fused-torch-gemm")
    # VNPD_COMPILE=0 turned compiling off whatever VNPD_COMPILE_MODE said; other values did not.
    env = {"VNPD_COMPILE": "0", "VNPD_COMPILE_MODE": "ops"}
    assert load_config(None, env=env).model.compile_mode == "off"
    assert load_config(None, env={"VNPD_COMPILE": "1"}).model.compile_mode == "auto"
    # The section's own name beats the alias; a flag beats both; "" is unset.
    env = {"VNPD_ATTENTION": "cudnn", "VNPD_MODEL_ATTENTION": "exact"}
    assert load_config(None, env=env).model.attention == "exact"
    assert load_config(None, env=env, overrides={"model.attention": "flash_attn"}
                       ).model.attention == "flash_attn"
    assert load_config(None, env={"VNPD_ATTENTION": ""}).model.attention == "auto"
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, env={"VNPD_ATTENTION": "fast"})
    assert "model.attention (from VNPD_ATTENTION): 'fast' is not one of auto, flash_attn" \
        in problems_of(excinfo)


def test_load_engine_choices_reads_only_its_two_keys():
    env = {"VNPD_ATTENTION": "exact", "VNPD_COMPILE": "0", "VNPD_WORKERS_DEVICES": "gpu9",
           "VNPD_MODEL_DTYPE": "nonsense"}  # not embed's business: not read, no error
    assert load_engine_choices(env) == ("exact", "off")
    assert load_engine_choices(env, attention="cudnn", compile_mode="ops") == ("cudnn", "ops")
    assert load_engine_choices({}) == ("auto", "auto")
    with pytest.raises(ConfigError, match="compile_mode"):
        load_engine_choices({"VNPD_MODEL_COMPILE_MODE": "fast"})


def test_accepted_edge_values():
    cfg = load_config(None, env={}, overrides={
        "model.truncation": 1, "model.max_tokens_per_batch": 3, "inbox.settle_s": 0,
        "workers.devices": ["cpu", "cpu", "cuda", "cuda:1"], "metrics.listen": "[::1]:0"})
    assert cfg.model.truncation == 1 and cfg.inbox.settle_s == 0.0
    assert cfg.workers.devices == ["cpu", "cpu", "cuda", "cuda:1"]  # kept as written


def test_invalid_toml_names_the_line(tmp_path: Path):
    path = write(tmp_path / "bad.toml", '[model]\ndtype = "float16"\nlayer = \n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    text = problems_of(excinfo)
    assert str(path) in text and "line 3" in text


def test_unreadable_file(tmp_path: Path):
    with pytest.raises(ConfigError) as excinfo:
        load_config(tmp_path / "missing.toml", env={})
    assert "cannot read config file" in problems_of(excinfo) and "missing.toml" in str(excinfo.value)


def test_relative_paths_resolve_against_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    conf_dir = tmp_path / "etc"
    path = write(conf_dir / "vnpd.toml", """
[paths]
inbox = "data/inbox"
outbox = "/abs/outbox"
[model]
checkpoint = "models/tiny.pt"
""")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path, env={"VNPD_PATHS_STATE": "st"}, overrides={"paths.failed": "f"})
    assert cfg.paths.inbox == conf_dir / "data" / "inbox"
    assert cfg.paths.outbox == Path("/abs/outbox")
    assert cfg.model.checkpoint == str(conf_dir / "models" / "tiny.pt")
    assert cfg.paths.state == elsewhere / "st"  # env and CLI are relative to the working dir
    assert cfg.paths.failed == elsewhere / "f"
    # a model name is not a path and stays as written
    assert load_config(path, env={"VNPD_MODEL_CHECKPOINT": "esm2_t6_8M_UR50D"}).model.checkpoint \
        == "esm2_t6_8M_UR50D"


def test_example_file_lists_every_key_with_its_default():
    data = tomllib.loads(EXAMPLE.read_text())
    assert set(data) == set(SCHEMA)
    for section, keys in SCHEMA.items():
        assert set(data[section]) == set(keys), f"[{section}] in config.example.toml drifted"
    cfg = load_config(EXAMPLE, env={})
    assert dataclasses.replace(cfg, source=None) == Config()


def test_config_and_preflight_never_import_torch():
    # "auto" with CUDA_VISIBLE_DEVICES="" counts the GPUs (nvidia-smi or /proc) and then
    # finds none visible: the whole GPU count runs, and ends in a ConfigError.
    code = ("import sys, vnpd.config as c, vnpd.daemon.preflight as p; c.load_config(None, env={}); "
            "p.resolve_devices(['cpu'])\n"
            "try: p.resolve_devices('auto', env={'PATH': '', 'CUDA_VISIBLE_DEVICES': ''})\n"
            "except c.ConfigError: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_layers_per_residue_and_long_sequences_keys(tmp_path: Path):
    from vnpd.config import config_warnings

    path = write(tmp_path / "vnpd.toml", '[model]\nlayers = [-1, 20]\n[output]\nper_residue = true\n')
    cfg = load_config(path, env={})
    assert cfg.model.resolved_layers() == [-1, 20] and cfg.output.per_residue
    assert load_config(None, env={}).model.resolved_layers() == [-1]
    assert load_config(None, env={"VNPD_MODEL_LAYER": "5"}).model.resolved_layers() == [5]
    assert load_config(None, env={"VNPD_MODEL_LAYERS": "-1,3"}).model.layers == [-1, 3]
    assert load_config(None, env={"VNPD_MODEL_LAYERS": "[0, 3]"}).model.layers == [0, 3]
    assert any("float16" in w for w in config_warnings(cfg))
    cfg16 = load_config(path, env={"VNPD_MODEL_OUTPUT_DTYPE": "float16"})
    assert config_warnings(cfg16) == []


@pytest.mark.parametrize("text, message", [
    ('[model]\nlayers = [-1, -1]\n', "listed twice"),
    ('[model]\nlayer = 3\nlayers = [-1, 20]\n', "disagree"),
    ('[model]\nlayers = ["last"]\n', "list of integers"),
    ('[model]\nlong_sequences = "slide"\n', "truncate, window"),
    ('[model]\ntruncation = 100\nwindow_stride = 101\n', "at most truncation"),
    ('[model]\nwindow_stride = -1\n', "0 or more"),
])
def test_layers_and_window_problems(tmp_path: Path, text: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path / "vnpd.toml", text), env={})


def test_window_mode_is_accepted_and_its_stride_resolved(tmp_path: Path):
    from vnpd.daemon.window_rows import configured_stride

    cfg = load_config(write(tmp_path / "vnpd.toml",
                            '[model]\nlong_sequences = "window"\ntruncation = 100\n'), env={})
    assert cfg.model.long_sequences == "window" and configured_stride(cfg.model) == 50
    cfg = load_config(None, env={"VNPD_MODEL_LONG_SEQUENCES": "window",
                                 "VNPD_MODEL_WINDOW_STRIDE": "7"})
    assert configured_stride(cfg.model) == 7
    assert configured_stride(load_config(None, env={}).model) is None
