"""A real multi-process cluster on this machine: ``ray start --head`` and a second
``ray start --address`` node (two raylets, different resources), a raycv training job
submitted through the Jobs API with scripts/submit.py, its two workers on both nodes and
its run folder complete; then both nodes stop and leave no process behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray

from raycv import checkpoint
from raycv.runs import read_metrics
from raycv.session import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


class RayStartCluster:
    """Two ``ray start --block`` processes, each in a process group of its own so that
    stopping one kills everything it started (``ray stop`` would stop every Ray on the
    machine). Every port a node's agents would otherwise share is picked free."""

    def __init__(self, logs: Path) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short socket paths
        self.port, self.dashboard = free_port(), free_port()
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",  # as our cluster files run it
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            # Train's placement-group cleanup finds the State API here, not by guessing
            # among the Rays on this machine (see raycv.session.start_local).
            "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{self.dashboard}",
        }
        self.logs = logs
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        head = ["--head", f"--port={self.port}", "--num-cpus=3", "--dashboard-host=127.0.0.1"]
        head += ["--disable-usage-stats"]
        head += [f"--dashboard-port={self.dashboard}", f"--temp-dir={self.temp_dir}"]
        self._start("head", [*head, '--resources={"head": 1}'])
        self._wait_for_nodes(1)
        second = [f"--address=127.0.0.1:{self.port}", "--num-cpus=2"]
        self._start("second", [*second, '--resources={"second": 1}'])
        self._wait_for_nodes(2)

    def _start(self, name: str, args: list[str]) -> None:
        # Both raylets on the loopback address, where the ports were found free.
        ports = ["--node-ip-address=127.0.0.1", f"--dashboard-agent-listen-port={free_port()}"]
        ports += [
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ]
        with (self.logs / f"{name}.log").open("w") as out:
            self.procs.append(
                subprocess.Popen(
                    [RAY, "start", "--block", *args, *ports],
                    env=self.env,
                    start_new_session=True,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )

    def nodes(self) -> list[dict]:
        """The alive nodes, asked by a driver in a process of its own, with the cluster's
        environment (token authentication on)."""
        script = (
            f"import json, ray; ray.init(address='127.0.0.1:{self.port}', logging_level='ERROR'); "
            "print(json.dumps([n for n in ray.nodes() if n['Alive']]))"
        )
        asked = subprocess.run(
            [sys.executable, "-c", script], env=self.env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        if asked.returncode:
            raise ConnectionError(asked.stderr.strip().splitlines()[-1:])
        return json.loads(asked.stdout.strip().splitlines()[-1])

    def _wait_for_nodes(self, count: int) -> None:
        deadline, error = time.time() + 180, None
        while time.time() < deadline:
            try:
                if len(self.nodes()) >= count:
                    return
            except ConnectionError as e:  # the head is still starting
                error = e
            if any(p.poll() is not None for p in self.procs):
                logs = "".join(f.read_text()[-2000:] for f in self.logs.glob("*.log"))
                pytest.fail(f"ray start exited:\n{logs}")
            time.sleep(1.0)
        pytest.fail(f"{count} nodes did not come up in time (last error: {error!r})")

    def stop(self) -> None:
        """Kill both nodes' process groups outright: SIGTERM makes each node drain for up
        to 30 s, which a throwaway test cluster does not need."""
        for proc in reversed(self.procs):
            with_group(proc, signal.SIGKILL)
            proc.wait()
        time.sleep(1.0)

    def leftover_processes(self) -> list[str]:
        """Processes whose command line names this cluster's temp dir or ports."""
        marks = (self.temp_dir, f"127.0.0.1:{self.port}", f"--gcs-address=127.0.0.1:{self.port}")
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue  # gone meanwhile
            if any(mark in line for mark in marks) and "pytest" not in line:
                found.append(line[:200])
        return found


def with_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


@pytest.fixture(scope="module")
def ray_start(tmp_path_factory):
    if ray.is_initialized():
        ray.shutdown()
    cluster = RayStartCluster(tmp_path_factory.mktemp("ray-start-logs"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def test_a_submitted_job_trains_on_both_nodes_and_leaves_a_complete_run(ray_start, tmp_path):
    nodes = {n["NodeID"]: n["Resources"] for n in ray_start.nodes()}
    assert len(nodes) == 2
    storage = tmp_path / "runs"
    command = ["raycv", "train", "configs/smoke.yaml", "train.epochs=2", f"run.storage={storage}"]
    command += ["scaling.num_workers=2", "scaling.placement_strategy=STRICT_SPREAD"]
    submit = [sys.executable, str(REPO / "scripts" / "submit.py")]
    submit += ["--address", f"http://127.0.0.1:{ray_start.dashboard}", "--working-dir", str(REPO)]
    submit += ["--download", str(tmp_path / "fetched"), "--", *command]
    result = subprocess.run(submit, capture_output=True, text=True, timeout=600, env=ray_start.env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SUCCEEDED" in result.stderr
    (run,) = (storage / "smoke").glob("train-*")  # written by the job, on the shared disk

    history = read_metrics(run / "metrics.jsonl")
    assert [m["epoch"] for m in history] == [1, 2]
    assert set(history[-1]["worker_nodes"]) == set(nodes)  # one worker on each raylet
    by_resource = {("head" if "head" in r else "second"): n for n, r in nodes.items()}
    assert set(by_resource) == {"head", "second"}  # the nodes differ in their resources
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["metrics"]["final"]["epoch"] == 2
    best = manifest["metrics"]["best"]
    assert checkpoint.load(run / manifest["paths"]["best_checkpoint"])["epoch"] == best["epoch"]
    assert checkpoint.load(checkpoint.checkpoint_epochs(run / "checkpoints")[2])["epoch"] == 2
    for made in ("config.yaml", "plots/curves.png"):
        assert (run / made).is_file(), made
    assert any((run / "tb").iterdir())
    fetched = tmp_path / "fetched" / run.name
    assert (fetched / "manifest.json").read_text() == (run / "manifest.json").read_text()


def test_both_nodes_stop_and_leave_no_process(ray_start):
    assert ray_start.leftover_processes()  # running now: the check can see them
    ray_start.stop()
    assert ray_start.leftover_processes() == []
