"""``raycv pipeline`` with ``task: segmentation`` end to end (configs/seg_pipeline_smoke.yaml,
in-process): a classifier pretrained on shapes lends its backbone to a U-Net, which is
swept, fine-tuned, pruned (distilled from the fine-tuned model), quantized, exported and
reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from raycv.artifacts import read_manifest
from raycv.config import validate
from raycv.pipeline import run_pipeline

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline(ray_local, tmp_path_factory) -> Path:
    given = yaml.safe_load((REPO / "configs" / "seg_pipeline_smoke.yaml").read_text())
    given["run"] = {"storage": str(tmp_path_factory.mktemp("segpipe"))}
    return run_pipeline(given, validate(given), local=True).path


def test_every_stage_runs_and_the_final_model_is_the_compressed_one(pipeline):
    manifest = read_manifest(pipeline)
    assert manifest["status"] == "finished" and manifest["final_model"] == "compress"
    assert manifest["task"] == "segmentation" and manifest["metric"] == "val_miou"
    for stage in ("pretrain", "tune", "finetune", "compress", "export", "report"):
        assert manifest["stages"][stage]["status"] == "finished", stage
    pretrain = read_manifest(pipeline / "pretrain")
    assert pretrain["task"] == "classification" and pretrain["metric"] == "val_acc"


def test_the_unet_is_fine_tuned_from_the_classifier_and_compressed_with_its_teacher(pipeline):
    finetune = yaml.safe_load((pipeline / "finetune" / "config.yaml").read_text())
    assert finetune["model"]["name"] == "unet" and finetune["model"]["encoder"] == "resnet18"
    assert finetune["finetune"]["source"] == str(pipeline / "pretrain/best/checkpoint.pt")
    rows = read_manifest(pipeline / "compress")["compression"]
    assert {r["metric"] for r in rows} == {"val_miou"}
    assert rows[0]["score"] == read_manifest(pipeline / "finetune")["metrics"]["best"]["val_miou"]
    step = yaml.safe_load((pipeline / "compress/steps/prune-1/config.yaml").read_text())
    assert step["distill"]["teacher"] == str(pipeline / "finetune/best/checkpoint.pt")


def test_the_export_takes_any_height_and_width(pipeline):
    session = ort.InferenceSession(str(pipeline / "export" / "model.onnx"))
    for h, w in ((32, 32), (64, 96)):
        (logits,) = session.run(None, {"image": np.zeros((2, 3, h, w), np.float32)})
        assert logits.shape == (2, 4, h, w)


def test_the_report_speaks_of_miou(pipeline):
    text = (pipeline / "report.md").read_text()
    assert "| Stage | Status | Time | Best val mIoU |" in text
    assert "(val_acc)" in text  # the pretrained classifier's own metric, named
    assert "mIoU 0." in text and "background" in text  # the final model's own eval report
    assert (pipeline / "report" / "final_worst.png").is_file()
