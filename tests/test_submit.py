"""scripts/submit.py against a real local Ray: jobs go through the Jobs API with token
authentication on, their logs are followed, the exit status follows the job's, and the run
folder a raycv command prints as its last line is fetched."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from ray._private.authentication.authentication_token_setup import (
    enable_token_auth_by_default,
    ensure_token_if_auth_enabled,
)
from ray.cluster_utils import Cluster

from raycv.session import free_port

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "scripts" / "submit.py"


@pytest.fixture(scope="module")
def jobs_api(own_ray_env):
    """The Jobs API URL of a local Ray started for this module: dashboard on 127.0.0.1,
    token authentication on (the token is Ray's own, ~/.ray/auth_token), and this venv's
    `raycv` on the PATH that jobs inherit.

    A Cluster rather than ray.init: ray.init's dashboard agent always takes port 52365,
    and when another Ray on the machine holds it (a second test run), every job submission
    is refused with "No available agent". A Cluster takes the dashboard port as given, so
    both ports are left to Ray here."""
    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    with own_ray_env(dashboard_port=port, PATH=path):
        # What ray.init does for a new local cluster: token mode for this process and the
        # Ray processes it starts (they inherit it), and a token if there is none yet.
        assert enable_token_auth_by_default(), "RAY_AUTH_MODE is set to something else than token"
        ensure_token_if_auth_enabled(None, create_token_if_missing=True)
        # The agent's port left to Ray (None): it picks a free one when another Ray holds
        # the default.
        ports = {"dashboard_port": port, "dashboard_agent_listen_port": None}
        head = {"num_cpus": 4, "dashboard_host": "127.0.0.1", **ports}
        cluster = Cluster(initialize_head=True, head_node_args=head)
        try:
            yield f"http://{cluster.head_node.webui_url}"
        finally:
            cluster.shutdown()


def submit(
    address: str, download: Path, *command: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    """scripts/submit.py as a user runs it: the repository as working dir, results to
    ``download``."""
    argv = [sys.executable, str(SUBMIT), "--address", address, "--working-dir", str(REPO)]
    argv += ["--download", str(download), "--", *command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_raycv_job_runs_and_its_run_folder_is_fetched(jobs_api, tmp_path):
    storage = tmp_path / "runs"
    command = ["raycv", "train", "configs/smoke.yaml", "--local", "train.epochs=1"]
    command += ["data.shapes.num_images=64", f"run.storage={storage}"]
    result = submit(jobs_api, tmp_path / "fetched", *command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SUCCEEDED" in result.stderr
    assert "final train loss" in result.stdout  # the job's own output was followed
    fetched = Path(result.stdout.strip().splitlines()[-1])
    assert fetched.parent == tmp_path / "fetched"
    remote = storage / "smoke" / fetched.name  # where the job wrote it
    assert fetched.name.startswith("train-") and remote.is_dir()
    assert files_under(fetched) == files_under(remote)
    manifest = json.loads((fetched / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["metrics"]["final"]["epoch"] == 1


def test_a_failed_job_exits_nonzero_and_fetches_nothing(jobs_api, tmp_path):
    result = submit(jobs_api, tmp_path / "fetched", "raycv", "train", "configs/no-such.yaml")
    assert result.returncode == 1
    assert "FAILED" in result.stderr
    assert "no-such.yaml" in result.stdout + result.stderr  # raycv's own error was followed
    assert not (tmp_path / "fetched").exists()


def test_a_run_folder_on_a_storage_uri_is_copied_with_pyarrow(jobs_api, tmp_path):
    run = tmp_path / "bucket" / "exp" / "train-1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "manifest.json").write_text('{"kind": "train"}')
    (run / "checkpoints" / "model.pt").write_bytes(os.urandom(1000))
    job = f"print('progress line'); print('file://{run}')"
    result = submit(jobs_api, tmp_path / "fetched", "python", "-c", job)
    assert result.returncode == 0, result.stderr[-3000:]
    fetched = tmp_path / "fetched" / "train-1"
    assert result.stdout.strip().splitlines()[-1] == str(fetched)
    assert files_under(fetched) == ["checkpoints/model.pt", "manifest.json"]
    model = "checkpoints/model.pt"
    assert (fetched / model).read_bytes() == (run / model).read_bytes()


def test_a_run_folder_only_the_head_has_is_located_not_fetched(jobs_api, tmp_path):
    elsewhere = "/nonexistent-raycv-head/runs/exp/train-9"
    result = submit(jobs_api, tmp_path / "fetched", "python", "-c", f"print({elsewhere!r})")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == elsewhere
    assert f"ray rsync-down CLUSTER_YAML {elsewhere}/" in result.stderr
    assert not (tmp_path / "fetched").exists()


def test_a_wrong_token_is_refused(jobs_api, tmp_path):
    env = {**os.environ, "RAY_AUTH_TOKEN": "not-the-token"}
    result = submit(jobs_api, tmp_path / "fetched", "python", "-c", "print(1)", env=env)
    assert result.returncode == 1
    assert "could not submit" in result.stderr
    assert "Authentication failed" in result.stderr
    assert "~/.ray/auth_token" in result.stderr  # the hint names where the token comes from


def test_help_explains_every_option():
    spec = importlib.util.spec_from_file_location("submit", SUBMIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = module.build_parser()
    shown = subprocess.run(
        [sys.executable, str(SUBMIT), "--help"], capture_output=True, text=True, check=True
    ).stdout
    for action in parser._actions:
        assert action.help and len(action.help) > 15, action.dest
        for option in action.option_strings:
            assert option in shown
    assert "Exit status" in shown and "RAY_AUTH_MODE" in shown
