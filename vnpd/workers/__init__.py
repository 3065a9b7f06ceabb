"""Worker pools: where batches run, behind one WorkerPool interface.

:func:`make_pool` picks the implementation by ``[workers] backend``: ``local.py``
(processes on this host, over pipes) or ``ray_pool.py`` (actors on a Ray cluster,
imported only when chosen, so the local backend never imports Ray).
"""

from __future__ import annotations

from typing import Any

from vnpd.config import Config
from vnpd.workers.pool import WorkerPool
from vnpd.workers.protocol import WorkerSpec


def make_pool(cfg: Config, specs: list[WorkerSpec], metrics: Any = None) -> WorkerPool:
    """The pool of ``cfg.workers.backend`` with one slot per spec (ray: a spec with device
    "auto" stands for every GPU of the cluster)."""
    w = cfg.workers
    options = dict(heartbeat_timeout_s=w.heartbeat_timeout_s,
                   batch_deadline_base_s=w.batch_deadline_base_s,
                   batch_deadline_per_1k_tokens_s=w.batch_deadline_per_1k_tokens_s,
                   restart_backoff_s=w.restart_backoff_s,
                   restart_backoff_max_s=w.restart_backoff_max_s,
                   crash_budget=w.crash_budget, crash_window_s=w.crash_window_s,
                   degraded_retry_s=w.degraded_retry_s, credit=w.batches_in_flight + 1,
                   metrics=metrics)
    if w.backend == "ray":
        from vnpd.workers.ray_pool import RayPool

        return RayPool(specs, address=cfg.ray.address, **options)
    from vnpd.workers.local import LocalPool

    return LocalPool(specs, **options)
