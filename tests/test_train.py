"""Ray Train runs end to end on the built-in shapes data: DDP, local mode, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from raycv import checkpoint
from raycv.config import from_dict
from raycv.evaluate import run_eval, run_preview
from raycv.runs import read_metrics
from raycv.train import run_train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ddp_run(ray_local, tmp_path_factory, smoke_at):
    """One 2-worker DDP run shared by the tests that inspect its outputs."""
    storage = tmp_path_factory.mktemp("ddp")
    # ResNet-18 from scratch needs ~10k samples before it beats chance by a wide margin.
    cfg = from_dict(
        smoke_at(
            storage,
            data={"shapes": {"num_images": 3000, "image_size": 32, "num_classes": 4}},
            train={"epochs": 5, "batch_size": 64},
            scaling={"num_workers": 2},
        )
    )
    return cfg, run_train(cfg)


def test_ddp_two_workers_learns_and_saves_everything(ddp_run):
    cfg, run = ddp_run
    history = read_metrics(run.metrics)
    assert [m["epoch"] for m in history] == [1, 2, 3, 4, 5]
    assert len(history[-1]["worker_nodes"]) == 2
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    manifest = json.loads(run.manifest.read_text())
    assert manifest["kind"] == "train" and manifest["status"] == "finished"
    chance = 1 / cfg.data.shapes.num_classes
    assert manifest["metrics"]["best"]["val_acc"] > chance + 0.3
    # keep=1: Ray keeps the latest checkpoint; the best one is copied to best/.
    saved = checkpoint.checkpoint_epochs(run.checkpoints)
    assert list(saved) == [5]
    best = manifest["metrics"]["best"]
    assert checkpoint.load(run.best)["metrics"]["val_acc"] == best["val_acc"]
    assert checkpoint.load(run.best)["epoch"] == best["epoch"]
    state = checkpoint.load(saved[5])
    assert state["epoch"] == 5 and state["class_names"] == ["circle", "square", "triangle", "star"]
    assert from_dict(state["config"]) == cfg
    for rel in manifest["paths"].values():
        assert (run.path / rel).exists(), rel
    assert from_dict(yaml.safe_load(run.config.read_text())) == cfg


def test_eval_measures_the_best_checkpoint(ddp_run):
    cfg, run = ddp_run
    result = run_eval(str(run.path), [])
    metrics = json.loads((result.path / "metrics.json").read_text())
    best = json.loads(run.manifest.read_text())["metrics"]["best"]
    matrix = np.array(metrics["confusion_matrix"])
    # The same deterministic eval preset on the same split: the same accuracy, up to the
    # rows an equal split over 2 workers drops.
    assert matrix.sum() == round(cfg.data.shapes.num_images * cfg.data.val_fraction)
    assert abs(metrics["acc"] - best["val_acc"]) <= 2 / matrix.sum()
    assert metrics["acc"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert (result.plots / "confusion.png").stat().st_size > 0
    assert json.loads(result.manifest.read_text())["parent"] == str(run.best / "checkpoint.pt")


def test_data_preview_writes_a_grid(ray_local, smoke):
    result = run_preview(from_dict(smoke()), count=8)
    assert (result.plots / "preview.png").stat().st_size > 10_000
    assert json.loads(result.manifest.read_text())["kind"] == "preview"


def test_local_mode_runs_in_process_and_keeps_checkpoints(ray_local, smoke):
    cfg = from_dict(smoke(train={"epochs": 2}))
    run = run_train(cfg, local=True)

    history = read_metrics(run.metrics)
    assert [m["epoch"] for m in history] == [1, 2]
    assert history[0]["worker_nodes"] == [history[0]["worker_nodes"][0]]
    saved = checkpoint.checkpoint_epochs(run.checkpoints)
    assert checkpoint.load(saved[max(saved)])["epoch"] == 2
    assert (run.plots / "curves.png").stat().st_size > 0


def test_pruned_run_reports_smaller_model_and_its_checkpoint_evaluates(ray_local, smoke):
    """prune.ratio in a plain training run: the model trains pruned, reports its smaller
    size, and its checkpoint loads into a freshly built model for eval."""
    cfg = from_dict(smoke(train={"epochs": 1}, prune={"method": "channel", "ratio": 0.5}))
    run = run_train(cfg, local=True)
    pruned = read_metrics(run.metrics)[-1]
    dense = from_dict(smoke())
    from raycv.loop import build_model
    from raycv.model_stats import count_macs

    full = build_model(dense, 4)
    assert pruned["macs"] < 0.35 * count_macs(full, 32)
    assert pruned["params"] < 0.35 * sum(p.numel() for p in full.parameters())
    result = run_eval(str(run.path), [])
    metrics = json.loads((result.path / "metrics.json").read_text())
    assert metrics["acc"] == pytest.approx(pruned["val_acc"], abs=0.02)


def _train_command(storage: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "raycv", "train", str(REPO / "configs" / "smoke.yaml"),
        f"run.storage={storage}", "train.epochs=4", "scaling.num_workers=1",
        "data.shapes.num_images=400", *extra,
    ]  # fmt: skip


def test_driver_killed_mid_run_resumes_from_saved_epoch(tmp_path):
    """Kill the whole driver process group after epoch 2 is saved; --resume finishes the
    run from there with the right epoch count and an unbroken metrics history."""
    # A short Ray temp dir: its unix socket paths must stay under 107 characters.
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        _kill_and_resume(tmp_path, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _kill_and_resume(tmp_path: Path, ray_tmp: str) -> None:
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    log = tmp_path / "first.log"  # a file, not a pipe: nobody drains a pipe while we wait
    with log.open("w") as out:
        first = subprocess.Popen(
            _train_command(tmp_path), env=env, start_new_session=True, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        metrics = _wait_for_epoch(tmp_path, first, epoch=2, log=log)
    finally:  # also when the wait fails: no training may outlive the test
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    before = read_metrics(metrics)
    assert before and before[-1]["epoch"] < 4

    resumed = subprocess.run(
        [*_train_command(tmp_path), "--resume"], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    run_dir = Path(resumed.stdout.strip().splitlines()[-1])
    assert run_dir == metrics.parent
    after = read_metrics(metrics)
    assert [m["epoch"] for m in after] == [1, 2, 3, 4]
    # Epochs finished before the kill are not trained again.
    saved_epoch = max(m["epoch"] for m in before)
    for old, new in zip(before[:saved_epoch], after[:saved_epoch]):
        assert old["epoch_started_at"] == new["epoch_started_at"]
    assert checkpoint.load(checkpoint.checkpoint_epochs(run_dir / "checkpoints")[4])["epoch"] == 4


def _wait_for_epoch(
    storage: Path, proc: subprocess.Popen, epoch: int, log: Path, timeout: float = 420
) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(storage.glob("smoke/train-*/metrics.jsonl"))
        if found and len(read_metrics(found[0])) >= epoch:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"training exited early:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"epoch {epoch} was not reported within {timeout} s")
