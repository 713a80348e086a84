"""Batch prediction over a real folder of files: one row per file (hidden files skipped,
sub-folders walked), bad files reported with their error but not fatal, each class equal to
the model's argmax on the same preprocessed image, top-k scores sorted probabilities."""

from __future__ import annotations

import io
import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raycv.artifacts import load_trained
from raycv.config import from_dict
from raycv.data import shapes
from raycv.data.augment import build_preset, normalize
from raycv.data.images import decode
from raycv.errors import DataError
from raycv.predict import run_predict

CLASSES = shapes.class_names(4)
TOP_K = 3


def write_images(folder: Path) -> dict[str, list[Path]]:
    """Rendered shapes as PNG and JPEG (some resized, not square), plus bad and hidden files."""
    good = []
    for i in range(9):
        sample = shapes.render(i, image_size=32, num_classes=4, difficulty="easy", seed=5)
        image = Image.fromarray(sample["image"])
        if i % 3 == 2:
            image = image.resize((64, 48), Image.Resampling.BILINEAR)
        sub = folder / "nested" if i == 8 else folder
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / (f"shape {i}.png" if i % 2 else f"shape_{i}.jpg")
        image.save(path)
        good.append(path)
    sample = shapes.render(99, image_size=32, num_classes=4, difficulty="easy", seed=5)
    jpeg = io.BytesIO()
    Image.fromarray(sample["image"]).save(jpeg, format="JPEG")
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 3])
    notes = folder / "notes.txt"
    notes.write_text("not an image\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / ".hidden.png")
    return {"good": good, "bad": [truncated, notes]}


@pytest.fixture(scope="module")
def predicted(ray_local, tmp_path_factory, smoke_at, briefly_trained, save_checkpoint):
    root = tmp_path_factory.mktemp("predict")
    cfg = from_dict(smoke_at(root / "runs"))
    model = briefly_trained(cfg, partial(torch.optim.Adam, lr=1e-3))
    ckpt = save_checkpoint(root / "ckpt", cfg, model, {"epoch": 1})
    files = write_images(root / "my imgs" / "ünïcode")
    # batch_size 4: several batches, so both model actors get work
    run = run_predict(root / "ckpt", [str(root / "my imgs")], top_k=TOP_K, batch_size=4)
    return {"run": run, "files": files, "ckpt": ckpt, "cfg": cfg}


def test_one_row_per_file_in_both_formats(predicted):
    run, files = predicted["run"], predicted["files"]
    table = pq.read_table(run.path / "predictions.parquet").to_pandas()
    expected = sorted(str(p) for p in files["good"] + files["bad"])
    assert sorted(table["path"]) == expected  # .hidden.png skipped, nested/ walked
    assert list(table.columns) == ["path", "class", "score", "top_classes", "top_scores", "error"]

    csv = pd.read_csv(run.path / "predictions.csv", keep_default_na=False)
    assert list(csv["path"]) == list(table["path"])
    good = table["error"] == ""
    assert list(csv["class"]) == list(table["class"])
    assert list(csv["top_classes"][good]) == [";".join(c) for c in table["top_classes"][good]]
    scores = [[float(s) for s in text.split(";")] for text in csv["top_scores"][good]]
    np.testing.assert_allclose(scores, table["top_scores"][good].tolist(), rtol=1e-5)

    manifest = json.loads(run.manifest.read_text())
    assert manifest["kind"] == "predict" and manifest["status"] == "finished"
    assert manifest["parent"] == str(predicted["ckpt"])
    assert manifest["counts"] == {"files": 11, "predicted": 9, "bad": 2}


def test_bad_files_are_reported_not_fatal(predicted):
    table = pq.read_table(predicted["run"].path / "predictions.parquet").to_pandas()
    bad = table[table["error"] != ""]
    assert sorted(bad["path"]) == sorted(str(p) for p in predicted["files"]["bad"])
    assert all("not a readable image" in e for e in bad["error"])
    assert list(bad["class"]) == ["", ""] and bad["score"].isna().all()
    assert all(len(c) == 0 for c in bad["top_classes"])


def test_classes_are_the_models_argmax_on_the_same_pixels(predicted):
    cfg = predicted["cfg"]
    model = load_trained(predicted["ckpt"]).model
    preset = build_preset(cfg.augment.eval_preset, cfg.augment, cfg.model.image_size)
    paths = [str(p) for p in predicted["files"]["good"]]
    pixels = np.stack([decode(Path(p).read_bytes(), p, cfg.working_size) for p in paths])
    with torch.no_grad():
        images = normalize(torch.from_numpy(preset({"image": pixels})["image"]), cfg.augment)
        probs = model(images).softmax(dim=1)

    table = pq.read_table(predicted["run"].path / "predictions.parquet").to_pandas()
    rows = table.set_index("path").loc[paths]
    assert list(rows["class"]) == [CLASSES[i] for i in probs.argmax(dim=1)]
    np.testing.assert_allclose(rows["score"], probs.max(dim=1).values, rtol=1e-4)
    assert len(set(rows["class"])) > 1  # a trained model, not one constant answer
    for classes, scores, score in zip(rows["top_classes"], rows["top_scores"], rows["score"]):
        assert len(classes) == len(scores) == TOP_K and len(set(classes)) == TOP_K
        assert list(scores) == sorted(scores, reverse=True) and scores[0] == score
        assert 0 < sum(scores) <= 1 + 1e-6


def test_top_k_is_clamped_to_the_class_count(predicted):
    image = predicted["files"]["good"][1]
    run = run_predict(predicted["ckpt"], [str(image)], top_k=10)
    table = pq.read_table(run.path / "predictions.parquet").to_pandas()
    assert list(table["path"]) == [str(image)]
    assert sorted(table["top_classes"][0]) == sorted(CLASSES)
    assert math.isclose(sum(table["top_scores"][0]), 1.0, rel_tol=1e-5)


def test_inputs_are_checked_before_ray(predicted, tmp_path):
    ckpt = predicted["ckpt"]
    with pytest.raises(FileNotFoundError, match="no such dir does not exist"):
        run_predict(ckpt, [str(tmp_path / "no such dir")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(DataError, match="no files under"):
        run_predict(ckpt, [str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        run_predict(ckpt, [str(tmp_path / "empty")], top_k=0)
