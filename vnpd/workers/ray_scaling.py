"""How the Ray pool's slots follow the cluster: a pure decision over the slots and what the
cluster reports, which :class:`~vnpd.workers.ray_pool.RayPool` then carries out.

- An actor that Ray has not placed on any node within ``placement_timeout_s`` cannot be
  placed now. An elastic slot (``devices = "auto"``) holding it is retired: the cluster
  is smaller than the pool. A fixed slot (an explicit device list) keeps its place in
  the pool but gives the actor up and *waits*, with no actor pending, until the cluster
  has a free unit of its resource again.
- Elastic slots beyond the cluster's units (a node left) are retired, those without a
  working actor first (dead, degraded, or pending placement); a slot whose actor is
  loading or ready is never retired for this.
- Elastic slots are added for units that joined: up to the cluster's total, and no more
  than are free now (units held by someone else's actors are not ours to wait for).

Nothing here counts as a crash: batches never sit on a slot that has no placed actor.

Example::

    plan = plan_scaling(pool.slots, elastic=True, total=1, free=0, now=time.monotonic(),
                        placement_timeout_s=60.0, placed=lambda s: actor_placed(s.actor))
    plan.retire      # [(slot, "cluster_shrank")]: the node of its actor left
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only
    from vnpd.workers.ray_cluster import ActorSlot

NO_ACTOR = ("dead", "degraded", "waiting")  # slot states with no actor of their own


@dataclass
class ScalingPlan:
    """What to do: each list in the order to do it."""

    retire: list[tuple[ActorSlot, str]] = field(default_factory=list)  # (slot, reason)
    wait: list[ActorSlot] = field(default_factory=list)    # give the actor up, keep the slot
    resume: list[ActorSlot] = field(default_factory=list)  # waiting slots with room again
    add: int = 0                                           # new elastic slots


def plan_scaling(slots: Sequence[ActorSlot], *, elastic: bool, total: int, free: int,
                 now: float, placement_timeout_s: float,
                 placed: Callable[[ActorSlot], bool | None]) -> ScalingPlan:
    """The plan for ``slots`` in a cluster with ``total`` units of their resource, ``free``
    of them held by nobody. ``placed(slot)``: whether its actor has a process (None:
    unknown, taken as placed). ``placement_timeout_s`` 0: never give an actor up."""
    plan = ScalingPlan()
    known: dict[int, bool] = {}

    def pending(slot: ActorSlot) -> bool:  # asks the GCS once per slot, and only if needed
        if id(slot) not in known:
            known[id(slot)] = slot.state == "starting" and slot.actor is not None \
                and placed(slot) is False
        return known[id(slot)]

    unplaceable = [s for s in slots if placement_timeout_s > 0 and s.state == "starting"
                   and now - s.started_at > placement_timeout_s and pending(s)]
    if not elastic:
        plan.wait = unplaceable
        plan.resume = [s for s in slots if s.state == "waiting"][:max(0, free)]
        return plan
    plan.retire = [(s, "unplaceable") for s in unplaceable]
    excess = len(slots) - len(unplaceable) - total
    if excess > 0:
        idle = [s for s in slots if s.state in NO_ACTOR]
        given_up = {id(s) for s in unplaceable}
        idle += [s for s in slots if id(s) not in given_up and pending(s)]
        plan.retire += [(s, "cluster_shrank") for s in idle[:excess]]
    plan.add = max(0, min(total - (len(slots) - len(plan.retire)), free))
    return plan
