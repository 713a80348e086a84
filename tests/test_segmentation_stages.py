"""Segmentation through the stages after training, each asking the task: ``raycv eval``
(mIoU equal to the task's evaluator, the worst images drawn), ``raycv data preview``
(masks over the images), ``raycv predict`` (a mask PNG of class ids at each file's own
size that is the model's argmax, class areas summing to 1, bad files reported) and
``raycv export`` (ONNX and TorchScript equal to PyTorch at two input sizes)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from raycv import checkpoint
from raycv.config import Config, from_dict
from raycv.data import shapes
from raycv.data.augment import build_preset, normalize
from raycv.data.images import decode_whole
from raycv.models import create_model
from raycv.overlays import mask_png, palette
from raycv.tasks import build_task

# torch.jit.load warns that TorchScript is deprecated; the export itself silences it.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning")

CLASSES = ["background", *shapes.class_names(3)]  # the shapes source's, for segmentation
SIZE = 32


def seg_config(storage: Path, model: str = "unet") -> Config:
    return from_dict(
        {
            "experiment": "seg",
            "task": "segmentation",
            "data": {
                "source": "shapes",
                "shapes": {"num_images": 40, "image_size": SIZE, "num_classes": 3},
                "val_fraction": 0.25,
            },
            "model": {"name": model, "image_size": SIZE},
            "train": {"batch_size": 4, "epochs": 1},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1},
            "run": {"storage": str(storage)},
        }
    )


def semantic(sample: dict) -> np.ndarray:
    """A rendered sample's mask: 0 background, class id + 1 on each object's pixels."""
    ids = np.zeros(sample["image"].shape[:2], np.uint8)
    for visible, label in zip(sample["masks"], sample["labels"]):
        ids[visible.astype(bool)] = label + 1
    return ids


def briefly_trained(cfg: Config, steps: int = 6) -> nn.Module:
    """A seeded unet after ``steps`` batches of 8 rendered shapes: real BatchNorm
    statistics and maps that vary."""
    torch.manual_seed(0)
    model = create_model(cfg.model.name, len(CLASSES), None, SIZE)
    samples = [
        shapes.render(i, image_size=SIZE, num_classes=3, difficulty="easy", seed=1)
        for i in range(8 * steps)
    ]
    preset = build_preset("eval", cfg.augment, SIZE, whole_frame=True)
    images = np.stack([s["image"] for s in samples])
    batch = preset({"image": images, "mask": np.stack([semantic(s) for s in samples])})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for x, y in zip(
        normalize(torch.from_numpy(batch["image"]), cfg.augment).split(8),
        torch.from_numpy(batch["mask"]).split(8),
    ):
        opt.zero_grad()
        F.cross_entropy(model(x), y.long()).backward()
        opt.step()
    return model.eval()


def save(folder: Path, cfg: Config, model: nn.Module) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "class_names": CLASSES,
        "config": cfg.model_dump(mode="json"),
        "metrics": {"epoch": 1, "val_miou": 0.5, "val_pixel_acc": 0.75},
        "epoch": 1,
    }
    return checkpoint.save(folder, state)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    cfg = seg_config(root / "runs")
    model = briefly_trained(cfg)
    return {"cfg": cfg, "model": model, "ckpt": save(root / "ckpt", cfg, model), "root": root}


# ---------------------------------------------------------------- eval and preview


def per_image_and_total(cfg: Config, model: nn.Module) -> tuple[list[float], dict[str, float]]:
    """mIoU of each validation image and of the split, by the task's own evaluator."""
    from raycv.data.pipeline import build_streams

    streams = build_streams(cfg)
    task = build_task(cfg, streams.class_names)
    meter, each = task.evaluator(), []
    with torch.no_grad():
        for b in streams.val.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy"):
            batch = {key: torch.from_numpy(b[key].copy()) for key in ("image", "mask")}
            batch["image"] = normalize(batch["image"], cfg.augment)
            outputs = task.forward(model, batch)
            meter.process(batch, outputs, task.loss(outputs, batch))
            for i in range(len(b["mask"])):
                one = task.evaluator()
                image = {k: v[i : i + 1] for k, v in batch.items()}
                one.process(image, outputs[i : i + 1], task.loss(outputs[i : i + 1], image))
                each.append(one.evaluate("val")["val_miou"])
    return each, meter.evaluate("val")


