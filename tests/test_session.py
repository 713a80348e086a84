"""A local Ray started by raycv next to another Ray on the same machine: its workers still
reach their own cluster's State API, which Train's placement-group cleanup relies on."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
from ray._private import services

from raycv.session import free_port, start_local

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture
def another_ray(tmp_path):
    """A second Ray on this machine, started with ``ray start`` in a process group of its
    own and killed after; yields its GCS address."""
    port, temp_dir = free_port(), tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short socket paths
    command = [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=1"]
    command += ["--include-dashboard=false", "--disable-usage-stats"]
    command += [f"--temp-dir={temp_dir}"]
    command += [f"--dashboard-agent-listen-port={free_port()}", "--node-ip-address=127.0.0.1"]
    with (tmp_path / "ray-start.log").open("w") as log:
        proc = subprocess.Popen(command, start_new_session=True, stdout=log, stderr=log)
    try:
        deadline = time.time() + 120
        while not _listening(port):  # its GCS is up
            assert proc.poll() is None, (tmp_path / "ray-start.log").read_text()[-2000:]
            assert time.time() < deadline, "the other Ray did not start in 120 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _gcs_processes() -> int:
    services._cached_find_gcs_addresses.cache_clear()  # Ray caches what it found once
    return len(services.find_gcs_addresses())


@ray.remote
class Marker:
    def ping(self) -> str:
        return "pong"


@ray.remote(num_cpus=0)
def state_of(actor_id: str) -> str:
    """What Train's cleaner does from inside the cluster: the State API with no address."""
    from ray.util.state import get_actor

    return get_actor(actor_id).state


def test_workers_reach_their_own_state_api_when_another_ray_runs(another_ray, own_ray_env):
    if ray.is_initialized():
        ray.shutdown()
    with own_ray_env() as temp_dir:
        start_local(1, "127.0.0.1", _temp_dir=temp_dir)
        try:
            assert _gcs_processes() >= 2  # guessing the cluster would fail here
            marker = Marker.remote()
            assert ray.get(marker.ping.remote()) == "pong"
            assert ray.get(state_of.remote(marker._actor_id.hex()), timeout=60) == "ALIVE"
        finally:
            ray.shutdown()
