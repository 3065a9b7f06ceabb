"""The Ray backend end to end: the real daemon, a real Ray, real actors, real files.

Nothing of Ray or of vnpd is mocked. The daemon (tests/daemon_harness.py) runs with
``[workers] backend = "ray"`` and two CPU actors holding the tiny test model, and every
test checks what a user would: each input has one output, its ids are the input's in
order (less the quarantined poison record, where a fault makes one), no id twice, and
every row equals the local backend's (``vnpd embed``: the same engine in one process).

- a daemon-owned Ray (``address = ""``): equal to the local backend's daemon on the same
  files, and no Ray process left behind after it exits;
- faults on a shared one-node cluster that the daemons join: an actor SIGKILLs itself
  mid-batch (``VNPD_TEST_FAULT=crash:...``), an actor hangs (``hang:...``);
- two-node clusters (``ray.cluster_utils.Cluster``) that lose their worker node mid-job:
  with ``devices = "auto"`` the pool drops the lost node's slot, and gains one for a node
  that joins; with a device list the slot waits, with no actor pending, for room.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from tests.conftest import random_sequences  # noqa: E402
from tests.daemon_harness import Daemon, DaemonDirs, drop, fasta_text, write_config  # noqa: E402
from vnpd.config import Config, ConfigError, load_config  # noqa: E402
from vnpd.output.verify import read_output, verify_output  # noqa: E402

pytestmark = pytest.mark.timeout(300)

# Node death is noticed by the GCS's health checks: ~2 s here instead of Ray's ~30 s.
FAST_HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
               "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}
FAST_WORKERS: dict[str, Any] = {"backend": "ray", "restart_backoff_s": 0.2,
                                "restart_backoff_max_s": 1.0, "crash_budget": 50}
RAY_PROCESS = ("raylet", "gcs_server", "ray::", "default_worker.py", "log_monitor.py",
               "ray/dashboard", "runtime_env/agent", "monitor.py")


# Helpers ----------------------------------------------------------------------------------
def slow_job() -> str:
    """The job of the slow-model tests: ~60k tokens, ~6 s on two CPU actors."""
    return job_text(300, seed=5, prefix="n")


def job_text(n: int, seed: int, prefix: str) -> str:
    rng = np.random.default_rng(seed)
    return fasta_text(random_sequences(list(rng.integers(20, 400, n)), seed=seed), prefix=prefix)


_REFERENCE: dict[tuple[str, Path], tuple[list[str], np.ndarray]] = {}


def reference_rows(text: str, model: Path, tmp: Path) -> tuple[list[str], np.ndarray]:
    """(ids, rows) of ``vnpd embed`` on ``text``: the local engine in one process."""
    from vnpd.compute.engine import Engine
    from vnpd.embed import embed_file

    if (text, model) not in _REFERENCE:
        src, out = tmp / f"ref-{time.monotonic_ns()}.fasta", tmp / f"ref-{time.monotonic_ns()}.h5"
        src.write_text(text)
        embed_file(src, out, Engine.load(str(model), device="cpu", dtype="float32",
                                         max_tokens=2048))
        emb, ids, _, _ = read_output(out)
        _REFERENCE[(text, model)] = (ids, emb)
    return _REFERENCE[(text, model)]


def check_output(path: Path, text: str, model: Path, tmp: Path,
                 quarantined: frozenset[str] = frozenset()) -> list[str]:
    """The output of ``text``: ids in input order less ``quarantined``, each once, rows
    equal to the reference; returns the ids."""
    verify_output(path)
    emb, ids, _, attrs = read_output(path)
    ref_ids, ref = reference_rows(text, model, tmp)
    expected = [i for i in ref_ids if i not in quarantined]
    assert len(ids) == len(set(ids)), "an id appears twice"
    assert ids == expected, f"lost: {sorted(set(expected) - set(ids))[:10]}"
    keep = [k for k, i in enumerate(ref_ids) if i not in quarantined]
    np.testing.assert_allclose(emb, ref[keep], atol=1e-5)
    assert sorted(attrs.get("quarantined_ids", [])) == sorted(quarantined)
    return ids


def ray_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(marker in cmd for marker in RAY_PROCESS):
            pids.add(int(entry.name))
    return pids


def start(dirs: DaemonDirs, model: Path, address: str, *, env: dict[str, str] | None = None,
          workers: dict[str, Any] | None = None, max_tokens: int = 1024,
          ray_keys: dict[str, Any] | None = None) -> Daemon:
    keys = {"address": address, **(ray_keys or {})}
    config = write_config(dirs, model, max_tokens=max_tokens,
                          workers={**FAST_WORKERS, **(workers or {})},
                          inbox={"settle_s": 0.1, "rescan_interval_s": 1.0},
                          extra="[ray]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                                    for k, v in keys.items()))
    daemon = Daemon(config, dirs, env=env)
    daemon.wait_ready(timeout=120)
    return daemon


def workers_of(daemon: Daemon) -> list[dict[str, Any]]:
    return (daemon.status() or {}).get("workers", [])


def wait_busy_on(daemon: Daemon, node_id: str) -> None:
    """Until the actor on ``node_id`` has done a batch and holds more."""
    daemon.wait_for(lambda: any(w["node_id"] == node_id and w["batches_done"] >= 1
                                and w["inflight"] for w in workers_of(daemon)),
                    60, f"the actor on {node_id} busy")


def two_node_cluster() -> tuple[Any, Any]:
    """A head and a worker node with one CPU each, so one CPU actor on each."""
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "_system_config": FAST_HEALTH})
    return cluster, cluster.add_node(num_cpus=1)


def actor_states(address: str) -> list[str]:
    """The state of every engine actor that the cluster at ``address`` has seen (ALIVE,
    DEAD, PENDING_CREATION, ...), as this process reads them from the GCS when it joins
    as a driver for a moment."""
    from ray._private.state import actors

    ray.init(address=address, namespace="vnpd-test", log_to_driver=False)
    try:
        return sorted(a["State"] for a in actors().values()
                      if a["ActorClassName"] == "EngineActor")
    finally:
        ray.shutdown()


def no_actor_pending(address: str) -> bool:
    states = actor_states(address)
    assert "ALIVE" in states, states
    return not {"DEPENDENCIES_UNREADY", "PENDING_CREATION"} & set(states)


def scrape(daemon: Daemon) -> str:
    address = (daemon.status() or {})["metrics"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return response.read().decode()


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ESM-2 8M's shape (6 layers, dim 320): ~5k tokens/s on one CPU thread, so that a
    job lasts long enough to lose a node in the middle of it."""
    from vnpd.compute.families.esm2_checkpoint import make_test_model

    path, _ = make_test_model(tmp_path_factory.mktemp("models") / "esm2_small.pt",
                              layers=6, dim=320, heads=20, seed=3)
    return path


