"""Fault injection on a three-node Ray cluster on this machine: a training worker killed
mid-epoch and then a worker node removed, in one elastic run; a sweep trial's process
killed. Each run must finish with every epoch once, lose at most the epoch in progress,
and leave every checkpoint readable. (A driver killed and resumed: tests/test_storage_s3.py; a
sweep driver: tests/test_sweep_resume.py; a pipeline killed between stages:
tests/test_pipeline.py.)"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import ray
import ray._private.state
from ray.cluster_utils import Cluster

from raycv import checkpoint
from raycv.config import from_dict
from raycv.runs import read_metrics
from raycv.session import free_port, quiet_data_progress

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(own_ray_env):
    """A head of 1 CPU and two worker nodes of 3 CPUs each; a test may remove a node (two
    1-CPU workers then still fit, with CPUs left for Ray Data)."""
    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    head = {"num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1"}
    with own_ray_env(dashboard_port=port):
        cluster = Cluster(initialize_head=True, head_node_args={**head, "dashboard_port": port})
        for _ in range(2):
            cluster.add_node(num_cpus=3)
        ray.init(address=cluster.address)
        quiet_data_progress()
        try:
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


def _config(smoke, scaling: dict, failures: int | None = 2, epochs: int = 3) -> dict:
    return smoke(
        data={"shapes": {"num_images": 400, "image_size": 32, "num_classes": 4}},
        train={"epochs": epochs, "batch_size": 32},
        checkpoint={"keep": epochs},  # every epoch stays on disk, to be read back
        scaling=scaling,
        run={} if failures is None else {"max_failures": failures},
    )


class Background:
    """``target()`` in a thread; ``result()`` re-raises what it raised."""

    def __init__(self, target: Callable) -> None:
        self._out: dict = {}
        self._thread = threading.Thread(target=self._run, args=(target,), daemon=True)
        self._thread.start()

    def _run(self, target: Callable) -> None:
        try:
            self._out["value"] = target()
        except BaseException as e:  # handed to the test thread
            self._out["error"] = e

    def alive(self) -> bool:
        return self._thread.is_alive()

    def result(self, timeout: float = 600):
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"still running after {timeout} s"
        if "error" in self._out:
            raise self._out["error"]
        return self._out["value"]


def _wait_for_epochs(metrics: Callable[[], Path | None], epochs: int, job: Background) -> None:
    deadline = time.time() + 420
    while time.time() < deadline:
        path = metrics()
        if path is not None and path.is_file() and len(read_metrics(path)) >= epochs:
            return
        if not job.alive():
            job.result()  # raises what stopped it
            pytest.fail("the run ended before the fault could be injected")
        time.sleep(0.3)
    pytest.fail(f"epoch {epochs} was not recorded in time")


@dataclass(frozen=True)
class _Actor:
    pid: int
    node_id: str


def _alive(class_name: str, timeout: float = 60.0) -> list[_Actor]:
    """The live actors of ``class_name``, waiting for one to show. Read from the GCS's own
    actor table: in a full test run the dashboard's State API answered without a trial's
    actor for minutes, while that actor trained its epochs."""
    deadline = time.time() + timeout
    while True:
        table = ray._private.state.actors(actor_state_name="ALIVE").values()
        found = [
            _Actor(a["Pid"], a["Address"]["NodeID"])
            for a in table
            if a["ActorClassName"] == class_name
        ]
        if found or time.time() > deadline:
            return found
        time.sleep(0.5)


def _titled(cluster: Cluster, prefix: str) -> list[int]:
    """The pids of this cluster's workers whose process title starts with ``prefix``. Read
    from /proc: in a full CI run the GCS actor table answered without the trial's actor for
    420 s while it trained. Every node here is a local raylet, the parent of its workers;
    asking for that parent keeps out the workers of another test's Ray on this machine."""
    raylets = {node.all_processes["raylet"][0].process.pid for node in cluster.list_all_nodes()}
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process ended while we looked
            continue
        if title.startswith(prefix) and parent in raylets:
            pids.append(int(proc.name))
    return pids


def _inject(metrics: Path, fault: Callable[[], None]) -> tuple[list[dict], float]:
    """Run ``fault`` a moment into the next epoch; the epochs recorded by then, and when."""
    time.sleep(1.0)  # into the epoch, not at its very start
    killed_at = time.time()
    fault()
    time.sleep(2.0)  # a report already on its way when the fault hit is recorded first
    return read_metrics(metrics), killed_at


