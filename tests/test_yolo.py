"""The ``yolo_n`` / ``yolo_s`` detectors: they build on several backbones, train (every
parameter gets a gradient, also on images without boxes), detect inside the image, assign
only anchor points inside a box, learn shapes' boxes in a few dozen steps, and refuse an
unsupported backbone in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

from raycv.config import IMAGENET_MEAN, IMAGENET_STD
from raycv.data.decoders import padded_boxes
from raycv.data.shapes import render
from raycv.models import MODELS, create_model, replace_heads
from raycv.models.yolo import RETURN_NODES, anchor_points, decode
from raycv.models.yolo_loss import Padded, task_aligned_assign

SIZE = 64
CLASSES = 3


def targets_one_empty() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 30.0], [30.0, 30.0, 60.0, 62.0]]),
         "labels": torch.tensor([2, 0])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]  # fmt: skip


def assert_every_parameter_has_a_finite_gradient(model: torch.nn.Module) -> None:
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad[:5]}"


@pytest.mark.parametrize("name", ["yolo_n", "yolo_s"])
@pytest.mark.parametrize("encoder", [None, "mobilenet_v3_small"])
def test_trains_and_detects_inside_the_image(name, encoder):
    torch.manual_seed(0)
    model = create_model(name, num_classes=CLASSES, image_size=SIZE, encoder=encoder).train()
    for path in MODELS.get(name).heads:
        assert model.get_submodule(path).out_channels == CLASSES
    images = [torch.randn(3, SIZE, SIZE) for _ in range(2)]

    losses = model(images, targets_one_empty())
    assert set(losses) == {"loss_cls", "loss_box"}
    assert all(v.ndim == 0 and torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert_every_parameter_has_a_finite_gradient(model)

    with torch.no_grad():
        found = model.eval()(images)
    assert len(found) == 2
    for d in found:
        assert set(d) == {"boxes", "scores", "labels"}
        assert 0 < len(d["boxes"]) <= 100  # the prior probability clears the threshold
        assert d["boxes"].shape == (len(d["scores"]), 4) and d["labels"].dtype == torch.int64
        assert (d["boxes"] >= 0).all() and (d["boxes"] <= SIZE).all()
        assert (d["boxes"][:, 2:] >= d["boxes"][:, :2]).all()
        assert ((d["labels"] >= 0) & (d["labels"] < CLASSES)).all()
        assert (d["scores"][:-1] >= d["scores"][1:]).all()  # best first
        assert (d["scores"] > model.score_threshold).all()


def test_background_only_batch_still_gives_every_parameter_a_gradient():
    torch.manual_seed(0)
    model = create_model("yolo_n", num_classes=CLASSES, image_size=SIZE).train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    losses = model([torch.randn(3, SIZE, SIZE)] * 2, [empty, empty])
    assert losses["loss_box"].item() == 0.0 and losses["loss_cls"] > 0
    sum(losses.values()).backward()
    assert_every_parameter_has_a_finite_gradient(model)


def test_heads_swap_for_another_class_count_and_detection_options_apply():
    model = create_model("yolo_n", num_classes=CLASSES, image_size=SIZE)
    replace_heads(model, MODELS.get("yolo_n"), 7)
    model.max_detections, model.score_threshold = 5, 0.005
    with torch.no_grad():
        (found,) = model.eval()([torch.randn(3, SIZE, SIZE)])
    assert len(found["boxes"]) == 5 and found["labels"].max() < 7
    # A fresh head (default init) still starts near the prior probability: it is an offset.
    assert 0.003 < found["scores"].max() < 0.05


def test_backbone_keys_are_the_classifiers_under_backbone():
    """So a raycv classification run can fill it (the entry's ``Backbone``)."""
    own = [k for k in create_model("yolo_n", CLASSES).state_dict() if k.startswith("backbone.")]
    classifier = create_model("resnet18", 5).state_dict()
    assert own and {k.removeprefix("backbone.") for k in own} <= set(classifier)


def test_assignment_takes_anchor_points_inside_the_box_only():
    points, strides = anchor_points(SIZE, SIZE, torch.device("cpu"))
    anchors = len(points)
    assert anchors == 8 * 8 + 4 * 4 + 2 * 2
    gt = Padded(
        boxes=torch.tensor([[[8.0, 8.0, 36.0, 30.0]], [[0.0, 0.0, 0.0, 0.0]]]),
        labels=torch.tensor([[1], [0]]),
        valid=torch.tensor([[True], [False]]),  # image 2: background only
    )
    scores = torch.full((2, anchors, CLASSES), 0.01)
    pred = decode(torch.zeros(2, anchors, 4), points, strides)  # what a fresh head predicts
    t = task_aligned_assign(scores, pred, points, gt, top_k=10)

    positive = t.positive[0]
    assert 1 <= positive.sum() <= 10
    x, y = points[positive].T
    assert ((x > 8) & (x < 36) & (y > 8) & (y < 30)).all()
    far = (points[:, 0] > 48) | (points[:, 1] > 44)  # well clear of the box
    assert not positive[far].any()
    assert (t.boxes[0, positive] == gt.boxes[0, 0]).all()
    assert (t.scores[0, positive, 1] > 0).all() and (t.scores[0, positive, 1] <= 1).all()
    assert t.scores[0, ~positive].abs().sum() == 0 and t.scores[0, :, [0, 2]].abs().sum() == 0
    assert not t.positive[1].any() and t.scores[1].abs().sum() == 0


def test_an_anchor_claimed_by_two_boxes_goes_to_the_one_it_overlaps_most():
    points, strides = anchor_points(SIZE, SIZE, torch.device("cpu"))
    anchor = 0  # centre (4, 4): inside both boxes
    pred = decode(torch.zeros(1, len(points), 4), points, strides)
    pred[0, anchor] = torch.tensor([0.0, 0.0, 10.0, 10.0])
    gt = Padded(
        boxes=torch.tensor([[[0.0, 0.0, 40.0, 40.0], [0.0, 0.0, 12.0, 12.0]]]),
        labels=torch.tensor([[0, 2]]),
        valid=torch.tensor([[True, True]]),
    )
    t = task_aligned_assign(torch.full((1, len(points), CLASSES), 0.5), pred, points, gt)
    assert t.positive[0, anchor]
    assert (t.boxes[0, anchor] == gt.boxes[0, 1]).all()
    assert t.scores[0, anchor, 2] > 0 and t.scores[0, anchor, 0] == 0


@pytest.mark.parametrize("encoder", ["vgg11_bn", "no_such_net"])
def test_unsupported_backbone_is_refused_in_one_line(encoder):
    with pytest.raises(ValueError) as err:
        create_model("yolo_n", CLASSES, image_size=SIZE, encoder=encoder)
    message = str(err.value)
    assert "\n" not in message and repr(encoder) in message
    assert all(name in message for name in RETURN_NODES)


def shapes_batch(count: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Shapes images at SIZE px, ImageNet-normalised as raycv's presets hand them over."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    images, targets = [], []
    for i in range(count):
        sample = render(i, image_size=SIZE, num_classes=CLASSES, difficulty="easy", seed=0)
        pixels = torch.from_numpy(sample["image"]).permute(2, 0, 1).float() / 255
        images.append((pixels - mean) / std)
        boxes, labels = padded_boxes(sample, SIZE, 10)
        real = labels >= 0
        targets.append(
            {"boxes": torch.from_numpy(boxes[real]), "labels": torch.from_numpy(labels[real])}
        )
    return images, targets


def top_detection_hits(model, images, targets) -> int:
    """Images whose best detection has the main shape's class and IoU > 0.5 with its box."""
    with torch.no_grad():
        found = model.eval()(images)
    model.train()
    hits = 0
    for d, t in zip(found, targets):
        if len(d["boxes"]):
            iou = box_iou(d["boxes"][:1], t["boxes"][:1]).item()
            hits += int(iou > 0.5 and d["labels"][0] == t["labels"][0])
    return hits


def test_yolo_n_learns_shapes_boxes():
    """60 AdamW steps of 16 images from scratch. Measured on 2 shared cores (about 12 s of
    training when the machine is otherwise idle): 30 to 32 of the 32 top detections right
    over torch seeds 0 to 4, COCO mAP 0.58 to 0.71 (mAP@0.5 0.99 to 1.0), against none and
    mAP < 0.001 for a fresh model."""
    torch.set_num_threads(2)
    images, targets = shapes_batch(32)
    torch.manual_seed(0)
    model = create_model("yolo_n", CLASSES, image_size=SIZE).train()
    assert top_detection_hits(model, images, targets) <= 2
    steps, lr = 60, 3e-3
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.15)
    order = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pick = torch.randperm(len(images), generator=order)[:16].tolist()
        losses = model([images[i] for i in pick], [targets[i] for i in pick])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        schedule.step()
    assert top_detection_hits(model, images, targets) >= 24


def test_rectangular_inputs_work_and_other_sides_are_refused():
    model = create_model("yolo_n", CLASSES).eval()
    with torch.no_grad():
        (found,) = model([torch.randn(3, 64, 96)])
    assert (found["boxes"][:, [0, 2]] <= 96).all() and (found["boxes"][:, [1, 3]] <= 64).all()
    with pytest.raises(ValueError, match="divisible by 32, got 64 x 80"):
        model([torch.randn(3, 64, 80)])


def test_a_config_takes_every_yolo_backbone_and_names_them_for_another():
    from raycv.config import ConfigError, from_dict

    for encoder in ("mobilenet_v3_small", "resnet34"):
        cfg = from_dict({"task": "detection", "model": {"name": "yolo_n", "encoder": encoder}})
        assert cfg.model.encoder == encoder
    with pytest.raises(ConfigError, match=r"model.encoder='vgg11' is unknown; e\.g\. .*resnet18"):
        from_dict({"task": "detection", "model": {"name": "yolo_n", "encoder": "vgg11"}})


def test_model_weights_give_the_backbone_torchvisions_imagenet_weights_offline(
    tmp_path, monkeypatch
):
    """model.weights names the encoder's weights; read from torchvision's cache (a state
    dict written there), never downloaded here."""
    import torchvision

    from raycv.config import ConfigError, from_dict
    from raycv.models import create_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / Path(weights.url).name)
    model = create_model("yolo_n", num_classes=3, weights="DEFAULT", encoder="resnet18")
    assert torch.equal(model.state_dict()["backbone.conv1.weight"], state["conv1.weight"])
    assert torch.equal(
        model.state_dict()["backbone.layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"]
    )
    cfg = from_dict({"task": "detection", "model": {"name": "yolo_n", "weights": "IMAGENET1K_V1"}})
    assert cfg.model.weights == "IMAGENET1K_V1"
    with pytest.raises(
        ConfigError,
        match=r"not a weights name of yolo_n's encoder resnet18; "
        r"choose one of: IMAGENET1K_V1, DEFAULT",
    ):
        from_dict({"task": "detection", "model": {"name": "yolo_n", "weights": "COCO_V1"}})


def test_a_raycv_classifier_of_its_encoder_fills_the_backbone():
    """finetune --from a resnet18 classification run: its weights fill yolo's backbone,
    the neck and head stay as built; a classifier of another architecture is refused."""
    from raycv.config import ConfigError, from_dict
    from raycv.finetune.sources import Source, transplant_backbone
    from raycv.models import create_model

    torch.manual_seed(0)
    classifier = create_model("resnet18", 5).state_dict()
    model = create_model("yolo_n", 3)
    neck = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    cfg = from_dict({"task": "detection", "model": {"name": "yolo_n"}})
    transplant_backbone(model, cfg, Source("run", classifier, "resnet18"))
    own = model.state_dict()
    assert torch.equal(own["backbone.layer3.0.conv1.weight"], classifier["layer3.0.conv1.weight"])
    assert all(torch.equal(own[k], v) for k, v in neck.items())
    other = create_model("resnet34", 5).state_dict()
    with pytest.raises(ConfigError, match="yolo_n's backbone is resnet18"):
        transplant_backbone(model, cfg, Source("run", other, "resnet34"))