@pytest.fixture(scope="module")
def shared_cluster() -> Any:
    """One single-node Ray (2 CPUs) that the fault tests' daemons join, and leave running."""
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "_system_config": FAST_HEALTH})
    yield cluster
    cluster.shutdown()


# Config and packaging ---------------------------------------------------------------------
def test_config_backend_and_address_are_checked(tmp_path: Path) -> None:
    cfg = load_config(None, env={"VNPD_WORKERS_BACKEND": "ray",
                                 "VNPD_RAY_ADDRESS": "ray://head.example:10001"})
    assert (cfg.workers.backend, cfg.ray.address) == ("ray", "ray://head.example:10001")
    assert load_config(None, env={}).workers.backend == "local"
    cfg = load_config(None, env={"VNPD_RAY_AUTO_DEVICE": "cpu",
                                 "VNPD_RAY_PLACEMENT_TIMEOUT_S": "0"})
    assert (cfg.ray.auto_device, cfg.ray.placement_timeout_s) == ("cpu", 0.0)
    assert (Config().ray.auto_device, Config().ray.placement_timeout_s) == ("gpu", 60.0)
    for env, needle in (({"VNPD_WORKERS_BACKEND": "slurm"}, "workers.backend"),
                        ({"VNPD_RAY_ADDRESS": "head.example"}, "ray.address"),
                        ({"VNPD_RAY_ADDRESS": "ray://head:port"}, "ray.address")):
        with pytest.raises(ConfigError, match=needle):
            load_config(None, env=env)


