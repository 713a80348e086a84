"""A yolo detector exports: TorchScript and ONNX give PyTorch's boxes and class probabilities
before NMS, the model card's own postprocess code turns the ONNX output into exactly the
detections raycv's model makes, a channel-pruned yolo exports with its narrow layers, and a
torchvision detector is refused in one line with nothing shipped."""

from __future__ import annotations

import json
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch

from raycv.config import ConfigError, PruneConfig, from_dict
from raycv.export import run_export
from raycv.models import create_model
from raycv.pruning import prune_model
from raycv.runs import RunFolder

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning")

SIZE, CLASSES = 64, 3
METRICS = {"epoch": 2, "val_map": 0.31, "val_map50": 0.62}


def det_config(root, name: str = "yolo_n") -> dict:
    return {
        "experiment": "det_export",
        "task": "detection",
        "data": {"source": "shapes", "shapes": {"num_classes": CLASSES, "image_size": SIZE}},
        "model": {"name": name, "image_size": SIZE},
        "run": {"storage": str(root)},
    }


def saved_run(tmp_path, save_checkpoint, name: str = "yolo_n", prune: float = 0.0):
    cfg = from_dict(det_config(tmp_path / "runs", name))
    torch.manual_seed(0)
    model = create_model(name, CLASSES, image_size=SIZE)
    if prune:
        prune_model(model, name, PruneConfig(method="channel", ratio=prune), SIZE)
    run = RunFolder(tmp_path / "runs" / "det_export" / "train-1")
    save_checkpoint(run.best, cfg, model.eval(), METRICS)
    return run, model


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


def postprocess_from_card(card: dict, markdown: str, detections: np.ndarray, i: int) -> dict:
    """Run the card's own postprocess code block on image ``i`` of the ONNX output."""
    code = re.search(r"## Postprocess.*?```python\n(.*?)```", markdown, re.S).group(1)
    scope = {**card["postprocess"], "detections": torch.from_numpy(detections), "i": i}
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
    assert manifest["status"] == "finished" and manifest["metrics"]["onnx_max_abs_diff"] < 1e-3

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


def test_a_torchvision_detector_is_refused_in_one_line_and_nothing_ships(tmp_path, save_checkpoint):
    run, _ = saved_run(tmp_path, save_checkpoint, name="ssdlite320_mobilenet_v3_large")
    with pytest.raises(ConfigError) as err:
        run_export(run.best)
    message = str(err.value)
    assert "\n" not in message and "yolo_n" in message
    assert not list((tmp_path / "runs" / "det_export").glob("export-*"))  # refused first
