"""Detection trains end to end with Ray Train: two DDP workers on shapes with a box per shape
(configs/det_smoke.yaml), mAP scored once per epoch across both, recorded and checkpointed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raycv import checkpoint
from raycv.config import load_config
from raycv.runs import read_metrics
from raycv.train import run_train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def det_run(ray_local, tmp_path_factory):
    storage = tmp_path_factory.mktemp("det")
    cfg = load_config(REPO / "configs" / "det_smoke.yaml", [f"run.storage={storage}"])
    return run_train(cfg)


def test_two_workers_train_and_score_map(det_run):
    run = det_run
    history = read_metrics(run.metrics)
    assert [m["epoch"] for m in history] == [1, 2]
    assert len(history[-1]["worker_nodes"]) == 2
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # torchvision's loss parts are logged one by one.
    assert {"train_loss/loss_classifier", "train_loss/loss_box_reg"} <= set(history[-1])
    for m in history:
        assert 0 <= m["val_map"] <= m["val_map50"] <= 1
        assert all(f"val_ap/{c}" in m for c in CLASSES)
        assert 0 < m["val_metric_s"] < m["val_s"]  # mAP's scoring, inside the timed pass


def test_checkpoint_holds_the_task_and_its_best_map(det_run):
    run = det_run
    manifest = json.loads(run.manifest.read_text())
    assert manifest["task"] == "detection" and manifest["metric"] == "val_map"
    state = checkpoint.load(checkpoint.checkpoint_epochs(run.checkpoints)[2])
    assert state["epoch"] == 2 and state["class_names"] == CLASSES
    best = checkpoint.load(run.best)
    assert best["metrics"]["val_map"] == manifest["metrics"]["best"]["val_map"]


def test_eval_of_the_checkpoint_scores_the_validation_split_and_draws(det_run):
    """raycv eval scores the best checkpoint on the validation split and draws the
    precision-recall curve and the worst images. Its mAP is not compared with training's:
    this two-epoch detector's boxes score near its threshold, and the workers' one thread
    against eval's two rounds them differently (0.021 against 0.076 in one CI run)."""
    from raycv.evaluate import run_eval

    overrides = [f"run.storage={det_run.path.parent}", "train.batch_size=4"]
    run = run_eval(str(det_run.best), overrides)
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert 0 <= metrics["map"] <= metrics["map50"] <= 1
    assert set(metrics["per_class_ap"]) == set(CLASSES)
    assert metrics["images"] == 16 and metrics["boxes"] >= 16
    assert 0 <= metrics["worst"][0]["f1"] <= metrics["worst"][-1]["f1"] <= 1
    for picture in ("pr_curve.png", "worst.png"):
        assert (run.path / "plots" / picture).stat().st_size > 10_000


def test_predict_writes_boxes_in_each_files_pixels_and_an_overlay(det_run, tmp_path):
    """Photos of other sizes than the training squares, and a file that is no image: every
    good one gets an overlay of its own size and its detections within its own frame."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from raycv.data import shapes
    from raycv.predict import run_predict

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, size in enumerate([(96, 64), (50, 80)]):
        drawn = shapes.render(i, image_size=64, num_classes=3, difficulty="easy", seed=5)
        Image.fromarray(drawn["image"]).resize(size).save(photos / f"p{i}.png")
    (photos / "broken.jpg").write_bytes(b"not a picture")
    run = run_predict(det_run.best, [str(photos)], run=None)
    table = pq.read_table(run.path / "predictions.parquet").to_pylist()
    assert [Path(r["path"]).name for r in table] == ["broken.jpg", "p0.png", "p1.png"]
    assert table[0]["error"] and table[0]["overlay"] == "" and table[0]["boxes"] == []
    for row, (width, height) in zip(table[1:], [(96, 64), (50, 80)]):
        assert row["error"] == ""
        assert Image.open(run.path / row["overlay"]).size == (width, height)
        boxes = np.array(row["boxes"]).reshape(-1, 4)
        assert ((boxes >= 0) & (boxes <= [width, height, width, height])).all()
        assert len(row["classes"]) == len(row["scores"]) == len(boxes)
        assert set(row["classes"]) <= set(CLASSES)
        assert row["scores"] == sorted(row["scores"], reverse=True)
        assert row["count"] == sum(s >= 0.5 for s in row["scores"])
    assert "p0.png" in (run.path / "predictions.csv").read_text()
    coco = json.loads((run.path / "detections.json").read_text())
    assert len(coco) == sum(len(r["boxes"]) for r in table)
    for entry in coco:
        row = table[entry["image_id"]]
        assert entry["file_name"] == row["path"] and entry["category"] in row["classes"]
        x, y, w, h = entry["bbox"]
        assert any(np.allclose([x, y, x + w, y + h], box) for box in row["boxes"])


def test_finetune_from_the_run_keeps_its_body_and_trains_on(det_run, tmp_path):
    """raycv finetune --from a detection run: the new run's epoch-1 checkpoint starts from
    the source's weights (its box predictor built fresh for the same classes), and records
    where it came from."""
    from raycv.cli import main

    storage = tmp_path / "runs"
    config = str(REPO / "configs" / "det_smoke.yaml")
    args = ["finetune", config, "--from", str(det_run.best), "--local", "train.epochs=1"]
    assert main([*args, f"run.storage={storage}"]) == 0
    [run] = (storage / "det_smoke").glob("finetune-*")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["parent"].startswith(str(det_run.path))
    assert 0 <= manifest["metrics"]["best"]["val_map"] <= 1
    tuned = checkpoint.load(run / "best")["model"]
    source = checkpoint.load(det_run.best)["model"]
    # One epoch at a fine-tuning rate moves the weights a little, not back to random.
    key = "backbone.body.0.0.weight"
    drift = (tuned[key] - source[key]).norm() / source[key].norm()
    assert 0 < drift < 0.5
