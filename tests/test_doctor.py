"""`raycv doctor` on a real two-node Ray (one machine, nodes of different sizes): worker
placement per strategy, per-node storage and version probes, the fixes it names, and the
command's exit status. The placement arithmetic is also checked alone, without Ray."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
import yaml
from ray._private.authentication.authentication_token_setup import (
    enable_token_auth_by_default,
    ensure_token_if_auth_enabled,
)
from ray.cluster_utils import Cluster

from raycv.config import ScalingConfig, from_dict
from raycv.doctor import (
    Node,
    NodeProbe,
    check_cores,
    check_data_cpus,
    check_resources,
    format_report,
    room_for_workers,
    run_doctor,
)
from raycv.session import free_port, physical_cores

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_nodes(own_ray_env):
    """A head with 2 CPUs and a worker node with 1 CPU and 1 (logical) GPU, token
    authentication on. Dashboard and its agents on free ports: another Ray on this machine
    may hold the default ones."""
    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    with own_ray_env(dashboard_port=port):
        assert enable_token_auth_by_default(), "RAY_AUTH_MODE is set to something else than token"
        ensure_token_if_auth_enabled(None, create_token_if_missing=True)
        head = {"num_cpus": 2, "dashboard_port": port, "dashboard_agent_listen_port": None}
        cluster = Cluster(initialize_head=True, head_node_args=head)
        cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        try:
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


@pytest.fixture
def config(shapes_cfg, tmp_path):
    """``config(storage=..., **scaling)``: the small shapes config with run folders under
    tmp_path (or ``storage``) and a batch size that divides among the workers."""

    def make(storage: Path | str | None = None, **scaling):
        raw = {**shapes_cfg, "scaling": {**shapes_cfg["scaling"], **scaling}}
        raw["train"] = {**raw["train"], "batch_size": 8 * raw["scaling"].get("num_workers", 1)}
        raw["run"] = {"storage": str(storage or tmp_path / "runs")}
        return from_dict(raw)

    return make


def finding(report, check: str):
    found = [f for f in report.findings if f.check == check]
    assert len(found) == 1, report.findings
    return found[0]


def test_every_node_is_probed_and_storage_is_shared(two_nodes, config, tmp_path):
    report = run_doctor(config(num_workers=2, placement_strategy="STRICT_SPREAD"))
    assert report.ok, format_report(report)
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert set(report.probes) == alive and len(alive) == 2
    for probe in report.probes.values():
        assert (probe.torch, probe.cuda) == (torch.__version__, torch.version.cuda)
        assert probe.cores == physical_cores()  # each node's own count (here: one machine)
        assert probe.write_error is None and probe.peer_error is None
    assert finding(report, "shared storage").level == "ok"
    assert sorted(n.cpus for n in report.nodes) == [1, 2]
    assert finding(report, "GPUs").level == "warn"  # the GPU node's GPU would sit idle
    assert list((tmp_path / "runs").iterdir()) == []  # every probe file was deleted


def test_strict_spread_needs_a_node_per_worker(two_nodes, config):
    spread = dict(num_workers=3, cpus_per_worker=0.5)
    report = run_doctor(config(placement_strategy="STRICT_SPREAD", **spread))
    resources = finding(report, "resources")
    assert resources.level == "error"
    assert "only 2 nodes hold one" in resources.message
    assert "scaling.num_workers=2" in resources.fix and "placement_strategy=SPREAD" in resources.fix
    # The same workers may share nodes under SPREAD: 2 on the head, 1 on the other node.
    assert finding(
        run_doctor(config(placement_strategy="SPREAD", **spread)), "resources"
    ).level == ("ok")


def test_more_cpus_than_the_cluster_has_fail_with_the_fix(two_nodes, config):
    report = run_doctor(config(num_workers=2, cpus_per_worker=2))
    assert not report.ok
    resources = finding(report, "resources")
    assert resources.level == "error"
    assert "hold 1" in resources.message  # only the head has 2 CPUs for a worker
    assert resources.fix.startswith("set scaling.num_workers=1 or lower scaling.cpus_per_worker")
    # The one worker that fits leaves the GPU node's CPU for Ray Data: one problem only.
    assert finding(report, "data CPUs").level == "ok"
    shown = format_report(report)
    assert "fix: set scaling.num_workers=1" in shown and "verdict: 1 problem(s)" in shown


def test_gpu_workers_are_placed_on_gpu_nodes(two_nodes, config):
    one = run_doctor(config(num_workers=1, use_gpu=True))
    assert one.ok, format_report(one)
    cuda = [f for f in one.findings if f.message.startswith("CUDA")]
    assert cuda and cuda[0].level == "ok"
    two = finding(run_doctor(config(num_workers=2, use_gpu=True)), "resources")
    assert two.level == "error"
    assert two.fix.startswith("set scaling.num_workers=1 or lower scaling.gpus_per_worker")


def _writable(folder: Path) -> bool:
    try:
        (folder / ".write-test").touch()
    except OSError:
        return False
    (folder / ".write-test").unlink()
    return True


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write: chmod 555, and when this user is root (who ignores
    permission bits) also the immutable attribute."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = _writable(folder) and shutil.which("chattr") is not None
    if immutable:
        subprocess.run(["chattr", "+i", str(folder)], check=False, capture_output=True)
    try:
        if _writable(folder):
            pytest.skip("cannot make a read-only folder here (root without chattr)")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=False, capture_output=True)
        folder.chmod(0o755)


def test_a_read_only_storage_is_reported_on_every_node(two_nodes, config, read_only_dir):
    report = run_doctor(config(storage=read_only_dir))
    storage = finding(report, "storage")
    assert storage.level == "error"
    assert str(read_only_dir) in storage.message and "2 of 2 nodes" in storage.message
    assert "run.storage" in storage.fix
    assert all(p.write_error for p in report.probes.values())
    assert "not writable" in format_report(report)


def test_the_command_exits_nonzero_only_when_the_run_cannot_work(two_nodes, config, tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(config().model_dump(mode="json")))
    doctor = [sys.executable, "-m", "raycv", "doctor", str(cfg_file)]
    doctor += ["--address", two_nodes.address]

    ok = subprocess.run(doctor, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "verdict: ready" in ok.stdout
    too_big = subprocess.run(
        [*doctor, "scaling.num_workers=4", "train.batch_size=32"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert too_big.returncode == 1
    assert "fix: set scaling.num_workers=3" in too_big.stdout
    assert "error: doctor found" in too_big.stderr


@pytest.mark.parametrize(
    ("strategy", "room"),
    [("PACK", 4), ("SPREAD", 4), ("STRICT_PACK", 3), ("STRICT_SPREAD", 2)],
)
def test_room_for_workers_follows_the_placement_strategy(strategy, room):
    nodes = [Node("a", "10.0.0.1", cpus=3, gpus=0), Node("b", "10.0.0.2", cpus=1.5, gpus=0)]
    scaling = ScalingConfig(num_workers=1, cpus_per_worker=1, placement_strategy=strategy)
    assert room_for_workers(scaling, nodes) == room


def test_a_bundle_never_spans_nodes_and_fractions_add_up():
    nodes = [Node("a", "10.0.0.1", cpus=2, gpus=0), Node("b", "10.0.0.2", cpus=2, gpus=0)]
    assert room_for_workers(ScalingConfig(num_workers=1, cpus_per_worker=3), nodes) == 0
    tenths = [Node("c", "10.0.0.3", cpus=0.3, gpus=0)]
    assert room_for_workers(ScalingConfig(num_workers=3, cpus_per_worker=0.1), tenths) == 3


def test_an_elastic_range_needs_room_for_its_minimum_and_keeps_cpus_for_data():
    nodes = [Node("a", "10.0.0.1", cpus=2, gpus=0), Node("b", "10.0.0.2", cpus=2, gpus=0)]
    starts = check_resources(ScalingConfig(num_workers=(1, 4), cpus_per_worker=1.5), nodes)
    assert starts.level == "ok" and "1 to 4 workers" in starts.message
    assert "starts with 2" in starts.message
    too_many = check_resources(ScalingConfig(num_workers=(3, 4), cpus_per_worker=1.5), nodes)
    assert too_many.level == "error" and "scaling.num_workers=[2, 4]" in too_many.fix
    # Two workers of 1.5 CPUs leave half a CPU on each node: no Ray Data task fits.
    split = check_data_cpus(ScalingConfig(num_workers=(1, 4), cpus_per_worker=1.5), nodes)
    assert split.level == "error" and "0.5 at most on one node" in split.message
    three = [*nodes, Node("c", "10.0.0.3", cpus=2, gpus=0)]
    data = check_data_cpus(ScalingConfig(num_workers=(1, 2), cpus_per_worker=1.5), three)
    assert data.level == "ok" and data.message.startswith("3 CPUs left")  # 2 on node c
    greedy = check_data_cpus(ScalingConfig(num_workers=(1, 4), cpus_per_worker=1), nodes)
    assert greedy.level == "error"  # four workers would take every CPU


def test_workers_that_take_more_cpus_than_physical_cores_are_a_warning_with_the_ratio():
    nodes = [Node("a", "10.0.0.1", cpus=18, gpus=0), Node("b", "10.0.0.2", cpus=3, gpus=0)]
    probes = {"a": NodeProbe("a", cores=2)}  # b did not answer: its 3 CPUs count as cores
    over = check_cores(ScalingConfig(num_workers=8, cpus_per_worker=2), nodes, probes)
    assert over.level == "warn"
    assert over.message.startswith("the workers take 16 CPUs (8 x 2) on 5 physical cores, 3.2x")
    fits = check_cores(ScalingConfig(num_workers=(1, 5), cpus_per_worker=1), nodes, probes)
    assert (fits.level, fits.message) == ("ok", "the workers take 5 of 5 physical cores")