def test_eval_reports_the_evaluators_miou_and_draws_the_worst(ray_local, trained):
    from raycv.evaluate import run_eval

    run = run_eval(str(trained["ckpt"]), [])
    metrics = json.loads((run.path / "metrics.json").read_text())
    each, expected = per_image_and_total(trained["cfg"], trained["model"])

    assert metrics["miou"] == pytest.approx(expected["val_miou"], abs=1e-12)
    assert metrics["pixel_acc"] == pytest.approx(expected["val_pixel_acc"], abs=1e-12)
    for name in CLASSES:
        iou = expected[f"val_iou/{name}"]
        assert metrics["per_class_iou"][name] == (None if np.isnan(iou) else pytest.approx(iou))
    assert metrics["images"] == len(each) == 10  # 40 images, val_fraction 0.25
    assert np.sum(metrics["confusion_matrix"]) == 10 * SIZE * SIZE  # shapes label every pixel
    assert 0 < metrics["miou"] < 1
    # The worst images: the lowest per-image IoUs, lowest first.
    worst = [w["iou"] for w in metrics["worst"]]
    assert worst == pytest.approx(sorted(each)[:8])
    assert all(0 <= w["row"] < 10 for w in metrics["worst"])

    manifest = json.loads(run.manifest.read_text())
    assert manifest["kind"] == "eval" and manifest["status"] == "finished"
    assert manifest["paths"] == {"confusion": "plots/confusion.png", "worst": "plots/worst.png"}
    assert manifest["metrics"]["miou"] == metrics["miou"]
    for name in ("confusion.png", "worst.png"):
        assert Image.open(run.plots / name).size[0] > 300


def test_preview_draws_the_masks_over_the_images(ray_local, trained):
    from raycv.evaluate import run_preview

    run = run_preview(trained["cfg"], count=8)
    assert (run.plots / "preview.png").stat().st_size > 10_000
    assert json.loads(run.manifest.read_text())["kind"] == "preview"


def test_preview_tints_each_class_and_the_ignored_pixels(tmp_path):
    cfg = seg_config(tmp_path)
    grey = np.full((1, 4, 4, 3), 100, np.uint8)
    mask = np.zeros((1, 4, 4), np.uint8)
    mask[0, 0, :2], mask[0, 1, :] = 1, cfg.data.ignore_index  # circle; ignored
    batch = build_preset("eval", cfg.augment, 4, whole_frame=True)({"image": grey, "mask": mask})
    shown = build_task(cfg, CLASSES).preview(batch)

    image = shown.images[0].astype(int)
    assert shown.titles == ["circle"]
    assert image[0, 0].tolist() == [114, 50, 50]  # half grey, half circle's (128, 0, 0)
    assert image[1, 0].tolist() == [162, 162, 146]  # half grey, half cream (224, 224, 192)
    assert image[3, 3].tolist() == [100, 100, 100]  # background stays as it is
    assert shown.legend == {
        "circle": (128, 0, 0),
        "square": (0, 128, 0),
        "triangle": (128, 128, 0),
        "ignored": (224, 224, 192),
    }


# ---------------------------------------------------------------- predict


# file -> (width, height); "same" twice, so that output names must not clash
INPUT_SIZES = {
    "tall.png": (40, 72),
    "wide.jpg": (64, 48),
    "same.png": (32, 32),
    "nested/same.jpg": (48, 48),
}


