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
- a two-node cluster (``ray.cluster_utils.Cluster``) whose worker node is removed
  mid-job, then replaced by a new node.
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
from vnpd.config import ConfigError, load_config  # noqa: E402
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
          workers: dict[str, Any] | None = None, max_tokens: int = 1024) -> Daemon:
    config = write_config(dirs, model, max_tokens=max_tokens,
                          workers={**FAST_WORKERS, **(workers or {})},
                          inbox={"settle_s": 0.1, "rescan_interval_s": 1.0},
                          extra=f"[ray]\naddress = {json.dumps(address)}\n")
    daemon = Daemon(config, dirs, env=env)
    daemon.wait_ready(timeout=120)
    return daemon


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


# A node lost mid-job ------------------------------------------------------------------------
def test_node_removed_mid_job(tmp_path: Path, slow_model: Path) -> None:
    """Two nodes with one CPU each, so one actor on each. The worker node is killed while
    its actor holds batches: they come back ("node_lost"), the job completes on the head,
    and the slot's new actor starts on a node added later."""
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "_system_config": FAST_HEALTH})
    try:
        worker_node = cluster.add_node(num_cpus=1)
        dirs = DaemonDirs(tmp_path)
        text = slow_job()
        daemon = start(dirs, slow_model, cluster.address, max_tokens=2048)
        try:
            expected = {cluster.head_node.node_id, worker_node.node_id}
            daemon.wait_for(lambda: {w["node_id"] for w in daemon.status()["workers"]}
                            == expected, 10, f"one actor on each node {expected}")
            drop(dirs.inbox, "job.fasta", text)

            def remote_busy() -> bool:
                return any(w["node_id"] == worker_node.node_id and w["batches_done"] >= 1
                           and w["inflight"] for w in (daemon.status() or {})["workers"])
            daemon.wait_for(remote_busy, 60, "the worker node's actor busy")
            cluster.remove_node(worker_node, allow_graceful=False)
            died = daemon.wait_for(lambda: daemon.events("worker_died"), 60, "node loss seen")
            assert not (dirs.outbox / "job.h5").exists(), "the job ended before the node left"
            new_node = cluster.add_node(num_cpus=1)
            out = daemon.wait_outputs(["job.h5"], timeout=240)

            def replaced() -> bool:
                return any(w["node_id"] == new_node.node_id and w["state"] == "ready"
                           for w in (daemon.status() or {})["workers"])
            daemon.wait_for(replaced, 60, "the slot's new actor on the new node")
            metrics = scrape(daemon)
        finally:
            assert daemon.terminate() == 0
        assert [e["reason"] for e in died] == ["node_lost"] and died[0]["lost_batches"] >= 1
        assert 'vnpd_worker_restarts_total{device="cpu",reason="node_lost"} 1.0' in metrics
        check_output(out[0], text, slow_model, tmp_path)
    finally:
        cluster.shutdown()
