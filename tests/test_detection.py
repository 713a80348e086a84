"""Detection without Ray: boxes padded through the presets, the task's forward passes on a real
torchvision detector, and mAP that two workers with uneven numbers of boxes agree on."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raycv.config import AugmentConfig, ConfigError, from_dict, load_config
from raycv.data import shapes
from raycv.data.augment import build_preset
from raycv.data.boxes import box_iou, mask_box
from raycv.data.decoders import padded_boxes
from raycv.models import create_model
from raycv.tasks import build_task

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "triangle"]


def det_task(**model):
    cfg = from_dict({"task": "detection", "model": {"image_size": 64, **model}})
    return cfg, build_task(cfg, CLASSES)


# ------------------------------------------------------------------ config


def test_detection_defaults_to_a_detector_and_its_metric():
    cfg, _ = det_task()
    assert cfg.model.name == "fasterrcnn_mobilenet_v3_large_320_fpn"
    assert cfg.checkpoint.metric == "val_map" and cfg.checkpoint.mode == "max"
    assert cfg.tune.objective.metric == "val_map"


def test_a_preset_that_drops_boxes_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^augment.train_preset=classic_v2 does not move boxes"):
        load_config(None, ["task=detection", "augment.train_preset=classic_v2"])


def test_a_classifier_is_refused_for_detection():
    with pytest.raises(ConfigError, match=r"model\.name=resnet18 is a classification model"):
        load_config(None, ["task=detection", "model.name=resnet18"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("compress.quantize=int8", r"^compress\.quantize: yolo_n does not quantize to int8 yet"),
        ("distill.teacher=runs/x", r"^distill\.teacher: task=detection has no distillation"),
        ("compress.student=yolo_n", r"^compress\.student: task=detection has no distillation"),
    ],
)
def test_what_detection_cannot_do_yet_is_refused_in_one_line(override, message, capsys, tmp_path):
    from raycv.cli import main

    config = str(REPO / "configs" / "det_pipeline_smoke.yaml")
    assert main(["pipeline", config, f"run.storage={tmp_path}", override]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert re.match(message, err.removeprefix("error: ").removeprefix("invalid config: "))
    assert not any(tmp_path.iterdir())  # refused before any work


# ------------------------------------------------------------------ data


def test_the_preview_outlines_each_box_in_its_class_colour_and_crowd_apart():
    from raycv.overlays import IGNORE_COLOUR, box_colours

    _, task = det_task()
    image = np.full((1, 3, 32, 32), 128, np.uint8)  # as a stream carries it
    boxes = np.zeros((1, 3, 4), np.float32)
    boxes[0, :2] = [[2, 2, 12, 12], [16, 16, 30, 30]]
    batch = {
        "image": image,
        "boxes": boxes,
        "labels": np.array([[2, 0, -1]]),
        "crowd": np.array([[False, True, False]]),
    }
    shown = task.preview(batch)
    assert shown.titles == ["1 triangle, 1 circle"]
    drawn = shown.images[0]
    assert tuple(drawn[2, 6]) == tuple(box_colours()[2])  # the top edge of the triangle's box
    assert tuple(drawn[16, 20]) == IGNORE_COLOUR  # the crowd box's
    assert tuple(drawn[8, 8]) == (128, 128, 128)  # inside stays as it was
    assert shown.legend == {
        "circle": (255, 0, 0),
        "square": (0, 255, 0),
        "triangle": (255, 255, 0),
        "ignored": IGNORE_COLOUR,
    }


def shapes_batch(n: int = 6, size: int = 64, max_boxes: int = 8) -> dict[str, np.ndarray]:
    """Rendered shapes with their boxes padded as the shapes source caches them."""
    samples = [
        shapes.render(i, image_size=size, num_classes=3, difficulty="easy", seed=1)
        for i in range(n)
    ]
    padded = [padded_boxes(s, size, max_boxes) for s in samples]
    return {
        "image": np.stack([s["image"] for s in samples]),
        "boxes": np.stack([b for b, _ in padded]),
        "labels": np.stack([lab for _, lab in padded]),
        "masks": [s["masks"] for s in samples],  # each object's visible pixels, for checking
    }


def test_padding_keeps_every_box_and_marks_the_rest():
    sample = shapes.render(3, image_size=64, num_classes=3, difficulty="easy", seed=1)
    boxes, labels = padded_boxes(sample, 128, 8)  # a working size twice the rendered one
    count = len(sample["labels"])
    assert boxes.shape == (8, 4) and labels.shape == (8,)
    assert (labels[:count] == sample["labels"]).all() and (labels[count:] == -1).all()
    np.testing.assert_allclose(boxes[:count], sample["boxes"] * 2)


def test_the_classic_preset_moves_boxes_with_their_shapes_and_keeps_the_padding():
    batch = shapes_batch()
    # No rotation: the box of a rotated box is larger than that of the rotated shape (the
    # tight case is tests/test_box_augment.py); here the padded columns' plumbing is checked.
    preset = build_preset("classic", AugmentConfig(rotation=0, scale=(0.5, 1.0)), 48)
    preset.seed = 5
    out = preset({k: v for k, v in batch.items() if k != "masks"})
    assert out["image"].shape == (6, 3, 48, 48) and out["boxes"].shape == (6, 8, 4)
    # The same draws move the main shape's mask: its box must match a moved box.
    masks = np.stack([m[0] for m in batch["masks"]])[..., None].repeat(3, axis=-1) * 255
    preset.seed = 5
    moved = preset({"image": masks.astype(np.uint8)})["image"][:, 0] > 127
    for i in range(6):
        kept = out["labels"][i] >= 0
        assert (out["labels"][i][~kept] == -1).all()  # padding stays at the end
        assert (out["boxes"][i][kept] >= 0).all() and (out["boxes"][i][kept] <= 48).all()
        main = mask_box(moved[i])
        if main is not None and kept.any():
            ious = [box_iou(b, main) for b in out["boxes"][i][kept]]
            assert max(ious) > 0.9, (i, ious)


def test_the_eval_preset_scales_every_box_with_the_whole_frame():
    batch = shapes_batch()
    preset = build_preset("eval", AugmentConfig(), 32, whole_frame=True)
    out = preset({k: v for k, v in batch.items() if k != "masks"})
    np.testing.assert_allclose(out["boxes"], batch["boxes"] / 2, atol=1e-5)
    assert (out["labels"] == batch["labels"]).all()


# ------------------------------------------------------------------ the task on a real model


def tensor_batch(n: int = 2) -> dict[str, torch.Tensor]:
    boxes = torch.zeros(n, 4, 4)
    labels = torch.full((n, 4), -1)
    boxes[:, 0] = torch.tensor([8.0, 8.0, 40.0, 40.0])
    labels[:, 0] = 2  # the last class: a background-shifted model must not overflow
    return {"image": torch.randn(n, 3, 64, 64), "boxes": boxes, "labels": labels}


@pytest.mark.parametrize(
    "name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large"]
)
def test_training_gives_named_losses_and_evaluation_detections_in_class_space(name):
    _, task = det_task(name=name)
    torch.manual_seed(0)
    model = create_model(name, len(CLASSES), None, 64)
    batch = tensor_batch()
    losses = task.loss(task.forward(model.train(), batch), batch)
    assert len(losses) >= 2 and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    with torch.no_grad():
        found = task.forward(model.eval(), batch)
    assert len(found) == 2 and task.loss(found, batch) == {}
    for d in found:
        assert d["boxes"].shape[1] == 4
        assert ((d["labels"] >= 0) & (d["labels"] < len(CLASSES))).all()


def test_crowd_boxes_neither_train_nor_count():
    _, task = det_task()
    batch = tensor_batch()
    batch["crowd"] = torch.zeros(2, 4, dtype=torch.bool)
    batch["crowd"][0, 0] = True
    truth = task.truth(batch)
    assert truth[0]["iscrowd"].tolist() == [1] and truth[1]["iscrowd"].tolist() == [0]


# ------------------------------------------------------------------ mAP across workers

# Ground truth of five images and detections for them: rank 0 holds images 0-3 (many boxes,
# one image without any detection), rank 1 holds image 4 alone.
IMAGES = 5


def _image(i: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(i)
    count = 1 + i % 3
    xy = torch.rand(count, 2, generator=g) * 40
    truth = torch.cat([xy, xy + 10 + torch.rand(count, 2, generator=g) * 10], dim=1)
    labels = torch.arange(count) % len(CLASSES)
    if i == 2:  # no detection at all for this image
        return {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": labels[:0]}, {
            "boxes": truth,
            "labels": labels,
        }
    jitter = torch.randn(count, 4, generator=g) * (0.5 + i)
    found = {"boxes": truth + jitter, "scores": torch.rand(count, generator=g), "labels": labels}
    return found, {"boxes": truth, "labels": labels}


def _padded(truth: dict, k: int = 4) -> dict[str, torch.Tensor]:
    """One image's truth as a padded batch of one."""
    boxes, labels = torch.zeros(1, k, 4), torch.full((1, k), -1)
    boxes[0, : len(truth["labels"])] = truth["boxes"]
    labels[0, : len(truth["labels"])] = truth["labels"]
    return {"boxes": boxes, "labels": labels}


