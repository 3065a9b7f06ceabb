"""plan_scaling (vnpd/workers/ray_scaling.py): which slots follow the cluster how. Pure
decisions over real ActorSlot records; test_ray_pool.py runs them on a real Ray."""

from __future__ import annotations

from vnpd.workers.protocol import WorkerSpec
from vnpd.workers.ray_cluster import ActorSlot
from vnpd.workers.ray_scaling import ScalingPlan, plan_scaling

NOW = 1000.0


def slot(worker: int, state: str, *, started_at: float = NOW) -> ActorSlot:
    spec = WorkerSpec(worker_id=worker, device="cpu", checkpoint="m.pt", dtype="float32",
                      layer=-1, truncation=1022, max_tokens=2048, heartbeat_interval_s=1.0,
                      log_format="json", log_level="info")
    s = ActorSlot(spec, credit=3, state=state, started_at=started_at)
    s.actor = None if state in ("dead", "degraded", "waiting") else object()
    return s


def plan(slots: list[ActorSlot], *, elastic: bool, total: int, free: int,
         timeout: float = 60.0, unplaced: tuple[ActorSlot, ...] = ()) -> ScalingPlan:
    """``unplaced``: the slots whose actor Ray has not placed on a node."""
    return plan_scaling(slots, elastic=elastic, total=total, free=free, now=NOW,
                        placement_timeout_s=timeout,
                        placed=lambda s: all(s is not u for u in unplaced))


def test_elastic_retires_slots_without_a_working_actor_when_the_cluster_shrinks() -> None:
    ready, loading, lost = slot(0, "ready"), slot(1, "starting"), slot(2, "dead")
    p = plan([ready, loading, lost], elastic=True, total=2, free=0)
    assert p.retire == [(lost, "cluster_shrank")] and p.add == 0
    # A replacement already pending in Ray goes as well; a loading one never does.
    pending = slot(2, "starting")
    p = plan([ready, loading, pending], elastic=True, total=1, free=0, unplaced=(pending,))
    assert p.retire == [(pending, "cluster_shrank")]


def test_elastic_gives_up_an_actor_pending_past_the_timeout() -> None:
    ready, stuck = slot(0, "ready"), slot(1, "starting", started_at=NOW - 61)
    p = plan([ready, stuck], elastic=True, total=2, free=0, unplaced=(stuck,))
    assert p.retire == [(stuck, "unplaceable")] and p.add == 0
    assert plan([ready, stuck], elastic=True, total=2, free=0, timeout=0,
                unplaced=(stuck,)).retire == []
    young = slot(1, "starting", started_at=NOW - 5)
    assert plan([ready, young], elastic=True, total=2, free=0, unplaced=(young,)).retire == []


def test_elastic_adds_slots_for_free_units_only() -> None:
    assert plan([slot(0, "ready")], elastic=True, total=3, free=2).add == 2
    assert plan([slot(0, "ready")], elastic=True, total=3, free=1).add == 1  # one held by others
    assert plan([slot(0, "ready"), slot(1, "dead")], elastic=True, total=2, free=1).add == 0
    assert plan([], elastic=True, total=0, free=0).add == 0


def test_device_list_keeps_its_slots_and_waits_for_room() -> None:
    stuck = slot(1, "starting", started_at=NOW - 61)
    p = plan([slot(0, "ready"), stuck, slot(2, "dead")], elastic=False, total=1, free=0,
             unplaced=(stuck,))
    assert p.wait == [stuck] and p.retire == [] and p.add == 0 and p.resume == []
    waiting = [slot(1, "waiting"), slot(2, "waiting")]
    assert plan([slot(0, "ready"), *waiting], elastic=False, total=2, free=1).resume \
        == waiting[:1]
