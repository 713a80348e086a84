"""A local Ray started by raycv next to another Ray on the same machine: its workers still
reach their own cluster's State API, which Train's placement-group cleanup relies on; and
the Ray Train settings every process that fits runs with."""

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

from raycv.config import from_dict
from raycv.session import POLL_ENV, POLL_S, ensure_ray, free_port, start_local, train_env

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


@ray.remote(num_cpus=0)
def poll_setting() -> str | None:
    return os.environ.get(POLL_ENV)


def test_every_process_that_fits_has_train_poll_its_workers_often(own_ray_env, monkeypatch):
    """Train's controller takes each report off a one-slot queue every POLL_ENV seconds
    (Ray's default 2 s), so shorter epochs waited for it: the driver and the processes
    Tune's trials fit in run with raycv's setting; a user's own wins."""
    monkeypatch.setenv(POLL_ENV, "1.5")
    assert train_env() == {POLL_ENV: "1.5"}
    monkeypatch.delenv(POLL_ENV)
    assert train_env() == {POLL_ENV: POLL_S}
    if ray.is_initialized():
        ray.shutdown()
    with own_ray_env():
        ensure_ray(from_dict({}))
        try:
            assert os.environ[POLL_ENV] == POLL_S  # this process's own fits
            assert ray.get(poll_setting.remote(), timeout=60) == POLL_S  # a trial's process
        finally:
            ray.shutdown()
