"""What the Ray pool asks of the cluster itself (connect, count its GPUs or CPUs, is an
actor placed, is a node alive, why an actor died), and :class:`ActorSlot`, the pool's
record of one slot and where its actor runs.

Separate from :mod:`vnpd.workers.ray_pool` (the slots and their batches) so that each
reads on its own. Ray is imported inside the functions: importing this module costs
nothing, and the local backend never imports it.

Example::

    owned = connect_ray("", cpus=2, gpus=0)   # a local Ray of the daemon's own
    cluster_units("GPU")                      # (0, 0): total and free
    actor_placed(slot.actor)                  # False while it waits for a node
    node_alive(node_id)                       # False once the GCS marks it dead
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:  # annotations only
    from vnpd.workers.pool import Dispatch
    from vnpd.workers.protocol import WorkerSpec

log = structlog.get_logger()


def connect_ray(address: str, *, cpus: int | None, gpus: int | None) -> bool:
    """Connect this process to Ray as its driver; returns whether the daemon owns it.

    ``address`` "" starts a local Ray sized ``cpus``/``gpus`` (None: what Ray detects
    here) with ``address="local"``, so that a cluster running here is never joined by
    mistake; ``ray.shutdown()`` stops it.
    Anything else ("auto", "HOST:PORT", "ray://HOST:PORT") joins a running cluster.
    Raises ``ConnectionError`` (or Ray's own error) when there is none to join.
    """
    import ray

    options: dict[str, Any] = {"namespace": "vnpd", "log_to_driver": False}
    owned = address == ""
    if owned:
        options.update(address="local", include_dashboard=False)
        if cpus is not None:
            options["num_cpus"] = max(1, cpus)
        if gpus:
            options["num_gpus"] = gpus
    else:
        options["address"] = address
    previous = signal.getsignal(signal.SIGTERM)  # ray.init replaces the loop's handler
    try:
        context = ray.init(**options)
    except Exception as exc:
        log.error("ray_connect_failed", address=address or "local", error=str(exc),
                  hint='address = "auto" joins a cluster started with `ray start --head` '
                       'on this host; "" starts a Ray of the daemon\'s own')
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    log.info("ray_connected", address=address or "local", owned=owned,
             gcs=getattr(context, "address_info", {}).get("gcs_address"),
             resources=ray.cluster_resources())
    return owned


def cluster_units(resource: str) -> tuple[int, int]:
    """(total, free) whole units of ``resource`` ("GPU", "CPU") in the cluster now, over
    alive nodes only; free = not held by any actor or task."""
    import ray

    return (int(ray.cluster_resources().get(resource, 0)),
            int(ray.available_resources().get(resource, 0)))


def actor_placed(actor: Any) -> bool | None:
    """Whether Ray has given ``actor`` a process on some node yet: False while it waits
    for a node with the resources it asked for, True once it is loading, alive or dead;
    None when the GCS cannot say (Ray Client connections do not reach it)."""
    info = _actor_info(actor)
    if info is None:
        return None
    return not (info.get("State") in ("DEPENDENCIES_UNREADY", "PENDING_CREATION")
                and not info.get("Pid"))


def actor_node(actor: Any) -> str | None:
    """The node id where ``actor`` runs or ran (dead actors keep it); None if unknown."""
    info = _actor_info(actor)
    node = ((info or {}).get("Address") or {}).get("NodeID")
    return node if node and node.strip("f") else None


def _actor_info(actor: Any) -> dict[str, Any] | None:
    """The GCS actor table's row of ``actor``. Ray's public state API needs the
    dashboard, which a daemon-owned Ray does not start, so this reads the table."""
    from ray._private.state import actors

    try:
        info = actors(actor_id=actor._actor_id.hex())
    except Exception:
        return None
    return info or None


def node_alive(node_id: str) -> bool:
    """Whether the GCS still counts ``node_id`` alive; False when the GCS cannot say."""
    import ray

    try:
        return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())
    except Exception:  # the GCS itself is unreachable: the node is as good as lost
        return False


def death_reason(slot: ActorSlot, exc: BaseException | None) -> str:
    if getattr(exc, "actor_init_failed", False):
        return "load_failed"
    # Ray's messages mention nodes for plain crashes too ("node deaths by resource
    # contention"): ask the GCS whether the actor's node is still alive. An actor that
    # died loading the model has not told us its node yet: the GCS knows it.
    node = slot.node_id or (actor_node(slot.actor) if slot.actor is not None else None)
    if node is not None and not node_alive(node):
        return "node_lost"
    return "crash"


def for_ray(spec: WorkerSpec) -> WorkerSpec:
    """A spec as the daemon builds it for a local worker, made right for an actor: Ray
    sets a GPU actor's CUDA_VISIBLE_DEVICES itself; a CPU actor sees no GPU."""
    return dataclasses.replace(spec, env={"CUDA_VISIBLE_DEVICES": ""}
                               if spec.device == "cpu" else {})


@dataclass
class ActorSlot:
    """The pool's view of one slot; it survives the actors that fill it."""

    spec: WorkerSpec
    credit: int
    # starting | ready | stopping | stopped | dead | degraded | waiting (for room: no actor)
    state: str = "stopped"
    actor: Any = None
    generation: int = 0
    pid: int | None = None
    node_id: str | None = None
    node_ip: str | None = None
    gpu: list[str] = field(default_factory=list)
    started_at: float = 0.0
    last_heartbeat: float = 0.0
    ping_pending: bool = False
    batches_done: int = 0
    max_tokens: int = 0
    attention_backend: str = ""
    inflight: dict[int, Dispatch] = field(default_factory=dict)
    busy_batch: int | None = None
    busy_since: float | None = None  # this host's monotonic clock
    crashes: deque[float] = field(default_factory=deque)
    restarts: int = 0
    next_start_at: float = 0.0
    kill_reason: str | None = None

    @property
    def device(self) -> str:
        return self.spec.device

    def describe(self) -> dict[str, Any]:
        age = time.monotonic() - self.last_heartbeat if self.last_heartbeat else None
        return {"worker": self.spec.worker_id, "device": self.device, "pid": self.pid,
                "node": self.node_ip, "node_id": self.node_id,
                "gpu": ",".join(self.gpu) if self.gpu else None, "state": self.state,
                "last_heartbeat_age_s": round(age, 1) if age is not None else None,
                "batches_done": self.batches_done, "inflight": len(self.inflight),
                "restarts": self.restarts, "max_tokens": self.max_tokens,
                "attention_backend": self.attention_backend}
