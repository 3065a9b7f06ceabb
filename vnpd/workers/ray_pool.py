"""The Ray worker pool: one actor per slot, on the GPUs (or CPUs) of a Ray cluster.

Chosen by ``[workers] backend = "ray"`` (docs/CLUSTER.md). The daemon stays the one owner
of the inbox, the journal and the outbox; only batches and result rows cross the cluster.
Each slot holds an :class:`~vnpd.workers.ray_actor.EngineActor` (``num_gpus=1``, or
``num_cpus=1`` for a "cpu" slot), which wraps the same engine as the local worker.

Everything runs on the daemon's event loop: a call to an actor returns an ``ObjectRef``
whose future, when it settles (in a Ray thread), hands the reply to the loop with
``call_soon_threadsafe``. Each reply carries the slot's *generation*: a reply from an
actor already replaced is dropped, so a batch has exactly one outcome.

The same guarantees as :class:`~vnpd.workers.local.LocalPool`, split the same way:

- dispatch is pull-based, with credit per slot (``batches_in_flight + 1``);
- an actor that dies (its process, or its node) takes its batches with it: they come back
  as :class:`BatchesLost` ("crash" or "node_lost"), and the slot restarts with backoff
  within a crash budget, or is marked degraded;
- ``murder_workers``: heartbeat silence ("heartbeat") and a batch past its deadline
  ("hang", base + per-1k-tokens, as the local pool) kill the actor with ``ray.kill``;
- an OOM lowers the slot's budget; a sticky CUDA error makes the actor exit;
- the slots follow the cluster (:mod:`vnpd.workers.ray_scaling`): a lost node is not a
  crash; "auto" retires the slots of units that left and adds slots for units that
  joined; a device list parks a slot that no node can take, with no actor pending.

``[ray] address``: "" starts a local Ray sized from the devices, shut down on
:meth:`RayPool.stop` (no process left behind); anything else joins a running cluster,
which is left running. Ray is imported here only, and only when this pool is chosen.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import Future
from typing import Any, Callable

import structlog

from vnpd.workers.pool import (BatchDone, BatchesLost, BatchFailed, BatchSource, ModelInfo, WorkerPool)
from vnpd.workers.restarts import Supervision
from vnpd.workers.protocol import ErrorMsg, HeartbeatMsg, ResultMsg, WorkerSpec
from vnpd.workers.ray_cluster import (ActorSlot, actor_placed, cluster_units, connect_ray,
                                      death_reason, for_ray)
from vnpd.workers.ray_scaling import plan_scaling

log = structlog.get_logger()

START_TIMEOUT_S = 900.0      # as LocalPool: a cold 3B load takes minutes
SCALE_CHECK_INTERVAL_S = 5.0  # how often the slots are compared with the cluster


class RayPool(WorkerPool):
    """Actors on a Ray cluster, one per slot; see the module doc.

    ``specs`` as for the local pool; one spec with device "auto" stands for one slot per
    GPU of the cluster (``auto_device`` "cpu": per CPU), and the slots follow the cluster
    as it grows and shrinks (:mod:`vnpd.workers.ray_scaling`). An explicit list keeps
    its slots; one whose actor cannot be placed within ``placement_timeout_s`` waits,
    with no actor pending, until the cluster has room for it.
    """

    def __init__(self, specs: list[WorkerSpec], supervision: Supervision, *, address: str,
                 actor: type, credit: int = 3, metrics: Any = None,
                 auto_device: str = "gpu", placement_timeout_s: float = 60.0) -> None:
        """``actor``: the class each slot places (``vnpd.workers.ray_actor.EngineActor``),
        handed in by the daemon, so that this module never loads the engine."""
        super().__init__(supervision, metrics)
        self._actor_type = actor
        self.auto = [s for s in specs if s.device == "auto"]
        self.credit = credit
        self.slots = [ActorSlot(for_ray(s), credit) for s in specs if s.device != "auto"]
        self.address = address
        self.auto_device = auto_device
        self.placement_timeout_s = placement_timeout_s
        self._next_worker_id = len(self.slots)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.owns_ray = False
        self._actor_class: Any = None
        self._last_scale_check = 0.0
        self._no_gpus_logged = False

    # Lifecycle ----------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        import ray

        self.loop = loop
        # A Ray of our own: one CPU per actor and a GPU per GPU slot, or for "auto",
        # whatever Ray finds on this host.
        gpus = sum(1 for s in self.slots if s.spec.device != "cpu")
        self.owns_ray = connect_ray(self.address, cpus=None if self.auto else len(self.slots),
                                    gpus=None if self.auto else gpus)
        self._actor_class = ray.remote(self._actor_type)
        for slot in self.slots:
            self._spawn(slot)
        self._last_scale_check = time.monotonic()
        self._follow_cluster()  # "auto": a slot per unit in the cluster

    async def stop(self, timeout_s: float) -> None:
        """Let actors finish what they hold, then kill them; stop the Ray we started."""
        import ray

        for slot in self.slots:
            if slot.state in ("ready", "starting"):
                slot.state = "stopping"
        deadline = time.monotonic() + timeout_s
        last_ping = 0.0
        while time.monotonic() < deadline and any(s.inflight for s in self.slots):
            if time.monotonic() - last_ping > 1.0:  # an actor that hangs will not drain
                self.ping_workers()
                last_ping = time.monotonic()
            self.murder_workers()
            await asyncio.sleep(0.05)
        lost = [d for s in self.slots for d in s.inflight.values()]
        for slot in self.slots:
            slot.inflight.clear()
            self._retire(slot)
            slot.state = "stopped"
        if lost:
            self._report(BatchesLost(lost, "shutdown"))
        # Disconnects from a cluster we joined; stops every process of the one we started.
        await asyncio.to_thread(ray.shutdown)
        log.info("ray_stopped", owned=self.owns_ray)

    def all_ready(self) -> bool:
        return all(s.state in ("ready", "degraded", "waiting") for s in self.slots) and \
            any(s.state == "ready" for s in self.slots)

    def all_degraded(self) -> bool:
        # "auto" on a cluster with no GPU yet waits for one (an autoscaler may add it).
        return bool(self.slots) and all(s.state == "degraded" for s in self.slots)

    def healthy(self, fresh_s: float) -> bool:
        if not self.slots:
            return True  # waiting for the cluster's first GPU is not a hang
        now = time.monotonic()
        return any((s.state == "ready" and now - s.last_heartbeat < fresh_s)
                   or (s.state == "starting" and now - s.started_at < START_TIMEOUT_S)
                   or s.state in ("dead", "waiting")  # waiting for the cluster: not a hang
                   for s in self.slots)

    # Actors -------------------------------------------------------------------------
    def _spawn(self, slot: ActorSlot) -> None:
        gpu = slot.spec.device != "cpu"
        slot.generation += 1
        slot.actor = self._actor_class.options(
            num_cpus=1, num_gpus=1 if gpu else 0, max_restarts=0, max_task_retries=0,
            scheduling_strategy="SPREAD").remote(slot.spec)
        slot.state, slot.started_at = "starting", time.monotonic()
        slot.last_heartbeat = time.monotonic()
        slot.kill_reason = slot.pid = slot.node_id = slot.node_ip = None
        slot.busy_batch = slot.busy_since = None
        slot.ping_pending = False
        self._watch(slot, slot.actor.ready.remote(), self._on_ready)
        log.info("worker_started", worker=slot.spec.worker_id, device=slot.device,
                 generation=slot.generation)

    def _watch(self, slot: ActorSlot, ref: Any, handler: Callable[..., None],
               *args: Any) -> None:
        """Call ``handler(slot, future, *args)`` on the loop once ``ref`` settles, unless
        the slot has moved on to another actor by then."""
        generation = slot.generation
        loop = self.loop
        assert loop is not None

        def settled(future: Future) -> None:
            try:
                loop.call_soon_threadsafe(self._settle, slot, generation, handler, future, args)
            except RuntimeError:
                pass  # the loop is closed: the daemon has exited

        ref.future().add_done_callback(settled)

    def _settle(self, slot: ActorSlot, generation: int, handler: Callable[..., None],
                future: Future, args: tuple[Any, ...]) -> None:
        if generation == slot.generation and slot.actor is not None:
            handler(slot, future, *args)

    def _on_ready(self, slot: ActorSlot, future: Future) -> None:
        try:
            ready, placement = future.result()
        except Exception as exc:
            self._actor_lost(slot, exc)
            return
        slot.pid, slot.max_tokens = ready.pid, ready.max_tokens
        slot.attention_backend = ready.attention_backend
        slot.node_id, slot.node_ip, slot.gpu = (placement["node_id"], placement["node_ip"],
                                                placement["gpu"])
        slot.last_heartbeat = time.monotonic()
        if slot.state == "starting":
            slot.state = "ready"
        log.info("worker_ready", worker=slot.spec.worker_id, device=slot.device, pid=ready.pid,
                 node=slot.node_ip, node_id=slot.node_id, gpu=slot.gpu,
                 load_seconds=round(ready.load_seconds, 2), max_tokens=ready.max_tokens,
                 attention=ready.attention_backend)
        self._model_ready(ModelInfo(ready.embed_dim, ready.layer, ready.attention_backend,
                                    min(s.max_tokens for s in self.slots if s.max_tokens),
                                    ready.layers))
        self.changed.set()

    def _on_reply(self, slot: ActorSlot, future: Future, batch_id: int) -> None:
        try:
            msg = future.result()
        except Exception as exc:  # the actor died, or its reply cannot be fetched
            self._actor_lost(slot, exc)
            return
        slot.last_heartbeat = time.monotonic()
        dispatch = slot.inflight.pop(batch_id, None)
        if dispatch is None:
            return
        if isinstance(msg, ResultMsg):
            slot.batches_done += 1
            self._report(BatchDone(dispatch, msg.embeddings, slot.device,
                                   msg.finished - msg.started, msg.residues,
                                   msg.residue_counts))
            if self.metrics is not None:
                self.metrics.batch_latency_seconds.labels(device=slot.device).observe(
                    msg.finished - msg.started)
                self.metrics.busy_interval(slot.device, msg.started, msg.finished)
        elif isinstance(msg, ErrorMsg):
            log.warning("worker_error", worker=slot.spec.worker_id, device=slot.device,
                        kind=msg.kind, batch=batch_id, error=msg.message)
            if msg.kind == "oom":
                # Lower this slot's budget below the batch that did not fit.
                slot.max_tokens = max(1024, min(slot.max_tokens, dispatch.tokens) // 2)
            self._report(BatchFailed(dispatch, msg.kind, msg.message))
            if msg.kind == "fatal":  # the actor exits by itself; make sure of it
                self.kill(slot, "sticky_error")
        self.changed.set()

    def _on_heartbeat(self, slot: ActorSlot, future: Future) -> None:
        slot.ping_pending = False
        try:
            msg: HeartbeatMsg = future.result()
        except Exception as exc:
            self._actor_lost(slot, exc)
            return
        now = time.monotonic()
        slot.last_heartbeat = now
        slot.batches_done = max(slot.batches_done, msg.batches_done)
        slot.busy_batch = msg.busy_batch
        # The actor's clock may be another host's: carry over the age, not the time.
        slot.busy_since = (now - max(0.0, msg.sent - msg.busy_since)
                           if msg.busy_since is not None else None)

    def _actor_lost(self, slot: ActorSlot, exc: BaseException | None = None) -> None:
        """The slot's actor is gone (or given up on): requeue its batches, restart it."""
        reason = slot.kill_reason or death_reason(slot, exc)
        lost = list(slot.inflight.values())
        slot.inflight.clear()
        self._retire(slot)
        if slot.state == "stopping":
            slot.state = "stopped"
            if lost:
                self._report(BatchesLost(lost, "shutdown"))
            return
        log.error("worker_died", worker=slot.spec.worker_id, device=slot.device, pid=slot.pid,
                  node=slot.node_ip, reason=reason, lost_batches=len(lost),
                  error=str(exc).splitlines()[0] if exc else None)
        if self.metrics is not None:
            self.metrics.worker_restarts_total.labels(device=slot.device, reason=reason).inc()
        if lost:
            self._report(BatchesLost(lost, reason))
        if reason == "node_lost":
            # Not the slot's fault, so not a crash: a new actor at once, unless the check
            # that this forces finds the cluster too small for the slot now.
            slot.state, slot.next_start_at = "dead", time.monotonic()
            self._last_scale_check = 0.0
        else:
            self._schedule_restart(slot)
        self.changed.set()

    def _retire(self, slot: ActorSlot) -> None:
        """Forget the slot's actor (its late replies are dropped) and kill it."""
        import ray

        actor, slot.actor = slot.actor, None
        slot.generation += 1
        if actor is not None:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead, or its node is gone
                pass

    # Dispatch -----------------------------------------------------------------------
    def dispatch(self, source: BatchSource) -> int:
        """Hand out batches to every ready actor with free credit; returns how many."""
        return self._fill_slots(self.slots, source, lambda slot, dispatch: self._watch(
            slot, slot.actor.embed.remote(dispatch.batch_id, dispatch.batch), self._on_reply,
            dispatch.batch_id))

    # Health -------------------------------------------------------------------------
    def check_workers(self) -> None:
        """Periodic: kill the unresponsive, restart or degrade, follow the cluster."""
        self.murder_workers()
        self.manage_workers()

    def ping_workers(self) -> None:
        for slot in self.slots:
            if slot.state in ("ready", "stopping") and slot.actor is not None \
                    and not slot.ping_pending:
                slot.ping_pending = True
                self._watch(slot, slot.actor.heartbeat.remote(), self._on_heartbeat)

    def murder_workers(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.actor is None or slot.kill_reason is not None:
                continue
            reason = None
            if slot.state == "starting" and now - slot.started_at > START_TIMEOUT_S:
                reason = "start_timeout"
            elif slot.state in ("ready", "stopping") and \
                    now - slot.last_heartbeat > self.supervision.heartbeat_timeout_s:
                reason = "heartbeat"
            elif slot.state in ("ready", "stopping") and slot.busy_since is not None:
                d = slot.inflight.get(slot.busy_batch)  # type: ignore[arg-type]
                if d is not None and now - slot.busy_since > self.batch_deadline(d.tokens):
                    reason = "hang"
            if reason is not None:
                self.kill(slot, reason)

    def kill(self, slot: ActorSlot, reason: str) -> None:
        """``ray.kill`` the actor now; its batches are requeued at once."""
        log.warning("worker_kill", worker=slot.spec.worker_id, device=slot.device,
                    pid=slot.pid, node=slot.node_ip, reason=reason)
        slot.kill_reason = reason
        self._actor_lost(slot)

    def manage_workers(self) -> None:
        now = time.monotonic()
        if now - self._last_scale_check > SCALE_CHECK_INTERVAL_S:
            self._last_scale_check = now
            self._follow_cluster()
        super().manage_workers()

    def _follow_cluster(self) -> None:
        """Fit the slots to the cluster: retire, park, resume or add slots as
        :func:`~vnpd.workers.ray_scaling.plan_scaling` decides, and start new actors."""
        resource = "GPU" if self.auto and self.auto_device == "gpu" else "CPU"
        try:
            total, free = cluster_units(resource)
        except Exception as exc:  # the GCS is unreachable: try again at the next check
            log.warning("ray_cluster_unknown", error=str(exc))
            return
        if self.auto and total == 0 and not self.slots and not self._no_gpus_logged:
            self._no_gpus_logged = True
            log.warning("ray_no_gpus", address=self.address, resource=resource,
                        hint='devices = "auto" waits for GPUs to join the cluster; for CPU '
                             'actors set devices = ["cpu", ...]')
        plan = plan_scaling(self.slots, elastic=bool(self.auto), total=total, free=free,
                            now=time.monotonic(), placement_timeout_s=self.placement_timeout_s,
                            placed=lambda slot: actor_placed(slot.actor))
        for slot, reason in plan.retire:
            self._retire_slot(slot, reason, total)
        for slot in plan.wait:
            log.warning("ray_slot_waiting", worker=slot.spec.worker_id, device=slot.device,
                        pending_s=round(time.monotonic() - slot.started_at, 1),
                        cluster=resource, total=total, free=free)
            self._retire(slot)
            slot.state = "waiting"
        for slot in plan.resume:
            log.info("ray_slot_resumed", worker=slot.spec.worker_id, device=slot.device)
            self._spawn(slot)
        for _ in range(plan.add):
            slot = ActorSlot(self._auto_spec(), self.credit)
            self.slots.append(slot)
            log.info("ray_slot_added", worker=slot.spec.worker_id, device=slot.device,
                     cluster=resource, total=total, slots=len(self.slots))
            self._spawn(slot)

    def _auto_spec(self) -> WorkerSpec:
        """The spec of a new elastic slot: a GPU actor (Ray sets its GPU), or a CPU actor
        with the one CPU thread that it holds."""
        i, self._next_worker_id = self._next_worker_id, self._next_worker_id + 1
        if self.auto_device == "cpu":
            return for_ray(dataclasses.replace(self.auto[0], worker_id=i, device="cpu",
                                               threads=1))
        return dataclasses.replace(self.auto[0], worker_id=i, device=f"gpu{i}", env={})

    def _retire_slot(self, slot: ActorSlot, reason: str, total: int) -> None:
        """Take ``slot`` out of the pool for good (the cluster has no room for it); what
        it held, if anything, is requeued. Not a crash."""
        lost = list(slot.inflight.values())
        slot.inflight.clear()
        self._retire(slot)
        slot.state = "stopped"
        self.slots.remove(slot)
        log.warning("ray_slot_retired", worker=slot.spec.worker_id, device=slot.device,
                    reason=reason, node=slot.node_ip, requeued=len(lost), cluster_total=total,
                    slots=len(self.slots))
        if lost:
            self._report(BatchesLost(lost, reason))
        self.changed.set()

    def _slots(self) -> list[ActorSlot]:
        return self.slots
