"""What a raycv command prints by default: its own lines, the dashboard address once, none of
Ray's start-up warnings or internal notices; --verbose (or RAYCV_LOG_LEVEL=debug) brings
them back; progress within an epoch as a bar on a terminal, as plain lines in a file. Real
commands in processes of their own, each with its own local Ray."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from raycv.runs import read_metrics
from raycv.session import physical_cores

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


def in_terminal(*args: str, env: dict[str, str], tmp_path: Path) -> tuple[int, str]:
    """Run a raycv command with a pseudo-terminal of 200 columns as its stdout and stderr,
    as in a user's tmux; returns the exit status and everything the terminal received."""
    command = [sys.executable, "-m", "raycv", *args, f"run.storage={tmp_path / 'runs'}"]
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=child, stderr=child)
    os.close(child)
    received = b""
    while True:
        ready, _, _ = select.select([parent], [], [], 1.0)
        chunk = _read(parent) if ready else b""
        received += chunk
        if (ready and not chunk) or (not ready and proc.poll() is not None):
            break
    os.close(parent)
    return proc.wait(timeout=600), received.decode(errors="replace")


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # the terminal's other end closed: the command exited
        return b""


# One run: 800 images in batches of 8 on one worker, 100 steps of several ms each.
STEPS = ["data.shapes.num_images=1000", "train.batch_size=8", "train.epochs=1"]
STEPS += ["scaling.num_workers=1", "scaling.cpus_per_worker=2"]


@pytest.mark.slow
def test_a_terminal_shows_a_bar_that_advances_within_the_epoch(quiet_env, tmp_path):
    status, shown = in_terminal("train", str(SMOKE), *STEPS, env=quiet_env, tmp_path=tmp_path)
    assert status == 0, shown[-3000:]
    # Each frame of the worker's bar, drawn by the driver: "epoch 1/1 train | ... 37/100 steps"
    train = [int(n) for n in re.findall(r"epoch 1/1 train \|[^\r\n]*? (\d+)/100 steps", shown)]
    assert len({n for n in train if 0 < n < 100}) >= 3, shown[-3000:]  # moved within the epoch
    assert train == sorted(train) and train[-1] == 100
    assert re.search(r"epoch 1/1 train \| loss \d\.\d{4} \| \d+ img/s \| data wait \d+%", shown)
    assert re.search(r"epoch 1/1 val \| loss [^\r\n]* 25/25 steps", shown)  # 200 images / 8
    assert "epoch 1/1 | loss" in shown  # the controller's epoch line, above the bars
    blank = re.findall(r"\(RayTrainWorker pid=\d+\)(?:\x1b\[0m)? \r?\n", shown)
    assert not blank  # each bar state reached the driver once, as a bar, not as a log line


@pytest.mark.slow
def test_a_default_run_prints_its_own_lines_and_none_of_rays(quiet_env, tmp_path, ray_noise):
    # Piped to files: the epoch's progress as plain lines, not a bar's carriage returns.
    lines = ["run.progress_every_s=0.01", "train.batch_size=8"]
    done = run("train", str(SMOKE), *TINY, *lines, env=quiet_env, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout + done.stderr
    assert not ray_noise(printed), "\n".join(ray_noise(printed))
    assert printed.count("dashboard: http://127.0.0.1:") == 1
    assert f"logical CPUs on {physical_cores()} physical cores; dashboard" in printed
    assert "oversubscribed" not in printed or physical_cores() < 2  # 2 workers x 1 CPU
    assert "epoch 2/2 |" in printed  # the controller's progress lines still come through
    assert done.stdout.strip().splitlines()[-1].startswith(str(tmp_path / "runs"))
    assert "\r" not in printed and "\x1b[" not in printed  # no bar, no colour codes
    steps = re.findall(r"epoch 2/2 train \| step (\d+)/(\d+) \| loss \d", printed)
    assert steps and all(total == "9" for _, total in steps), printed[-3000:]  # 76 / 8
    assert [int(n) for n, _ in steps] == sorted(int(n) for n, _ in steps)


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


def test_progress_lines_count_steps_images_and_the_running_loss(caplog):
    import torch

    from raycv.progress import EpochProgress

    shown = EpochProgress("lines", "train", "3/5", total=4, every_s=0.0)
    with caplog.at_level(logging.INFO, logger="raycv.progress"):
        shown.step(16, waited=0.0, loss=torch.tensor(2.0))
        shown.step(16, waited=0.0, loss=torch.tensor(1.0))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("epoch 3/5 train | step 1/4 | loss 2.0000 | ")
    assert lines[1].startswith("epoch 3/5 train | step 2/4 | loss 1.5000 | ")  # the mean so far
    assert re.search(r"\| \d+ img/s \| data wait 0%$", lines[1])
    unscored = EpochProgress("lines", "val", "3/5", total=2, every_s=0.0)  # a detector's eval
    with caplog.at_level(logging.INFO, logger="raycv.progress"):
        unscored.step(16, waited=0.0, loss=None)
    assert re.fullmatch(
        r"epoch 3/5 val \| step 1/2 \| \d+ img/s \| data wait 0%", caplog.records[-1].getMessage()
    )


def test_no_progress_for_sweep_trials_or_a_quiet_log_level(monkeypatch, caplog):
    import torch

    from raycv.progress import EpochProgress, mode

    assert mode(enabled=False) == "off"
    monkeypatch.setenv("RAYCV_LOG_LEVEL", "warning")
    assert mode(enabled=True) == "off"
    monkeypatch.setenv("RAYCV_LOG_LEVEL", "info")
    assert mode(enabled=True) in ("bar", "lines")
    shown = EpochProgress("off", "val", "1/1", total=2, every_s=0.0)
    with caplog.at_level(logging.DEBUG):
        shown.step(8, waited=0.1, loss=torch.tensor(1.0))
        shown.close()
    assert not caplog.records


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_and_resume_goes_on(quiet_env, tmp_path, ray_noise):
    # A terminal's Ctrl-C: SIGINT to the whole process group (the driver and its local Ray).
    args = ["train", str(SMOKE), *TINY, "train.epochs=3", "train.batch_size=8"]
    command = [sys.executable, "-m", "raycv", *args, f"run.storage={tmp_path / 'runs'}"]
    log = tmp_path / "train.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            command,
            env=quiet_env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 300
        while "epoch 1/3 |" not in log.read_text() and time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        status = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    printed = log.read_text()
    assert status == 130, printed[-3000:]
    assert printed.strip().splitlines()[-1] == (
        "interrupted: finished epochs and trials are saved; add --resume to continue"
    )
    assert not ray_noise(printed), "\n".join(ray_noise(printed))
    (folder,) = (tmp_path / "runs" / "smoke").iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert (folder / manifest["paths"]["best_checkpoint"] / "checkpoint.pt").is_file()

    done = run(*args, "--resume", env=quiet_env, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    epochs = [row["epoch"] for row in read_metrics(folder / "metrics.jsonl")]
    assert epochs == [1, 2, 3]  # each once: the interrupted epoch again, none twice
    assert json.loads((folder / "manifest.json").read_text())["status"] == "finished"


def test_a_run_that_oversubscribes_the_cores_says_by_how_much_at_its_start(quiet_env, tmp_path):
    cores = physical_cores()
    scaling = [f"scaling.num_workers={4 * cores}", "scaling.cpus_per_worker=2"]
    done = run("doctor", str(SMOKE), *scaling, env=quiet_env, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    start = f"warning: the workers take {8 * cores} CPUs ({4 * cores} x 2) on {cores} physical "
    assert f"{start}cores, 8.0x oversubscribed" in done.stdout + done.stderr
