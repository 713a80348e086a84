"""Detectors export. One-stage ones: TorchScript and ONNX give PyTorch's boxes and class
scores before NMS, and the model card's own postprocess code turns them into exactly the
detections the model makes (raycv's yolo, and torchvision's SSDlite, FCOS and RetinaNet); a
channel-pruned yolo exports with its narrow layers. A two-stage one (Faster R-CNN): its
detections with NMS inside, one image at a time."""

from __future__ import annotations

import json
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from raycv.config import PruneConfig, from_dict
from raycv.export import RTOL, run_export
from raycv.models import MODELS, create_model
from raycv.pruning import prune_model
from raycv.runs import RunFolder

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning")

SIZE, CLASSES = 64, 3


def exported_close(manifest: dict, size: int = SIZE) -> bool:
    """Whether the export finished with its rows within what its own check allows: 1e-4
    plus ``RTOL`` of each value, and a box corner is up to ``size`` pixels (float32's
    rounding there differs between CPUs: 1.02e-3 on a 128 px RetinaNet on an AMD EPYC)."""
    diff = manifest["metrics"]["onnx_max_abs_diff"]
    return manifest["status"] == "finished" and 0 <= diff < 1e-4 + RTOL * size


METRICS = {"epoch": 2, "val_map": 0.31, "val_map50": 0.62}


def det_config(root, name: str = "yolo_n", size: int = SIZE) -> dict:
    return {
        "experiment": "det_export",
        "task": "detection",
        "data": {"source": "shapes", "shapes": {"num_classes": CLASSES, "image_size": size}},
        "model": {"name": name, "image_size": size},
        "run": {"storage": str(root)},
    }


def saved_run(
    tmp_path,
    save_checkpoint,
    name: str = "yolo_n",
    prune: float = 0.0,
    size: int = SIZE,
    whole_model_noise: bool = True,
):
    cfg = from_dict(det_config(tmp_path / "runs", name, size))
    torch.manual_seed(0)
    model = create_model(name, CLASSES, image_size=size)
    if prune:
        prune_model(model, name, PruneConfig(method="channel", ratio=prune), size)
    # An untrained detector scores every anchor alike: no order to check. Noise on the head
    # breaks the ties; SSDlite's untrained backbone saturates, so it needs noise throughout
    # (which, in ResNet-50's depth, would grow past the export check's tolerance).
    noisy = model if whole_model_noise else getattr(model, "head", nn.Identity())
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    run = RunFolder(tmp_path / "runs" / "det_export" / "train-1")
    save_checkpoint(run.best, cfg, model.eval(), METRICS)
    return run, model


def images(batch: int, size: int = SIZE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3))


def postprocess_from_card(
    card: dict, markdown: str, detections: np.ndarray, i: int, **settings
) -> dict:
    """Run the card's own postprocess code block on image ``i`` of the ONNX output
    (``settings`` replacing the card's)."""
    code = re.search(r"## Postprocess.*?```python\n(.*?)```", markdown, re.S).group(1)
    scope = {**card["postprocess"], **settings, "detections": torch.from_numpy(detections), "i": i}
    exec(code, scope)
    kept, anchor = scope["kept"], scope["anchor"]
    return {
        "boxes": scope["boxes"][anchor[kept]],
        "scores": scope["score"][kept],
        "labels": scope["label"][kept],
    }