def test_local_backend_never_imports_ray() -> None:
    code = ("import sys; from vnpd.config import load_config; import vnpd.daemon.app; "
            "from vnpd.daemon.app import make_pool; "
            "pool = make_pool(load_config(None, env={}), []); "
            "assert type(pool).__name__ == 'LocalPool'; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[2])
    assert done.stdout.strip() == "[]", done.stdout


# A daemon-owned Ray -----------------------------------------------------------------------
def test_daemon_owned_ray_equals_local_backend_and_leaves_nothing(tmp_path: Path,
                                                                 tiny_model: Path) -> None:
    texts = {"a.fasta": job_text(120, seed=1, prefix="a"),
             "b.fasta": job_text(9, seed=2, prefix="b"), "c.fasta": ">only\nMKTAYIAKQR\n"}
    before = ray_pids()
    outputs = {}
    for backend in ("ray", "local"):
        dirs = DaemonDirs(tmp_path / backend)
        dirs.root.mkdir()
        daemon = start(dirs, tiny_model, "", workers={"backend": backend})
        try:
            for name, text in texts.items():
                drop(dirs.inbox, name, text)
            outputs[backend] = daemon.wait_outputs([Path(n).stem + ".h5" for n in texts])
            workers = daemon.wait_for(lambda: [w for w in (daemon.status() or {}).get(
                "workers", []) if w.get("batches_done")], 10, "batches done in the status")
        finally:
            assert daemon.terminate() == 0
        if backend == "ray":
            assert {w["node"] for w in workers} == {ray.util.get_node_ip_address()}
            assert all(w["node_id"] and w["gpu"] is None for w in workers)
            assert daemon.events("ray_connected")[0]["owned"] is True
            deadline = time.monotonic() + 15
            while ray_pids() - before and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not ray_pids() - before, f"left behind: {ray_pids() - before}"
    for ray_out, local_out, text in zip(outputs["ray"], outputs["local"], texts.values()):
        emb_r, ids_r, len_r, _ = read_output(ray_out)
        emb_l, ids_l, len_l, _ = read_output(local_out)
        assert ids_r == ids_l and len(ids_r) == text.count(">")
        np.testing.assert_array_equal(len_r, len_l)
        np.testing.assert_allclose(emb_r, emb_l, atol=1e-5)


# Faults on a shared cluster -----------------------------------------------------------------
@pytest.mark.parametrize("action", ["crash", "hang", "sticky", "oom"])
def test_actor_fault_requeues_and_quarantines_only_the_record(
        action: str, shared_cluster: Any, tmp_path: Path, tiny_model: Path) -> None:
    """One record faults on every try. crash: its actor SIGKILLs itself mid-batch; hang:
    it stops working (heartbeats go on) and is killed past the deadline; sticky: it
    raises an illegal memory access and exits; oom: it runs out of memory (no restart,
    the batch is split and the slot's budget lowered). Each time the bystanders come back
    and are computed once, the record ends quarantined, every other row equals the local
    backend's, and the cluster the daemon joined is left running."""
    dirs = DaemonDirs(tmp_path)
    text = job_text(150, seed=3, prefix="p")
    bad = "p77"
    workers = {"batch_deadline_base_s": 2.0, "batch_deadline_per_1k_tokens_s": 0.0} \
        if action == "hang" else {}
    daemon = start(dirs, tiny_model, shared_cluster.address, workers=workers,
                   env={"VNPD_TEST_FAULT": f"{action}:{bad}"},
                   max_tokens=2048 if action == "oom" else 1024)
    try:
        drop(dirs.inbox, "job.fasta", text)
        drop(dirs.inbox, "bystander.fasta", job_text(20, seed=4, prefix="b"))
        out = daemon.wait_outputs(["job.h5", "bystander.h5"], timeout=240)
        metrics = scrape(daemon)

        def budgets() -> list[int]:
            return [w["max_tokens"] for w in daemon.status()["workers"]]
        if action == "oom":  # status.json is rewritten every second: give it a few
            daemon.wait_for(lambda: min(budgets()) < 2048, 5, f"a lower budget: {budgets()}")
    finally:
        assert daemon.terminate() == 0
    check_output(out[0], text, tiny_model, tmp_path, quarantined=frozenset({bad}))
    check_output(out[1], job_text(20, seed=4, prefix="b"), tiny_model, tmp_path)
    died = daemon.events("worker_died")
    if action == "oom":
        assert not died and not daemon.events("worker_kill")
        assert [e for e in daemon.events("batch_split") if e["reason"] == "out of memory"]
    else:
        reason = {"sticky": "sticky_error"}.get(action, action)
        assert len(died) == 3 and {e["reason"] for e in died} == {reason}, died
        # A crash or a hang loses the record's batch with the actor; a sticky error
        # reports it failed (and loses only the batches beside it).
        assert sum(e["lost_batches"] for e in died) >= (0 if action == "sticky" else 3)
        assert f'vnpd_worker_restarts_total{{device="cpu",reason="{reason}"}} 3.0' in metrics
    if action == "hang":
        assert [e["reason"] for e in daemon.events("worker_kill")] == ["hang"] * 3
    if action == "sticky":
        assert len([e for e in daemon.events("worker_error") if e["kind"] == "fatal"]) == 3
    assert daemon.events("ray_connected")[0]["owned"] is False
    assert shared_cluster.head_node.any_processes_alive()


def test_actor_sigkilled_from_outside_mid_batch(shared_cluster: Any, tmp_path: Path,
                                                slow_model: Path) -> None:
    """A SIGKILL from outside (the OOM killer, an operator) to an actor holding batches:
    they are requeued ("crash"), nothing is quarantined, and the output equals the local
    backend's row for row."""
    dirs = DaemonDirs(tmp_path)
    text = slow_job()
    daemon = start(dirs, slow_model, shared_cluster.address, max_tokens=2048)
    try:
        drop(dirs.inbox, "job.fasta", text)
        busy = daemon.wait_for(lambda: [w for w in (daemon.status() or {})["workers"]
                                        if w["batches_done"] >= 1 and w["inflight"]],
                               60, "an actor holding batches")
        os.kill(busy[0]["pid"], signal.SIGKILL)
        out = daemon.wait_outputs(["job.h5"], timeout=240)
    finally:
        assert daemon.terminate() == 0
    died = daemon.events("worker_died")
    assert [(e["pid"], e["reason"]) for e in died] == [(busy[0]["pid"], "crash")], died
    assert died[0]["lost_batches"] >= 1
    check_output(out[0], text, slow_model, tmp_path)


# Nodes lost and gained ------------------------------------------------------------------------
def test_auto_slots_follow_the_cluster(tmp_path: Path, slow_model: Path) -> None:
    """``devices = "auto"`` (here one CPU actor per CPU of the cluster). The worker node is
    killed while its actor holds batches: they come back ("node_lost"), the slot is
    retired (no crash counted, no actor left pending), and the job completes on the head,
    equal to the local backend's. Then a node joins: a slot is added, its actor starts on
    the new node and computes batches of the next job."""
    cluster, worker_node = two_node_cluster()
    try:
        dirs = DaemonDirs(tmp_path)
        text, text2 = slow_job(), job_text(80, seed=6, prefix="g")
        daemon = start(dirs, slow_model, cluster.address, max_tokens=2048,
                       workers={"devices": "auto"},
                       ray_keys={"auto_device": "cpu", "placement_timeout_s": 5.0})
        try:
            head = cluster.head_node.node_id
            daemon.wait_for(lambda: sorted(w["node_id"] for w in workers_of(daemon)
                                           if w["state"] == "ready")
                            == sorted([head, worker_node.node_id]), 30, "one actor per node")
            drop(dirs.inbox, "job.fasta", text)
            wait_busy_on(daemon, worker_node.node_id)
            cluster.remove_node(worker_node, allow_graceful=False)
            retired = daemon.wait_for(lambda: daemon.events("ray_slot_retired"), 60,
                                      "the lost node's slot retired")
            assert not (dirs.outbox / "job.h5").exists(), "the job ended before the node left"
            out = daemon.wait_outputs(["job.h5"], timeout=240)
            left = workers_of(daemon)
            assert [(w["node_id"], w["state"]) for w in left] == [(head, "ready")], left
            assert no_actor_pending(cluster.address)

            new_node = cluster.add_node(num_cpus=1)
            daemon.wait_for(lambda: any(w["node_id"] == new_node.node_id and w["state"] ==
                                        "ready" for w in workers_of(daemon)), 60,
                            "an actor on the new node")
            drop(dirs.inbox, "grow.fasta", text2)
            out2 = daemon.wait_outputs(["grow.h5"], timeout=240)
            grown = daemon.wait_for(lambda: [w for w in workers_of(daemon)
                                             if w["node_id"] == new_node.node_id
                                             and w["batches_done"] >= 1], 10,
                                    "batches done on the new node")
            assert len(workers_of(daemon)) == 2
            metrics = scrape(daemon)
        finally:
            assert daemon.terminate() == 0
        died = daemon.events("worker_died")
        assert [e["reason"] for e in died] == ["node_lost"] and died[0]["lost_batches"] >= 1
        assert [e["reason"] for e in retired] == ["cluster_shrank"], retired
        assert not daemon.events("worker_restart_scheduled") and \
            not daemon.events("device_degraded"), "node loss counted as a crash"
        assert [e["worker"] for e in daemon.events("ray_slot_added")][-1] == grown[0]["worker"]
        assert 'vnpd_worker_restarts_total{device="cpu",reason="node_lost"} 1.0' in metrics
        check_output(out[0], text, slow_model, tmp_path)
        check_output(out2[0], text2, slow_model, tmp_path)
    finally:
        cluster.shutdown()


def test_device_list_slot_waits_for_room(tmp_path: Path, slow_model: Path) -> None:
    """``devices = ["cpu", "cpu"]`` keeps two slots. The worker node is killed while its
    actor holds batches: they come back ("node_lost"), the job completes on the head, and
    the slot's new actor, which no node can take, is given up after the placement timeout:
    the slot waits with no actor pending. A node added later gets it."""
    cluster, worker_node = two_node_cluster()
    try:
        dirs = DaemonDirs(tmp_path)
        text = slow_job()
        daemon = start(dirs, slow_model, cluster.address, max_tokens=2048,
                       ray_keys={"placement_timeout_s": 3.0})
        try:
            expected = {cluster.head_node.node_id, worker_node.node_id}
            daemon.wait_for(lambda: {w["node_id"] for w in workers_of(daemon)}
                            == expected, 10, f"one actor on each node {expected}")
            drop(dirs.inbox, "job.fasta", text)
            wait_busy_on(daemon, worker_node.node_id)
            cluster.remove_node(worker_node, allow_graceful=False)
            died = daemon.wait_for(lambda: daemon.events("worker_died"), 60, "node loss seen")
            assert not (dirs.outbox / "job.h5").exists(), "the job ended before the node left"
            out = daemon.wait_outputs(["job.h5"], timeout=240)
            daemon.wait_for(lambda: daemon.events("ray_slot_waiting"), 30, "the slot waiting")
            states = daemon.wait_for(lambda: sorted(
                (w["state"], w["pid"] is None) for w in workers_of(daemon)) == [
                ("ready", False), ("waiting", True)], 10, "a ready slot and a waiting one")
            assert states and no_actor_pending(cluster.address)
            new_node = cluster.add_node(num_cpus=1)

            def replaced() -> bool:
                return any(w["node_id"] == new_node.node_id and w["state"] == "ready"
                           for w in workers_of(daemon))
            daemon.wait_for(replaced, 60, "the slot's new actor on the new node")
            metrics = scrape(daemon)
        finally:
            assert daemon.terminate() == 0
        assert [e["reason"] for e in died] == ["node_lost"] and died[0]["lost_batches"] >= 1
        assert daemon.events("ray_slot_resumed")
        assert not daemon.events("device_degraded") and not daemon.events("ray_slot_retired")
        assert 'vnpd_worker_restarts_total{device="cpu",reason="node_lost"} 1.0' in metrics
        check_output(out[0], text, slow_model, tmp_path)
    finally:
        cluster.shutdown()
