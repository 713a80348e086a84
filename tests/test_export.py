"""Exports are the model they came from: TorchScript and ONNX logits equal PyTorch's (the
ONNX batch is dynamic), the exported state dict reloads through ``load_trained``, the model
card states the classes, the preprocessing and the lineage, a mismatching file is refused,
and a channel-pruned model exports and reloads with its narrow layers."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from raycv import checkpoint
from raycv.artifacts import load_trained
from raycv.config import PruneConfig, from_dict
from raycv.data import shapes
from raycv.export import verify
from raycv.models import create_model
from raycv.pruning import prune_model
from raycv.runs import RunFolder, write_manifest
from raycv.tasks import build_task

# torch.jit.load warns that TorchScript is deprecated; the export itself silences it.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning")

CLASSES = shapes.class_names(4)
METRICS = {"epoch": 3, "val_acc": 0.8125, "val_loss": 0.52, "params": 11_178_564, "node": "n1"}


def logits(model: nn.Module, batch: int, size: int = 32) -> torch.Tensor:
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model.eval()(x)


def onnx_logits(path: Path, batch: int, size: int = 32) -> np.ndarray:
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": x.numpy()})[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, smoke_at, briefly_trained, save_checkpoint):
    """A trained model inside a fine-tune run folder whose parent is a train run, exported."""
    from raycv.export import run_export

    root = tmp_path_factory.mktemp("export")
    cfg = from_dict(smoke_at(root / "runs"))
    model = briefly_trained(cfg, partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    train_run = RunFolder(root / "runs" / "smoke" / "train-1")
    tuned_run = RunFolder(root / "runs" / "smoke" / "finetune-1")
    for run in (train_run, tuned_run):
        save_checkpoint(run.best, cfg, model, METRICS)
    best = {"paths": {"best_checkpoint": "best"}}
    write_manifest(train_run, cfg, "finished", best)
    parent = str(train_run.best / checkpoint.CHECKPOINT_FILE)
    write_manifest(tuned_run, cfg, "finished", best, kind="finetune", parent=parent)
    run = run_export(tuned_run.path)
    return {"run": run, "model": model, "source": tuned_run.path, "train": train_run.path}


def test_torchscript_and_onnx_match_pytorch(exported):
    run, model = exported["run"], exported["model"]
    manifest = json.loads(run.manifest.read_text())
    assert manifest["kind"] == "export" and manifest["status"] == "finished"
    assert manifest["parent"] == str(exported["source"])
    recorded = manifest["metrics"]
    assert 0 <= recorded["torchscript_max_abs_diff"] < 1e-4
    assert 0 <= recorded["onnx_max_abs_diff"] < 1e-4
    assert recorded["val_acc"] == METRICS["val_acc"]  # source metrics travel along

    scripted = torch.jit.load(str(run.path / "model.torchscript.pt"))
    torch.testing.assert_close(logits(scripted, 5), logits(model, 5), atol=1e-5, rtol=1e-4)
    # batch sizes the export never saw: the ONNX batch dimension is dynamic
    session = ort.InferenceSession(str(run.path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)
    for batch in (1, 3):
        expected = logits(model, batch).numpy()
        np.testing.assert_allclose(
            onnx_logits(run.path / "model.onnx", batch), expected, atol=1e-5, rtol=1e-4
        )
    # a small model is one ONNX file, with no external data beside it
    assert sorted(p.name for p in run.path.iterdir()) == [
        "config.yaml",
        "manifest.json",
        "model.onnx",
        "model.pt",
        "model.pt.sha256",
        "model.torchscript.pt",
        "model_card.json",
        "model_card.md",
    ]


def test_state_dict_reloads_through_load_trained(exported):
    run, model = exported["run"], exported["model"]
    saved = torch.load(run.path / "model.pt", weights_only=True)
    assert set(saved) == {"model", "class_names", "config", "metrics"}
    assert saved["class_names"] == CLASSES and saved["metrics"] == METRICS

    trained = load_trained(run.path)
    assert trained.checkpoint == run.path / "model.pt"
    assert trained.class_names == CLASSES
    assert trained.config.model_dump() == load_trained(exported["source"]).config.model_dump()
    torch.testing.assert_close(logits(trained.model, 4), logits(model, 4), atol=0, rtol=0)


def test_model_card_states_classes_preprocessing_and_lineage(exported):
    run = exported["run"]
    card = json.loads((run.path / "model_card.json").read_text())
    assert card["model"] == "resnet18" and card["classes"] == CLASSES
    pre = card["preprocessing"]
    assert (pre["input_size"], pre["working_size"], pre["crop"]) == (32, 37, 32)
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]
    assert card["metrics"] == {k: METRICS[k] for k in ("epoch", "val_acc", "val_loss", "params")}
    assert [(e["path"], e["kind"]) for e in card["lineage"]] == [
        (str(exported["source"]), "finetune"),
        (str(exported["train"]), "train"),
    ]
    for key, name in (("state_dict", "model.pt"), ("onnx", "model.onnx")):
        size = (run.path / name).stat().st_size / 1e6
        assert card["files"][key] == {"path": name, "size_mb": pytest.approx(size, abs=1e-3)}
        assert card["files"][key]["size_mb"] > 40  # ResNet-18: 11 M float32 parameters
    assert card["code_version"].startswith("0.")

    text = (run.path / "model_card.md").read_text()
    for needle in [
        *CLASSES,
        "shorter side to 37 px",
        "centre-crop to 32x32",
        "mean [0.485, 0.456, 0.406]",
        "torch.jit.load('model.torchscript.pt')",
        "ort.InferenceSession('model.onnx'",
        "load_trained(",
        str(exported["train"]),
    ]:
        assert needle in text, needle


def test_a_model_that_differs_from_the_files_is_refused(exported):
    run = exported["run"]
    other = create_model("resnet18", len(CLASSES), None, 32).eval()  # fresh weights
    spec = build_task(from_dict({}), CLASSES).export_spec(32, None)
    files = (run.path / "model.torchscript.pt", run.path / "model.onnx")
    with pytest.raises(RuntimeError, match="TorchScript export differs from PyTorch"):
        verify(other, *files, spec)
    diffs = verify(exported["model"], *files, spec)
    assert max(diffs.values()) < spec.atol


def test_channel_pruned_model_exports_with_its_narrow_shapes(
    tmp_path, smoke, exported, save_checkpoint
):
    from raycv.export import run_export

    cfg = from_dict(smoke(prune={"ratio": 0.5}))
    torch.manual_seed(0)
    model = create_model("resnet18", len(CLASSES), None, 32)
    model = prune_model(model, "resnet18", PruneConfig(ratio=0.5), 32).eval()
    widths = [m.weight.shape for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert widths[0][0] < 64  # the stem really is narrower than ResNet-18's

    run = run_export(save_checkpoint(tmp_path / "ckpt", cfg, model, METRICS))
    manifest = json.loads(run.manifest.read_text())
    assert manifest["status"] == "finished"
    assert manifest["parent"] == str(tmp_path / "ckpt" / "checkpoint.pt")  # no run folder
    reloaded = load_trained(run.path).model
    assert [m.weight.shape for m in reloaded.modules() if isinstance(m, nn.Conv2d)] == widths
    torch.testing.assert_close(logits(reloaded, 2), logits(model, 2), atol=0, rtol=0)
    np.testing.assert_allclose(
        onnx_logits(run.path / "model.onnx", 2), logits(model, 2).numpy(), atol=1e-5, rtol=1e-4
    )
    full = json.loads(exported["run"].manifest.read_text())["metrics"]["size_mb"]
    assert manifest["metrics"]["size_mb"]["onnx"] < 0.4 * full["onnx"]
