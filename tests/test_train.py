"""Ray Train runs end to end on the built-in shapes data: DDP, local mode, pruning, eval.
(A driver killed and resumed with --resume: tests/test_storage_s3.py.)"""

from __future__ import annotations

import json
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
    """One 2-worker DDP run shared by the tests that inspect its outputs; each worker runs
    the train preset itself (augment.where=worker: the stream carries working-size images)."""
    storage = tmp_path_factory.mktemp("ddp")
    # ResNet-18 from scratch needs ~10k samples before it beats chance by a wide margin.
    cfg = from_dict(
        smoke_at(
            storage,
            data={"shapes": {"num_images": 3000, "image_size": 32, "num_classes": 4}},
            train={"epochs": 5, "batch_size": 64},
            scaling={"num_workers": 2},
            augment={"where": "worker"},
        )
    )
    assert cfg.augments_on_worker
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


def _val_metrics(cfg, weights: dict, class_names: list[str]) -> dict[str, float]:
    """``weights`` scored on the run's validation split in this process, as the loop does."""
    import torch

    from raycv.compress.measure import tensors
    from raycv.data.pipeline import build_streams
    from raycv.loop import build_model
    from raycv.tasks import build_task

    model = build_model(cfg, len(class_names))
    model.load_state_dict(weights)
    task = build_task(cfg, class_names)
    meter = task.evaluator()
    with torch.no_grad():
        for b in build_streams(cfg).val.iter_batches(batch_size=16, batch_format="numpy"):
            batch = tensors(b, cfg.augment)
            outputs = task.forward(model.eval(), batch)
            meter.process(batch, outputs, task.loss(outputs, batch))
    return meter.evaluate("val")


def test_a_weight_average_is_what_validation_scores_and_the_checkpoint_keeps(ray_local, smoke):
    """train.ema_decay: the checkpoint's "model" is the average (what eval, export and
    --from load), "trained" the optimizer's weights a resume goes on from; the recorded
    val_loss is the average's, not the trained weights'."""
    cfg = from_dict(smoke(train={"epochs": 2, "ema_decay": 0.8}))
    run = run_train(cfg, local=True)
    saved = checkpoint.load(checkpoint.checkpoint_epochs(run.checkpoints)[2])
    recorded = read_metrics(run.metrics)[-1]["val_loss"]
    averaged = _val_metrics(cfg, saved["model"], saved["class_names"])["val_loss"]
    trained = _val_metrics(cfg, saved["trained"], saved["class_names"])["val_loss"]
    assert averaged == pytest.approx(recorded, rel=1e-4)
    assert abs(trained - recorded) > 1e-3 * recorded  # a different model, scored apart


def test_the_summary_says_how_long_the_epochs_waited_for_their_first_batch():
    from raycv.train import first_batches, summary_table

    history = [
        {"epoch": 3, "first_batch_s": 12.34, "val_acc": 0.5},  # resumed: epoch 3 came first
        {"epoch": 4, "first_batch_s": 0.21, "val_acc": 0.6},
        {"epoch": 5, "first_batch_s": 0.48, "val_acc": 0.7},
    ]
    assert first_batches(history) == "12.3 s (epoch 3), later epochs 0.2-0.5 s"
    assert first_batches(history[:1]) == "12.3 s (epoch 3)"
    assert first_batches(history[:2]) == "12.3 s (epoch 3), later epochs 0.2 s"
    assert first_batches([{"epoch": 1}]) == "-"  # a run recorded before the key existed
    table = summary_table(history, history[-1], [], "val_acc")
    assert "  first batch               12.3 s (epoch 3), later epochs 0.2-0.5 s" in table


UNPICKLE_ELSEWHERE = """
import pickle, sys
pickle.loads(sys.stdin.buffer.read())
print(",".join(m for m in sys.argv[1:] if m in sys.modules))
"""


def test_the_train_controller_gets_the_loop_without_importing_it(tmp_path):
    """Ray Train's controller unpickles the train function and the callbacks before it
    starts the workers: what it gets must not import the loop and its torchvision,
    torch-pruning, timm or torchmetrics (about 3 s on the way to the first step). The
    workers import the loop where they run it."""
    import ray.cloudpickle

    from raycv.controller import RecordReports, train_func
    from raycv.loop import recorder
    from raycv.runs import RunFolder
    from raycv.sweep.report import ReportToTune  # built only inside Tune: its class, then

    reports = RecordReports(recorder(from_dict({}), RunFolder(tmp_path)))
    shipped = ray.cloudpickle.dumps([train_func, reports, ReportToTune])
    heavy = ["raycv.loop", "torchvision", "torch_pruning", "timm", "torchmetrics"]
    assert imported_elsewhere(UNPICKLE_ELSEWHERE, heavy, shipped) == ""


DRIVER = """
import sys
from raycv import cli, pipeline, train
from raycv.config import load_config
for name in ("quickstart", "det_quickstart", "seg_quickstart", "sweep"):
    load_config(f"configs/{name}.yaml", ["prune.ratio=0.3"])  # quickstart: int8 too
print(",".join(m for m in sys.argv[1:] if m in sys.modules))
"""


def test_a_command_validates_its_config_without_the_workers_imports():
    """Every command's driver validates its config against the registries (models,
    pruners, quantizers) before it starts Ray: the registries must not import what only
    building or running their entries needs (torchvision's ops import torch._dynamo,
    torch-pruning timm, the quantizers torchao with inductor: 2.5-4 s of a command's
    start on 2 cores). Nor does the train command's driver draw a plot before training."""
    heavy = ["torchvision", "torch._dynamo", "torch_pruning", "timm", "torchao", "matplotlib"]
    assert imported_elsewhere(DRIVER, heavy) == ""


def imported_elsewhere(script: str, modules: list[str], stdin: bytes = b"") -> str:
    """Which of ``modules`` ``script`` (which prints them, comma-separated) imported when run
    in a fresh Python from the repository's root, fed ``stdin``."""
    import subprocess
    import sys

    return (
        subprocess.run(
            [sys.executable, "-c", script, *modules],
            cwd=REPO,
            input=stdin,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .strip()
    )