def _feed(meter, images: range) -> None:
    for i in images:
        found, truth = _image(i)
        meter.process(_padded(truth), [found], {})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        _, task = det_task()
        meter = task.evaluator()
        _feed(meter, range(0, 4) if rank == 0 else range(4, IMAGES))
        meter.sync(torch.device("cpu"))
        out[rank] = meter.evaluate("val")
    finally:
        dist.destroy_process_group()


def test_two_workers_with_uneven_boxes_agree_with_one_process():
    _, task = det_task()
    single = task.evaluator()
    _feed(single, range(IMAGES))
    single.sync(torch.device("cpu"))
    expected = single.evaluate("val")
    assert 0.05 < expected["val_map"] < 0.95  # neither nothing nor everything right
    assert {f"val_ap/{c}" for c in CLASSES} <= set(expected)

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
        results = dict(out)
    assert results[0] == results[1]  # computed once, on rank 0, and broadcast
    assert results[0].keys() == expected.keys()
    for key, value in expected.items():
        assert results[0][key] == pytest.approx(value, abs=1e-9, nan_ok=True), key


def test_perfect_detections_score_one():
    _, task = det_task()
    meter = task.evaluator()
    for i in range(IMAGES):
        _, truth = _image(i)
        found = {**truth, "scores": torch.ones(len(truth["labels"]))}
        meter.process(_padded(truth), [found], {})
    scores = meter.evaluate("val")
    assert scores["val_map"] == pytest.approx(1.0) and scores["val_map50"] == pytest.approx(1.0)


