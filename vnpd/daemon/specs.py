"""The worker specs the daemon starts its pool with: one per configured device.

Example::

    specs = worker_specs(cfg, ["cuda:0", "cuda:1"], FaultPlan())
    specs[1].env                       # {"CUDA_VISIBLE_DEVICES": "1"}
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from vnpd.faults import FaultPlan
from vnpd.workers.protocol import WorkerSpec

if TYPE_CHECKING:  # annotations only: the daemon hands in the loaded configuration
    from vnpd.config import Config


def worker_specs(cfg: Config, devices: list[str], faults: FaultPlan) -> list[WorkerSpec]:
    """One spawn spec per device: what each worker loads, how, and which GPU it sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible_list = visible.split(",") if visible else None
    cpu_workers = sum(1 for d in devices if d == "cpu")
    threads = max(1, (os.cpu_count() or 1) // max(1, cpu_workers)) if cpu_workers else 0
    specs = []
    for i, device in enumerate(devices):
        if device == "cpu":
            env = {"CUDA_VISIBLE_DEVICES": ""}
        elif device == "auto":  # Ray places the actor on a GPU and sets it itself
            env = {}
        else:
            n = int(device.split(":")[1])
            env = {"CUDA_VISIBLE_DEVICES": visible_list[n] if visible_list else str(n)}
        specs.append(WorkerSpec(
            worker_id=i, device=device, checkpoint=cfg.model.checkpoint, dtype=cfg.model.dtype,
            layer=cfg.model.layer, layers=tuple(cfg.model.resolved_layers()),
            residues=cfg.model.output_dtype if cfg.output.per_residue else None,
            truncation=cfg.model.truncation,
            max_tokens=cfg.model.max_tokens_per_batch,
            heartbeat_interval_s=cfg.workers.heartbeat_interval_s,
            log_format=cfg.logging.format, log_level=cfg.logging.level,
            threads=threads if device == "cpu" else 0, env=env,
            attention=_option(cfg.model, "attention"),
            compile_mode=_option(cfg.model, "compile_mode"), faults=faults.worker,
            simulate_dim=faults.simulate_dim))
    return specs


def _option(section: object, name: str) -> str | None:
    """A model option for the engine, None for its default ("auto", or not configured)."""
    value = getattr(section, name, None)
    return None if value in (None, "", "auto") else str(value)
