"""What a raycv command prints by default: its own lines, the dashboard address once, none of
Ray's start-up warnings or internal notices; --verbose (or RAYCV_LOG_LEVEL=debug) brings
them back. Real commands in processes of their own, each with its own local Ray."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
TINY = ["data.shapes.num_images=96", "train.batch_size=16", "model.image_size=32"]


def run(*args: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "raycv", *args, f"run.storage={tmp_path / 'runs'}"]
    return subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )


@pytest.fixture
def quiet_env(ray_env):
    """A fresh process's environment: no cluster to join, no log level set by this one."""
    unset = ("RAY_ADDRESS", "RAY_DEDUP_LOGS_SKIP_REGEX", "RAYCV_LOG_LEVEL")
    with ray_env() as env:
        yield {k: v for k, v in env.items() if k not in unset}


@pytest.mark.slow
def test_a_default_run_prints_its_own_lines_and_none_of_rays(quiet_env, tmp_path, ray_noise):
    done = run("train", str(SMOKE), *TINY, env=quiet_env, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout + done.stderr
    assert not ray_noise(printed), "\n".join(ray_noise(printed))
    assert printed.count("dashboard: http://127.0.0.1:") == 1
    assert "epoch 2/2 |" in printed  # the controller's progress lines still come through
    assert done.stdout.strip().splitlines()[-1].startswith(str(tmp_path / "runs"))


def test_verbose_brings_rays_own_lines_back(quiet_env, tmp_path):
    done = run("train", str(SMOKE), *TINY, "--local", "--verbose", env=quiet_env, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Started a local Ray instance" in done.stdout + done.stderr


def test_a_bad_log_level_is_one_line_before_anything_starts(quiet_env, tmp_path):
    env = {**quiet_env, "RAYCV_LOG_LEVEL": "loud"}
    done = run("train", str(SMOKE), env=env, tmp_path=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: RAYCV_LOG_LEVEL='loud' is not a level; use one of debug, info, warning, error"
    )
    assert not (tmp_path / "runs").exists()


def test_every_command_takes_verbose():
    from raycv.cli import build_parser

    parser = build_parser()
    for argv in (["train", "c.yaml"], ["pipeline", "c.yaml"], ["data", "preview", "c.yaml"]):
        assert parser.parse_args([*argv, "--verbose"]).verbose is True
        assert parser.parse_args(argv).verbose is False


def test_quiet_runs_hide_rays_repeated_notices_but_not_its_errors():
    from raycv.verbosity import CORE_NOTICES

    hidden = (
        "[2026-12-05 05:54:40,456 E 11085 11096] (raylet) file_system_monitor.cc:116: "
        "/tmp/ray/session_x is over 95% full, available space: 11.8 GB; capacity: 251.9 GB.",
        "[2026-12-05 05:54:40,456 W 11085 11096] core_worker.cc:512: a warning",
    )
    shown = "[2026-12-05 05:54:40,456 E 11085 11096] core_worker.cc:900: Failed to allocate"
    assert all(re.search(CORE_NOTICES, line) for line in hidden)
    assert not re.search(CORE_NOTICES, shown)