# ------------------------------------------------------------------ fine-tuning


@pytest.mark.parametrize(
    "name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large", "yolo_n"]
)
def test_a_detector_of_other_classes_lends_all_but_its_class_layers(name):
    """A detector trained on 7 classes fills one for 3: every weight but the class-count
    dependent ones (the registry's heads) comes over; those are the fresh ones built for 3."""
    from raycv.finetune.sources import transplant
    from raycv.models import MODELS

    torch.manual_seed(0)
    source = create_model(name, 7, image_size=64).state_dict()
    model = create_model(name, 3, image_size=64)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    transplant(model, name, 3, source)
    heads = tuple(f"{h}." for h in MODELS.get(name).heads)
    own = model.state_dict()
    body = [k for k in own if not k.startswith(heads)]
    assert heads and body and all(torch.equal(own[k], source[k]) for k in body)
    head_keys = [k for k in own if k.startswith(heads)]
    assert head_keys and all(own[k].shape == fresh[k].shape for k in head_keys)
    assert any(own[k].shape != source[k].shape for k in head_keys)  # the class count changed
    with torch.no_grad():
        found = model.eval()([torch.randn(3, 64, 64)])
    assert (found[0]["labels"] < 3 + MODELS.get(name).background_class).all()


def test_finetune_from_coco_weights_offline(tmp_path, monkeypatch):
    """finetune.source=DEFAULT: torchvision's COCO weights for the detector, read from its
    cache (a state dict written there); the box predictor is built fresh for the classes."""
    import torchvision

    from raycv.finetune.sources import apply_source
    from raycv.loop import build_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    weights = torchvision.models.get_model_weights(name).DEFAULT
    coco = create_model(name, 90, image_size=64).state_dict()  # 91 outputs with background
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(coco, tmp_path / "hub" / "checkpoints" / Path(weights.url).name)
    raw = {"task": "detection", "model": {"name": name, "image_size": 64}}
    cfg = apply_source(from_dict({**raw, "finetune": {"source": "DEFAULT"}}))
    assert cfg.finetune.source == f"{type(weights).__name__}.COCO_V1"
    assert cfg.augment.mean == from_dict(raw).augment.mean  # ImageNet's, as raycv's
    model = build_model(cfg, 3)
    own = model.state_dict()
    assert torch.equal(own["backbone.body.0.0.weight"], coco["backbone.body.0.0.weight"])
    assert own["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4  # 3 and background
    assert own["roi_heads.box_predictor.bbox_pred.weight"].shape[0] == 16
