"""The configuration's shape: sections as dataclasses, their defaults, and the allowed values.

Nothing here reads anything; ``vnpd.config.loading`` fills these from the file, the
environment and the CLI, and ``vnpd.config.checks`` checks the values.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

# Torch-free: the names the engine accepts and the alphabet's limit, defined once there.
from vnpd.compute.choices import (ATTENTION_BACKENDS, AUTO, COMPILE_MODES, COMPILE_OFF,
                                  COMPUTE_DTYPES, OUTPUT_DTYPES)
from vnpd.compute.tokenizer import FAIR_ESM_TRUNCATION

EX_CONFIG = 78  # sysexits.h: configuration error; every command exits with it

ON_POISON = ("quarantine", "fail")
AFTER_DONE = ("move", "delete")
LOG_FORMATS = ("json", "console", "auto")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
BACKENDS = ("local", "ray")  # workers.backend: processes on this host | a Ray cluster
RAY_AUTO_DEVICES = ("gpu", "cpu")  # ray.auto_device: what devices = "auto" counts
ENV_PREFIX = "VNPD_"
# Variables the engine read itself before these were config keys; still honoured, with the
# priority of the environment, below VNPD_MODEL_ATTENTION / VNPD_MODEL_COMPILE_MODE.
LEGACY_ENV = {"VNPD_ATTENTION": "model.attention", "VNPD_COMPILE_MODE": "model.compile_mode"}
LEGACY_COMPILE_SWITCH = "VNPD_COMPILE"  # "0" = model.compile_mode "off"; any other value: no-op


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
    truncation: int = FAIR_ESM_TRUNCATION
    max_tokens_per_batch: int = 0  # 0 = size from device memory
    attention: str = AUTO  # "auto" (first available) or a backend name to force
    compile_mode: str = AUTO  # "auto" (fused on CUDA, eager on CPU), "off" or a mode
    layers: list[int] = field(default_factory=list)  # several layers, one pass; [] = [layer]
    long_sequences: str = "truncate"  # "truncate" (extract.py) | "window"
    window_stride: int = 0  # window: residues between window starts; 0 = truncation // 2

    def resolved_layers(self) -> list[int]:
        """The layers to compute, as configured (fair-esm numbering, not yet resolved
        against a model): ``layers`` if given, else ``[layer]``."""
        return list(self.layers) if self.layers else [self.layer]


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
    address) or "ray://HOST:10001" (Ray Client) = join that cluster. ``auto_device`` and
    ``placement_timeout_s``: how the slots follow the cluster (docs/CLUSTER.md).
    """

    address: str = "auto"
    # What workers.devices = "auto" counts in the cluster: one GPU actor per GPU, or
    # (CPU-only clusters, tests, the demo) one one-thread CPU actor per CPU.
    auto_device: str = "gpu"
    # An actor not placed on a node within this time is given up (0 = wait for ever).
    placement_timeout_s: float = 60.0


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
    index_processes: int = 4  # new files indexed side by side in this many processes; 0 = a thread
    head_start: str = "auto"  # idle devices compute a new file's first proteins while it is
    # indexed: "on" | "off" | "auto" (on when every worker device is a GPU)


@dataclass
class MetricsConfig:
    """Prometheus endpoint as HOST:PORT; "" disables it."""

    listen: str = "127.0.0.1:9464"


@dataclass
class LoggingConfig:
    """Log renderer (json | console | auto = console on a TTY, else json) and level."""

    format: str = "auto"
    level: str = "info"


INPUT_KINDS = ("protein", "nucleotide")
NUCLEOTIDE_PROTEINS = ("six_frame", "genes")


@dataclass
class InputConfig:
    """What the inbox's files hold: protein FASTA, or nucleotide FASTA made into proteins.
    One daemon serves one kind (docs/INPUT.md, "Nucleotide input")."""

    kind: str = "protein"  # "protein" | "nucleotide"


@dataclass
class NucleotideConfig:
    """How ``[input] kind = "nucleotide"`` files become proteins (docs/INPUT.md)."""

    proteins: str = "six_frame"  # "six_frame" (VirNucPro) | "genes" (pyrodigal-gv)
    chunk_length: int = 300  # six_frame: bp per chunk; VirNucPro's models use 300 or 500
    gene_workers: int = 0  # genes: threads calling genes per file; 0 = one per core (at most 32)
    six_frame_workers: int = 0  # six_frame: processes translating per file; 0 = one per core (at most 32)


@dataclass
class OutputConfig:
    """What the output files hold besides one mean row per sequence (docs/OUTPUT.md)."""

    per_residue: bool = False  # also every residue's rows: residues + residue_offsets


@dataclass
class CacheConfig:
    """The embedding cache: identical sequences computed once, across jobs and restarts
    (docs/DAEMON.md, "Compute once"). ``path`` "" = ``<state>/cache``."""

    enabled: bool = True
    max_gb: float = 50.0
    path: str = ""


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
    input: InputConfig = field(default_factory=InputConfig)
    nucleotide: NucleotideConfig = field(default_factory=NucleotideConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    source: Path | None = None


_CONFIG_HINTS = typing.get_type_hints(Config)
SECTIONS: dict[str, type] = {f.name: _CONFIG_HINTS[f.name] for f in dataclasses.fields(Config)
                             if f.name != "source"}
# section -> key -> type hint (int, float, bool, str, Path, or list[str] | str for devices)
SCHEMA: dict[str, dict[str, object]] = {
    name: typing.get_type_hints(cls) for name, cls in SECTIONS.items()}

ENUMS: dict[str, tuple[str, ...]] = {
    "model.dtype": COMPUTE_DTYPES, "model.output_dtype": OUTPUT_DTYPES,
    "model.attention": (AUTO, *ATTENTION_BACKENDS),
    "model.compile_mode": (AUTO, COMPILE_OFF, *COMPILE_MODES), "jobs.on_poison": ON_POISON,
    "jobs.head_start": (AUTO, "on", "off"),
    "inbox.after_done": AFTER_DONE, "logging.format": LOG_FORMATS, "logging.level": LOG_LEVELS,
    "input.kind": INPUT_KINDS, "nucleotide.proteins": NUCLEOTIDE_PROTEINS,
    "model.long_sequences": ("truncate", "window"),  # as vnpd.compute.windows (no torch here)
    "workers.backend": BACKENDS, "ray.auto_device": RAY_AUTO_DEVICES}
POSITIVE = (
    "workers.heartbeat_interval_s", "workers.heartbeat_timeout_s", "workers.batches_in_flight",
    "workers.restart_backoff_s", "workers.restart_backoff_max_s",
    "workers.batch_deadline_base_s", "workers.crash_budget", "workers.crash_window_s",
    "workers.degraded_retry_s", "inbox.rescan_interval_s", "jobs.max_active_jobs",
    "jobs.publish_retry_max_s", "cache.max_gb")
NON_NEGATIVE = ("model.max_tokens_per_batch", "workers.batch_deadline_per_1k_tokens_s",
                "inbox.settle_s", "model.window_stride", "ray.placement_timeout_s",
                "nucleotide.gene_workers", "nucleotide.six_frame_workers", "jobs.index_processes")