@pytest.mark.parametrize("prune", [0.0, 0.5])
def test_yolo_exports_and_the_cards_postprocess_gives_raycvs_detections(
    tmp_path, save_checkpoint, prune
):
    run, model = saved_run(tmp_path, save_checkpoint, prune=prune)
    exported = run_export(run.best)
    card = json.loads((exported.path / "model_card.json").read_text())
    markdown = (exported.path / "model_card.md").read_text()
    assert card["output"]["name"] == "detections"
    assert card["output"]["shape"] == ["batch", "anchors", 4 + CLASSES]
    assert card["postprocess"]["nms_iou"] == model.nms_iou
    assert any("keeping its aspect ratio" in step for step in card["preprocessing"]["steps"])
    manifest = json.loads(exported.manifest.read_text())
    assert exported_close(manifest)

    x = images(3)
    session = ort.InferenceSession(str(exported.path / "model.onnx"))
    dense = session.run(["detections"], {"image": x.numpy()})[0]
    anchors = sum((SIZE // s) ** 2 for s in (8, 16, 32))
    assert dense.shape == (3, anchors, 4 + CLASSES)
    with torch.no_grad():
        reference = model.eval().dense(x).numpy()
        found = model(x)
    np.testing.assert_allclose(dense, reference, atol=1e-4, rtol=1e-3)
    # On PyTorch's own rows (an untrained model's near-equal scores would let 1e-6 of
    # runtime noise reorder its ties), the card's code makes the model's detections.
    for i, expected in enumerate(found):
        got = postprocess_from_card(card, markdown, reference, i)
        assert len(got["boxes"]) == len(expected["boxes"]) > 0
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(got[key], expected[key])


@pytest.mark.parametrize(
    "name, size, whole_model_noise",
    [
        ("ssdlite320_mobilenet_v3_large", 64, True),
        pytest.param("fcos_resnet50_fpn", 128, False, marks=pytest.mark.slow),
        pytest.param("retinanet_resnet50_fpn_v2", 128, False, marks=pytest.mark.slow),
    ],
)
def test_a_torchvision_one_stage_detector_exports_its_rows_and_the_card_makes_its_detections(
    tmp_path, save_checkpoint, name, size, whole_model_noise
):
    run, model = saved_run(tmp_path, save_checkpoint, name, 0.0, size, whole_model_noise)
    exported = run_export(run.best)
    card = json.loads((exported.path / "model_card.json").read_text())
    markdown = (exported.path / "model_card.md").read_text()
    manifest = json.loads(exported.manifest.read_text())
    assert exported_close(manifest, size)
    assert card["postprocess"]["nms_iou"] == model.nms_thresh
    assert "superset" in card["postprocess"]["top_k"]

    x = images(3, size)
    session = ort.InferenceSession(str(exported.path / "model.onnx"))
    dense = session.run(["detections"], {"image": x.numpy()})[0]
    model.eval()
    with torch.no_grad():
        reference = MODELS.get(name).dense.rows(model, x)
    assert dense.shape == (3, reference.shape[1], 4 + CLASSES)
    assert card["checks"]["atol"] == pytest.approx(1e-5 * size + 1e-4)  # boxes are pixels
    np.testing.assert_allclose(dense, reference.numpy(), atol=card["checks"]["atol"], rtol=1e-3)
    # At a threshold that leaves about 40 (anchor, class) pairs, fewer than torchvision's
    # top-k per class or level, the card's code on the rows makes torchvision's own
    # detections: boxes in the input's pixels, class ids, scores.
    scores = reference[..., 4:].flatten()
    threshold = float(scores.kthvalue(len(scores) - 40).values)
    model.score_thresh = threshold
    with torch.no_grad():
        found = model(list(x))
    shift = int(MODELS.get(name).background_class)  # torchvision's SSD: background is 0
    for i, expected in enumerate(found):
        got = postprocess_from_card(card, markdown, reference.numpy(), i, score_threshold=threshold)
        assert len(got["boxes"]) == len(expected["boxes"]) > 0
        torch.testing.assert_close(got["boxes"], expected["boxes"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got["scores"], expected["scores"])
        torch.testing.assert_close(got["labels"] + shift, expected["labels"])


def test_a_two_stage_detector_exports_its_detections_with_nms_inside(tmp_path, save_checkpoint):
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    run, model = saved_run(tmp_path, save_checkpoint, name)
    exported = run_export(run.best)
    card = json.loads((exported.path / "model_card.json").read_text())
    manifest = json.loads(exported.manifest.read_text())
    assert exported_close(manifest)
    assert card["input"]["shape"] == [1, 3, SIZE, SIZE] and "postprocess" not in card
    assert card["output"]["shape"] == ["detections", 6]
    # On other pixels than the export saw, ONNX Runtime's NMS keeps PyTorch's detections:
    # boxes in the input's pixels, scores, and class indices from 0 (background's shift undone).
    x = images(1)
    session = ort.InferenceSession(str(exported.path / "model.onnx"))
    (rows,) = session.run(["detections"], {"image": x.numpy()})
    with torch.no_grad():
        (found,) = model.eval()(list(x))
    assert len(rows) == len(found["boxes"]) > 0
    np.testing.assert_allclose(rows[:, :4], found["boxes"].numpy(), atol=1e-3, rtol=1e-4)
    np.testing.assert_allclose(rows[:, 4], found["scores"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(rows[:, 5], found["labels"].numpy() - 1)
    scripted = torch.jit.load(str(exported.path / "model.torchscript.pt"))
    with torch.no_grad():
        np.testing.assert_allclose(scripted(x).numpy(), rows, atol=1e-3, rtol=1e-4)