def _assert_survived(run_dir: Path, epochs: int, before: list[dict], killed_at: float) -> None:
    """Every epoch once, in order; those recorded before the fault not trained again; the
    one in progress trained again after it (at most one epoch lost); every checkpoint
    readable and holding its own epoch."""
    after = read_metrics(run_dir / "metrics.jsonl")
    assert [m["epoch"] for m in after] == list(range(1, epochs + 1))
    assert 1 <= len(before) < epochs, "the fault must land mid-run"
    for old, new in zip(before, after):
        assert new["epoch_started_at"] == old["epoch_started_at"], "a saved epoch re-ran"
    assert after[len(before)]["epoch_started_at"] > killed_at, "no restart after the fault"
    saved = checkpoint.checkpoint_epochs(run_dir / "checkpoints")
    assert list(saved) == list(range(1, epochs + 1))
    for epoch, folder in saved.items():
        assert checkpoint.load(folder)["epoch"] == epoch


def _train_in_background(cfg) -> tuple[Background, Callable[[], Path | None]]:
    from raycv.train import run_train

    storage = Path(cfg.run.storage)
    job = Background(lambda: run_train(cfg))

    def metrics() -> Path | None:
        return next(iter(storage.glob(f"{cfg.experiment}/train-*/metrics.jsonl")), None)

    return job, metrics


def test_a_killed_worker_then_a_lost_node_each_cost_at_most_the_epoch_in_progress(cluster, smoke):
    """One elastic run, two faults: a worker process killed mid-epoch 2, then the node of
    another worker removed mid-epoch 3. STRICT_SPREAD keeps the two workers on two nodes,
    so one sits on a worker node; run.max_failures is left to its elastic default (3)."""
    scaling = {"num_workers": [1, 2], "placement_strategy": "STRICT_SPREAD"}
    cfg = from_dict(_config(smoke, scaling=scaling, failures=None, epochs=4))
    job, metrics = _train_in_background(cfg)
    _wait_for_epochs(metrics, 1, job)

    def kill_a_worker() -> None:
        workers = _alive("RayTrainWorker")
        assert len(workers) == 2
        os.kill(workers[-1].pid, signal.SIGKILL)

    first = _inject(metrics(), kill_a_worker)
    _wait_for_epochs(metrics, len(first[0]) + 1, job)
    # The Train controller stays: only worker processes may go with the node.
    keep = {cluster.head_node.node_id} | {a.node_id for a in _alive("TrainController")}
    victim = next(
        node
        for node in cluster.worker_nodes
        if node.node_id in {w.node_id for w in _alive("RayTrainWorker")} - keep
    )

    def lose_node() -> None:  # no graceful shutdown: the node is just gone
        cluster.remove_node(victim, allow_graceful=False)

    second = _inject(metrics(), lose_node)
    run = job.result()
    cluster.add_node(num_cpus=3)  # the next test gets three nodes again
    assert json.loads(run.manifest.read_text())["status"] == "finished"
    for before, killed_at in (first, second):
        _assert_survived(run.path, 4, before, killed_at)
    after = read_metrics(run.path / "metrics.jsonl")
    assert victim.node_id in second[0][-1]["worker_nodes"]
    assert victim.node_id not in after[-1]["worker_nodes"]
    assert all(len(set(m["worker_nodes"])) == 2 for m in after)  # never two on one node


def test_sweep_trial_killed_is_retried_from_its_checkpoint(cluster, smoke):
    from raycv.sweep.run import run_tune

    raw = _config(smoke, scaling={"num_workers": 1})  # the trial's process is the target
    raw["tune"] = {
        "searcher": "grid",
        "num_samples": 1,
        "scheduler": {"name": "fifo"},
        "max_retries": 1,
        "space": {"optimizer.lr": {"grid": [2.0e-3]}},
    }
    cfg = from_dict(raw)
    storage = Path(cfg.run.storage)
    job = Background(lambda: run_tune(cfg))

    def metrics() -> Path | None:
        return next(iter(storage.glob(f"{cfg.experiment}/tune-*/trials/*/metrics.jsonl")), None)

    _wait_for_epochs(metrics, 1, job)
    (trial,) = _titled(cluster, "ray::ImplicitFunc")  # Tune's actor that runs the trial function

    def kill_the_trial() -> None:
        os.kill(trial, signal.SIGKILL)

    before, killed_at = _inject(metrics(), kill_the_trial)
    run = job.result()
    trials = pd.read_csv(run.path / "trials.csv")
    assert list(trials.status) == ["finished"] and list(trials.attempts) == [2]
    _assert_survived(metrics().parent, cfg.train.epochs, before, killed_at)