def write_inputs(folder: Path) -> dict[str, list[Path]]:
    """Shapes saved at their own sizes (not square, PNG and JPEG, one stem twice), and
    two files that are no readable image."""
    nested = folder / "nested"
    nested.mkdir(parents=True)
    good = []
    for i, (name, size) in enumerate(INPUT_SIZES.items()):
        sample = shapes.render(i, image_size=48, num_classes=3, difficulty="easy", seed=7)
        Image.fromarray(sample["image"]).resize(size, Image.Resampling.BILINEAR).save(folder / name)
        good.append(folder / name)
    jpeg = io.BytesIO()
    Image.fromarray(sample["image"]).save(jpeg, format="JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[:200])
    (folder / "notes.txt").write_text("not an image\n")
    return {"good": good, "bad": [folder / "truncated.jpg", folder / "notes.txt"]}


@pytest.fixture(scope="module")
def predicted(ray_local, trained):
    from raycv.predict import run_predict

    files = write_inputs(trained["root"] / "my photos")
    run = run_predict(trained["ckpt"], [str(trained["root"] / "my photos")], batch_size=2)
    table = pq.read_table(run.path / "predictions.parquet").to_pandas().set_index("path")
    return {"run": run, "files": files, "table": table}


def models_argmax(cfg: Config, model: nn.Module, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The class map (S x S) of ``path`` the way evaluation prepares it, and where its
    best class leads the next by a margin no batch-size rounding could flip."""
    pixels, _ = decode_whole(path.read_bytes(), str(path), cfg.working_size)
    preset = build_preset("eval", cfg.augment, SIZE, whole_frame=True)
    with torch.no_grad():
        image = torch.from_numpy(preset({"image": pixels[None]})["image"])
        logits = model(normalize(image, cfg.augment))[0]
    top = logits.topk(2, dim=0).values
    return logits.argmax(dim=0).numpy().astype(np.uint8), (top[0] - top[1] > 1e-4).numpy()


def test_predict_writes_the_models_masks_at_each_files_own_size(predicted, trained):
    run, table = predicted["run"], predicted["table"]
    seen = set()
    for path in predicted["files"]["good"]:
        row = table.loc[str(path)]
        assert row["error"] == "" and row["mask"].startswith("masks/")
        mask = Image.open(run.path / row["mask"])
        width, height = Image.open(path).size
        assert mask.mode == "P" and mask.size == (width, height)
        ids = np.asarray(mask)
        assert set(np.unique(ids)) <= set(range(len(CLASSES)))

        expected, sure = models_argmax(trained["cfg"], trained["model"], path)
        resized = (width, height)
        expected = np.asarray(Image.fromarray(expected).resize(resized, Image.Resampling.NEAREST))
        sure = np.asarray(Image.fromarray(sure).resize(resized, Image.Resampling.NEAREST))
        assert sure.mean() > 0.95
        np.testing.assert_array_equal(ids[sure], expected[sure])

        areas = np.array([row[f"area/{c}"] for c in CLASSES])
        assert areas.sum() == pytest.approx(1.0)
        np.testing.assert_allclose(areas, np.bincount(ids.ravel(), minlength=4) / ids.size)
        assert Image.open(run.path / row["overlay"]).size == (width, height)
        seen |= set(np.unique(ids))
    assert len(seen) > 1  # a trained model, not one constant class
    names = [table.loc[str(p), "mask"] for p in predicted["files"]["good"]]
    assert len(set(names)) == len(names)  # same.png and nested/same.jpg both kept
    assert names[2] != "masks/same.png" and names[2].startswith("masks/same-")


def test_predict_reports_bad_files_and_writes_both_tables(predicted):
    run, table = predicted["run"], predicted["table"]
    bad = table.loc[[str(p) for p in predicted["files"]["bad"]]]
    assert all("not a readable image" in e for e in bad["error"])
    assert (bad["mask"] == "").all() and (bad["overlay"] == "").all()
    assert bad[[f"area/{c}" for c in CLASSES]].isna().all().all()
    assert sorted(p.name for p in (run.path / "masks").iterdir()) == sorted(
        Path(m).name for m in table["mask"] if m
    )

    csv = pd.read_csv(run.path / "predictions.csv", keep_default_na=False)
    assert list(csv.columns) == [
        "path",
        "mask",
        "overlay",
        *[f"area/{c}" for c in CLASSES],
        "error",
    ]
    assert sorted(csv["path"]) == sorted(table.index)
    manifest = json.loads(run.manifest.read_text())
    assert manifest["status"] == "finished"
    assert manifest["counts"] == {"files": 6, "predicted": 4, "bad": 2}
    assert manifest["paths"]["masks"] == "masks" and manifest["paths"]["overlays"] == "overlays"


def test_mask_pngs_keep_class_ids_and_show_the_palette():
    ids = np.array([[0, 1], [2, 255]], np.uint8)
    image = Image.open(io.BytesIO(mask_png(ids, palette())))
    np.testing.assert_array_equal(np.asarray(image), ids)
    colours = np.asarray(image.convert("RGB"))
    assert colours[0, 1].tolist() == [128, 0, 0] and colours[1, 1].tolist() == [224, 224, 192]


# ---------------------------------------------------------------- export


def outputs_at(model: nn.Module, height: int, width: int, onnx: Path, scripted) -> tuple:
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(x)
        expected = (out["out"] if isinstance(out, dict) else out).numpy()
        from_script = scripted(x).numpy()
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    return expected, session.run(["logits"], {"image": x.numpy()})[0], from_script


@pytest.mark.parametrize("name", ["unet", "lraspp_mobilenet_v3_large"])
def test_export_has_dynamic_sides_that_match_pytorch(name, trained, tmp_path):
    from raycv.export import run_export

    cfg = seg_config(tmp_path / "runs", name)
    if name == "unet":
        model, ckpt = trained["model"], trained["ckpt"]
    else:  # torchvision's: a {"out", "aux"} dict that the export must reduce to "out"
        torch.manual_seed(0)
        model = create_model(name, len(CLASSES), None, SIZE).eval()
        ckpt = save(tmp_path / "ckpt", cfg, model)
    run = run_export(ckpt)
    manifest = json.loads(run.manifest.read_text())
    assert manifest["status"] == "finished"
    assert (
        max(
            manifest["metrics"]["onnx_max_abs_diff"],
            manifest["metrics"]["torchscript_max_abs_diff"],
        )
        < 1e-4
    )

    onnx = run.path / "model.onnx"
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    assert session.get_outputs()[0].shape == ["batch", 4, "height", "width"]
    scripted = torch.jit.load(str(run.path / "model.torchscript.pt"))
    for height, width in ((SIZE, SIZE), (SIZE + 32, SIZE + 64)):  # the second never traced
        expected, from_onnx, from_script = outputs_at(model, height, width, onnx, scripted)
        assert expected.shape == (2, 4, height, width)
        np.testing.assert_allclose(from_onnx, expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(from_script, expected, atol=1e-4, rtol=0)

    card = json.loads((run.path / "model_card.json").read_text())
    assert card["output"]["shape"] == ["batch", 4, "height", "width"]
    assert card["input"]["shape"] == ["batch", 3, "height", "width"]
    assert card["classes"] == CLASSES and card["preprocessing"]["crop"] is None
    assert "(1, 3, 64, 96)" in card["checks"]["inputs"]
    text = (run.path / "model_card.md").read_text()
    for needle in (
        "output `logits`: (batch, 4, height, width)",
        "argmax over dimension 1",
        "resize the whole image to 37x37",
        "| val_miou | 0.5 |",
    ):
        assert needle in text, needle


def test_pspnet_exports_at_its_training_size_and_matches_pytorch(tmp_path):
    """PSPNet's pyramid pools do not survive ONNX with dynamic sides (onnxruntime failed on
    any size but the traced one), so its registry entry fixes them: the export is shipped,
    checked at the training size, and says so in its shapes."""
    from raycv.export import run_export

    cfg = seg_config(tmp_path / "runs", "pspnet")
    torch.manual_seed(0)
    model = create_model("pspnet", len(CLASSES), None, SIZE).eval()
    run = run_export(save(tmp_path / "ckpt", cfg, model))
    assert json.loads(run.manifest.read_text())["status"] == "finished"
    onnx = run.path / "model.onnx"
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, SIZE, SIZE]
    scripted = torch.jit.load(str(run.path / "model.torchscript.pt"))
    expected, from_onnx, _ = outputs_at(model, SIZE, SIZE, onnx, scripted)
    np.testing.assert_allclose(from_onnx, expected, atol=1e-4, rtol=0)
    card = json.loads((run.path / "model_card.json").read_text())
    assert card["input"]["shape"] == ["batch", 3, SIZE, SIZE]
    assert "training size only" in card["output"]["meaning"]
