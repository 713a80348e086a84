"""``raycv pipeline`` with ``task: detection`` end to end (configs/det_pipeline_smoke.yaml,
in-process): yolo_n pretrained on four shapes is fine-tuned on three others, channel-pruned
with its heads kept, exported with its boxes before NMS, and reported in mAP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from raycv.artifacts import load_trained, read_manifest
from raycv.config import validate
from raycv.pipeline import run_pipeline

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SIZE, CLASSES = 64, 3


@pytest.fixture(scope="module")
def pipeline(ray_local, tmp_path_factory) -> Path:
    given = yaml.safe_load((REPO / "configs" / "det_pipeline_smoke.yaml").read_text())
    given["run"] = {"storage": str(tmp_path_factory.mktemp("detpipe"))}
    return run_pipeline(given, validate(given), local=True).path


def test_every_stage_runs_and_the_final_model_is_the_compressed_one(pipeline):
    manifest = read_manifest(pipeline)
    assert manifest["status"] == "finished" and manifest["final_model"] == "compress"
    assert manifest["task"] == "detection" and manifest["metric"] == "val_map"
    for stage in ("pretrain", "finetune", "compress", "export", "report"):
        assert manifest["stages"][stage]["status"] == "finished", stage


def test_the_detector_is_pruned_with_its_heads_kept_and_no_teacher(pipeline):
    rows = read_manifest(pipeline / "compress")["compression"]
    assert {r["metric"] for r in rows} == {"val_map"}
    assert rows[0]["score"] == read_manifest(pipeline / "finetune")["metrics"]["best"]["val_map"]
    assert all(r["params"] < 0.8 * rows[0]["params"] for r in rows[1:])
    assert all(r["macs"] < 0.8 * rows[0]["macs"] for r in rows[1:])
    # detection has no distillation loss: the pipeline's default teacher is not set
    step = yaml.safe_load((pipeline / "compress/steps/prune-1/config.yaml").read_text())
    assert step["distill"]["teacher"] is None
    pruned = load_trained(pipeline / "compress").model
    assert [conv.out_channels for conv in pruned.head.cls_out] == [CLASSES] * 3
    assert [conv.out_channels for conv in pruned.head.box_out] == [4] * 3
    assert pruned.neck.lateral[0][0].out_channels < 64  # the neck did lose channels


def test_the_export_is_the_final_model_before_nms(pipeline):
    final = load_trained(pipeline / "compress").model
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(pipeline / "export" / "model.onnx"))
    (dense,) = session.run(["detections"], {"image": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(dense, final.dense(x).numpy(), atol=1e-4, rtol=1e-3)
    card = json.loads((pipeline / "export" / "model_card.json").read_text())
    assert card["classes"] == ["hexagon", "ring", "heart"] and "postprocess" in card


def test_the_report_speaks_of_map(pipeline):
    text = (pipeline / "report.md").read_text()
    assert "| Stage | Status | Time | Best val mAP |" in text
    assert "mAP@.5" in text  # the final model's own eval report
    assert (pipeline / "report" / "final_pr_curve.png").is_file()
    assert (pipeline / "report" / "final_worst.png").is_file()
