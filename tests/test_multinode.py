"""Two Ray nodes on one machine: STRICT_SPREAD puts the two DDP workers on different nodes."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from raycv.config import from_dict
from raycv.runs import read_metrics
from raycv.session import quiet_data_progress
from raycv.train import run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    quiet_data_progress()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_strict_spread_places_workers_on_different_nodes(two_nodes, smoke):
    cfg = from_dict(
        smoke(
            train={"epochs": 1},
            scaling={"num_workers": 2, "placement_strategy": "STRICT_SPREAD"},
        )
    )
    run = run_train(cfg)
    nodes = read_metrics(run.metrics)[-1]["worker_nodes"]
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(set(nodes)) == 2 and set(nodes) <= alive
