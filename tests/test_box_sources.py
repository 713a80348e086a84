"""Detection sources on Ray: COCO, Pascal VOC and YOLO folders written here (and the two real
samples in ../shared/data) read as ``data.source`` coco / voc / yolo, decoded once, squeezed
whole into the working square with their boxes scaled alike and padded to data.max_boxes;
bad files counted or fatal; and the eval preset's letterbox keeping every box on its object."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raycv.config import from_dict
from raycv.data.augment import build_preset
from raycv.data.sources import SOURCES
from raycv.errors import BadImageError, DataError

SIZE = 32  # the working size
WIDTH, HEIGHT = 96, 48  # every photo is twice as wide as high
GREY, RED = (128, 128, 128), (220, 30, 30)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_photo(path: Path, box: tuple[int, int, int, int]) -> None:
    """A grey photo with a red rectangle filling ``box`` (x0, y0, x1, y1, pixel edges)."""
    pixels = np.full((HEIGHT, WIDTH, 3), GREY, np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = RED
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


BOXES = {"a": (0, 0, 48, 24), "b": (48, 24, 96, 48), "c": (24, 12, 72, 36), "d": (60, 6, 90, 42)}


def write_coco(root: Path) -> None:
    for split, stems in (("train", "abc"), ("val", "d")):
        images, annotations = [], []
        for i, stem in enumerate(stems, 1):
            write_photo(root / split / "images" / f"{stem}.png", BOXES[stem])
            images.append({"id": i, "file_name": f"{stem}.png", "width": WIDTH, "height": HEIGHT})
            x0, y0, x1, y1 = BOXES[stem]
            box = {"id": i, "image_id": i, "category_id": 7, "bbox": [x0, y0, x1 - x0, y1 - y0]}
            annotations.append({**box, "iscrowd": int(stem == "c")})
        data = {"images": images, "annotations": annotations}
        data["categories"] = [{"id": 7, "name": "apple"}]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def write_voc(root: Path) -> None:
    (root / "ImageSets/Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for split, stems in (("train", "abc"), ("val", "d")):
        (root / "ImageSets/Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
        for stem in stems:
            write_photo(root / "JPEGImages" / f"{stem}.png", BOXES[stem])
            x0, y0, x1, y1 = BOXES[stem]  # VOC counts pixels from 1, both ends inclusive
            values = (x0 + 1, y0 + 1, x1, y1)
            corners = "".join(
                f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), values)
            )
            difficult = int(stem == "c")
            (root / "Annotations" / f"{stem}.xml").write_text(
                f"<annotation><size><width>{WIDTH}</width><height>{HEIGHT}</height></size>"
                f"<object><name>apple</name><difficult>{difficult}</difficult>"
                f"<bndbox>{corners}</bndbox></object></annotation>"
            )


def write_yolo(root: Path) -> None:
    (root / "data.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "data.yaml").write_text("names: [apple]\n")
    for split, stems in (("train", "abc"), ("val", "d")):
        for stem in stems:
            write_photo(root / "images" / split / f"{stem}.png", BOXES[stem])
            x0, y0, x1, y1 = BOXES[stem]
            line = f"0 {(x0 + x1) / 2 / WIDTH} {(y0 + y1) / 2 / HEIGHT} "
            line += f"{(x1 - x0) / WIDTH} {(y1 - y0) / HEIGHT}\n"
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"{stem}.txt").write_text(line)


WRITERS = {"coco": write_coco, "voc": write_voc, "yolo": write_yolo}


def cfg_for(source: str, root: Path, **data):
    return from_dict(
        {
            "task": "detection",
            "data": {
                "source": source,
                source: {"root": str(root)},
                "working_size": SIZE,
                "max_boxes": 3,
                **data,
            },
        }
    )


def assert_row_on_its_box(row: dict, stem: str) -> None:
    """The row holds the photo squeezed whole into SIZE x SIZE (aspect 2) and its one box,
    scaled alike, sits on the red pixels; the padding rows are label -1."""
    image, boxes, labels = row["image"], row["boxes"], row["labels"]
    assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)
    assert row["aspect"] == pytest.approx(WIDTH / HEIGHT)
    assert boxes.shape == (3, 4) and labels.tolist() == [0, -1, -1]
    scale = np.array([SIZE / WIDTH, SIZE / HEIGHT] * 2)
    np.testing.assert_allclose(boxes[0], np.array(BOXES[stem]) * scale, atol=1e-4)
    x0, y0, x1, y1 = np.rint(boxes[0]).astype(int)
    inside = image[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1].reshape(-1, 3)
    assert np.abs(inside.astype(int) - RED).max() < 40  # red all over the box's inside
    outside = np.ones((SIZE, SIZE), bool)
    outside[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = False
    assert np.abs(image[outside].astype(int) - GREY).max() < 40  # grey everywhere else


@pytest.mark.parametrize("source", sorted(WRITERS))
def test_each_format_reads_to_squeezed_images_with_their_boxes(ray_local, tmp_path, source):
    WRITERS[source](tmp_path)
    data = SOURCES.get(source)(cfg_for(source, tmp_path))
    assert data.class_names == ["apple"] and data.skipped == []
    train = {int(row["boxes"][0, 0] * 1000): row for row in data.train.take_all()}
    assert len(train) == 3
    for stem in "abc":
        row = train[int(BOXES[stem][0] * SIZE / WIDTH * 1000)]
        assert_row_on_its_box(row, stem)
        # COCO iscrowd and VOC difficult ride along; YOLO has no such flag.
        assert row["crowd"].tolist() == [stem == "c" and source != "yolo", False, False]
    [val] = data.val.take_all()
    assert_row_on_its_box(val, "d")


def test_without_a_val_split_one_is_carved_out(ray_local, tmp_path):
    write_yolo(tmp_path)
    data = SOURCES.get("yolo")(
        cfg_for("yolo", tmp_path, yolo={"root": str(tmp_path), "val_split": "test"})
    )
    assert (data.train.count(), data.val.count()) == (2, 1)


def test_bad_files_are_skipped_and_counted_or_fatal(ray_local, tmp_path, caplog):
    write_yolo(tmp_path)
    photo = tmp_path / "images/train/b.png"
    data = photo.read_bytes()
    photo.write_bytes(data[: len(data) // 2])  # its header reads, its pixels do not
    (tmp_path / "labels/train/c.txt").write_text("0 0.5 0.5\n")  # a malformed line
    with caplog.at_level(logging.WARNING, logger="raycv.data"):
        data = SOURCES.get("yolo")(cfg_for("yolo", tmp_path))
    assert data.train.count() == 2  # c stays as a background image; b is left out
    assert len(data.skipped) == 2
    assert any(s.startswith(str(tmp_path / "labels/train/c.txt:1: ")) for s in data.skipped)
    assert any(s.startswith(f"{photo}: not a readable image") for s in data.skipped)
    logged = caplog.text
    assert "1 malformed annotations" in logged and "skipped 1 images, e.g. " in logged
    with pytest.raises(DataError, match=r"labels/train/c\.txt:1: expected 'class x_center"):
        SOURCES.get("yolo")(cfg_for("yolo", tmp_path, bad_images="fail"))


def test_an_image_of_another_size_than_annotated_is_left_out(ray_local, tmp_path):
    write_coco(tmp_path)
    Image.new("RGB", (HEIGHT, WIDTH)).save(tmp_path / "train/images/a.png")  # turned
    data = SOURCES.get("coco")(cfg_for("coco", tmp_path))
    assert data.train.count() == 2
    [bad] = data.skipped
    assert "is 48x96" in bad and "annotation says 96x48" in bad
    with pytest.raises(BadImageError, match="annotate the upright image"):
        SOURCES.get("coco")(cfg_for("coco", tmp_path, bad_images="fail"))


def test_more_boxes_than_max_boxes_keeps_the_first_and_says_so(ray_local, tmp_path, caplog):
    write_yolo(tmp_path)
    (tmp_path / "labels/train/a.txt").write_text("0 0.25 0.25 0.5 0.5\n" * 5)
    with caplog.at_level(logging.WARNING, logger="raycv.data"):
        data = SOURCES.get("yolo")(cfg_for("yolo", tmp_path))
    assert max((row["labels"] >= 0).sum() for row in data.train.take_all()) == 3
    assert "1 images have more than data.max_boxes=3 boxes (up to 5)" in caplog.text


def test_a_missing_root_is_one_line_before_anything_is_read(tmp_path):
    from raycv.config import ConfigError

    with pytest.raises(ConfigError, match=r"^data\.voc\.root is required when data\.source=voc$"):
        from_dict({"task": "detection", "data": {"source": "voc"}})
    gone = tmp_path / "gone"
    with pytest.raises(ConfigError, match=rf"^data\.yolo\.root='{gone}' is not a folder; point"):
        from_dict({"task": "detection", "data": {"source": "yolo", "yolo": {"root": str(gone)}}})


def test_the_eval_letterbox_keeps_proportions_and_every_box(tmp_path):
    """A photo twice as wide as high, squeezed into the square: evaluation shows it whole in
    its own proportions (the long side fills the output, bands above and below), and its
    box moves with it onto the red pixels."""
    cfg = from_dict({"task": "detection", "augment": {"mean": [0, 0, 0], "std": [1, 1, 1]}})
    preset = build_preset("eval", cfg.augment, 64, whole_frame=True)
    write_photo(tmp_path / "p.png", BOXES["c"])
    squeezed = np.asarray(Image.open(tmp_path / "p.png").resize((SIZE, SIZE)))
    images = torch.from_numpy(squeezed[None].copy()).permute(0, 3, 1, 2)
    box = np.array([BOXES["c"]], np.float32) * np.array([SIZE / WIDTH, SIZE / HEIGHT] * 2)
    out, [(moved, kept)] = preset.transform_boxes(images, [box], np.random.default_rng(0), [2.0])
    assert kept.all()
    np.testing.assert_allclose(moved, [[16, 24, 48, 40]], atol=0.5)  # 2/3 of the photo's, +16
    pixels = (out[0].permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(pixels[26:38, 18:46] - RED).max() < 40
    assert (pixels[:15] == 0).all() and (pixels[-15:] == 0).all()  # the letterbox bands
    assert np.abs(pixels[18, 4:12] - GREY).max() < 40  # the photo's grey above its box


def shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is not here (the real samples live beside the project)")
    return path


def test_real_kangaroo_voc_and_balloon_coco(ray_local):
    """README of ../shared/data: kangaroo 132 / 32 images, one JPEG truncated; balloon
    61 / 13 images, one class each."""
    kangaroo = SOURCES.get("voc")(cfg_for("voc", shared("kangaroo_voc"), max_boxes=10))
    assert kangaroo.class_names == ["kangaroo"]
    assert kangaroo.train.count() + kangaroo.val.count() == 163
    [truncated] = kangaroo.skipped
    assert truncated.endswith(
        "00090.jpg: not a readable image (OSError: image file is truncated "
        "(20 bytes not processed))"
    )
    balloon = SOURCES.get("coco")(cfg_for("coco", shared("balloon"), max_boxes=40))
    assert balloon.class_names == ["balloon"]
    assert (balloon.train.count(), balloon.val.count()) == (61, 13)
    boxes = sum(int((row["labels"] >= 0).sum()) for row in balloon.train.take_all())
    assert boxes == 255


def test_predicted_boxes_go_back_to_the_files_own_pixels(tmp_path):
    """What predict's model saw was the letterboxed photo (64 px, bands above and below);
    the box it found there is written in the file's own pixels and drawn on its overlay."""
    from raycv.overlays import box_colours
    from raycv.tasks.detection_outputs import RenderBoxes

    photo = tmp_path / "p.png"
    write_photo(photo, BOXES["c"])
    batch = {
        "path": np.array([str(photo)], dtype=object),
        "error": np.array([""], dtype=object),
        "boxes": np.array([[[16, 24, 48, 40], [0, 0, 0, 0]]], np.float32),
        "labels": np.array([[0, -1]]),
        "scores": np.array([[0.9, 0.0]], np.float32),
    }
    out = RenderBoxes(64, box_colours())(batch)
    assert out["error"].tolist() == [""]
    np.testing.assert_allclose(out["boxes"][0, 0], BOXES["c"], atol=1e-4)
    overlay = np.asarray(Image.open(io.BytesIO(out["overlay_jpg"][0])))
    assert overlay.shape == (HEIGHT, WIDTH, 3)
    assert np.abs(overlay[12, 40:60].astype(int) - box_colours()[0]).max() < 60  # top edge
