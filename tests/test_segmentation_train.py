"""Segmentation trains end to end with Ray Train: two DDP workers on shapes with per-pixel
masks (configs/seg_smoke.yaml), the task's metrics recorded and checkpointed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from raycv import checkpoint
from raycv.config import load_config
from raycv.data.pipeline import build_streams
from raycv.runs import read_metrics
from raycv.train import run_train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 8  # 0.36-0.40 val mIoU (augmentation draws differ per run), background-only 0.19
# "Far above background": 1.6x its mIoU. CI runs reached 0.370 at 8 epochs, 2.0x the floor;
# a threshold inside the spread of runs would fail on a fair run.
ABOVE_FLOOR = 1.6


@pytest.fixture(scope="module")
def seg_run(ray_local, tmp_path_factory):
    storage = tmp_path_factory.mktemp("seg")
    cfg = load_config(
        REPO / "configs" / "seg_smoke.yaml",
        [
            f"run.storage={storage}",
            "data.shapes.num_images=400",
            f"train.epochs={EPOCHS}",
            "optimizer.lr=3.0e-3",
            "augment.rotation=10",
        ],
    )
    return cfg, run_train(cfg)


def background_only_miou(cfg) -> float:
    """The mIoU of a model that says "background" everywhere, on the same val split: the
    background's IoU is its pixel share, every other class scores 0."""
    streams = build_streams(cfg)
    masks = np.concatenate([b["mask"] for b in streams.val.iter_batches(batch_format="numpy")])
    return float((masks == 0).mean()) / len(streams.class_names)


def test_two_workers_learn_far_beyond_background(seg_run):
    cfg, run = seg_run
    history = read_metrics(run.metrics)
    assert [m["epoch"] for m in history] == list(range(1, EPOCHS + 1))
    assert len(history[-1]["worker_nodes"]) == 2
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    floor = background_only_miou(cfg)
    assert 0.1 < floor < 0.25
    best = json.loads(run.manifest.read_text())["metrics"]["best"]
    assert best["val_miou"] > ABOVE_FLOOR * floor, (best["val_miou"], floor)
    assert best["val_pixel_acc"] > (floor * 4)  # more pixels right than background holds
    names = ["background", "circle", "square", "triangle"]
    assert all(f"val_iou/{name}" in best for name in names)


def test_checkpoint_holds_the_task_and_its_best_metric(seg_run):
    cfg, run = seg_run
    manifest = json.loads(run.manifest.read_text())
    assert manifest["task"] == "segmentation" and manifest["metric"] == "val_miou"
    saved = checkpoint.checkpoint_epochs(run.checkpoints)
    state = checkpoint.load(saved[EPOCHS])
    assert state["epoch"] == EPOCHS
    assert state["class_names"] == ["background", "circle", "square", "triangle"]
    assert state["config"]["task"] == "segmentation"
    best = checkpoint.load(run.best)
    assert best["metrics"]["val_miou"] == manifest["metrics"]["best"]["val_miou"]
    assert cfg.checkpoint.metric == "val_miou" and cfg.tune.objective.metric == "val_miou"


BALLOON = REPO.parent / "shared" / "data" / "balloon"


@pytest.mark.skipif(not BALLOON.is_dir(), reason="needs ../shared/data/balloon (real photos)")
def test_seg_folder_recipe_reads_real_photos_as_it_is(ray_local, tmp_path):
    """configs/seg_folder.yaml on the balloon photos with nothing set but the root (and one
    epoch): the layout, classes and masks are found, and a val mIoU is recorded."""
    cfg = load_config(
        REPO / "configs" / "seg_folder.yaml",
        [f"data.mask_folder.root={BALLOON}", "train.epochs=1", f"run.storage={tmp_path}"],
    )
    run = run_train(cfg, local=True)
    (row,) = read_metrics(run.metrics)
    assert 0 <= row["val_miou"] <= 1 and "val_iou/balloon" in row
    manifest = json.loads(run.manifest.read_text())
    assert manifest["skipped_files"] == []
    assert checkpoint.load(run.best)["class_names"] == ["background", "balloon"]
