"""Detection annotations (COCO, Pascal VOC, YOLO) read into xyxy pixel boxes, class ids and
ignore flags; bad annotations fixed (clipped, dropped, background) or skipped and counted,
or fatal with fail_on_bad; and the two real detection samples read as they are."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import ExifTags, Image

from raycv.data.box_formats import BoxRecord, read_coco, read_voc, read_yolo
from raycv.errors import DataError

FS = pafs.LocalFileSystem()
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_image(path: Path, size: tuple[int, int], orientation: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    Image.new("RGB", size, (90, 120, 150)).save(path, exif=exif)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def by_name(records: list[BoxRecord]) -> dict[str, BoxRecord]:
    return {Path(r.image).name: r for r in records}


def assert_boxes(record: BoxRecord, boxes: list[list[float]], labels: list[int]) -> None:
    assert record.boxes.dtype == np.float32 and record.labels.dtype == np.int64
    np.testing.assert_allclose(record.boxes, np.array(boxes, np.float32).reshape(-1, 4))
    assert record.labels.tolist() == labels


# ------------------------------------------------------------------ COCO


def write_coco(path: Path, images: list[tuple], annotations: list[tuple], categories=None):
    """images: (id, file_name, width, height); annotations: (image_id, category_id, bbox,
    iscrowd)."""
    categories = categories or [{"id": 3, "name": "zebra"}, {"id": 1, "name": "cat"}]
    data = {
        "images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images],
        "annotations": [
            {"id": k, "image_id": i, "category_id": c, "bbox": b, "iscrowd": crowd}
            for k, (i, c, b, crowd) in enumerate(annotations, 1)
        ],
        "categories": categories,
    }
    write_text(path, json.dumps(data))


def test_coco_boxes_labels_ignore_and_class_order(tmp_path):
    write_image(tmp_path / "train/images/a.jpg", (40, 30))
    write_image(tmp_path / "train/images/b.jpg", (20, 20))
    write_coco(
        tmp_path / "annotations/instances_train.json",
        [(1, "a.jpg", 40, 30), (2, "b.jpg", 20, 20)],
        [(1, 1, [2, 3, 10, 5], 0), (1, 3, [5.5, 5, 4, 4], 1)],
    )
    data = read_coco(FS, str(tmp_path))
    assert data.class_names == ["cat", "zebra"]  # categories in id order: 1, 3
    assert list(data.splits) == ["train"]  # no val split: left out, not an error
    records = by_name(data.splits["train"])
    a, b = records["a.jpg"], records["b.jpg"]
    assert (a.image, a.width, a.height) == (str(tmp_path / "train/images/a.jpg"), 40, 30)
    assert_boxes(a, [[2, 3, 12, 8], [5.5, 5, 9.5, 9]], [0, 1])
    assert a.ignore.tolist() == [False, True]  # iscrowd
    assert_boxes(b, [], [])
    assert data.skipped == {"background images": 1} and data.bad == []


def test_coco_roboflow_layout_drops_the_dataset_category(tmp_path):
    """Roboflow: <split>/_annotations.coco.json beside the images, and a category 0 named
    after the dataset, the supercategory of the real ones, with no boxes."""
    for split in ("train", "val"):
        write_image(tmp_path / split / "a.jpg", (40, 30))
        write_coco(
            tmp_path / split / "_annotations.coco.json",
            [(0, "a.jpg", 40, 30)],
            [(0, 1, [0, 0, 4, 4], 0)],
            [
                {"id": 0, "name": "pets", "supercategory": "none"},
                {"id": 1, "name": "cat", "supercategory": "pets"},
            ],
        )
    data = read_coco(FS, str(tmp_path))
    assert data.class_names == ["cat"]
    assert [len(data.splits[s]) for s in ("train", "val")] == [1, 1]
    assert data.splits["val"][0].labels.tolist() == [0]


def test_coco_bad_annotations_are_fixed_or_skipped_and_counted(tmp_path):
    write_image(tmp_path / "images/train/a.jpg", (40, 30))
    json_path = tmp_path / "annotations/instances_train.json"
    write_coco(
        json_path,
        [(1, "a.jpg", 40, 30), (2, "gone.jpg", 40, 30)],
        [
            (1, 1, [30, 20, 20, 20], 0),  # partly outside: clipped to (30, 20, 40, 30)
            (1, 1, [5, 5, 0, 4], 0),  # no width: dropped
            (1, 9, [1, 1, 2, 2], 0),  # category 9 is not in categories
            (1, 1, "oops", 0),  # not a bbox
        ],
    )
    data = read_coco(FS, str(tmp_path))
    (a,) = data.splits["train"]
    assert_boxes(a, [[30, 20, 40, 30]], [0])
    assert data.skipped == {
        "clipped boxes": 1,
        "degenerate boxes": 1,
        "unknown classes": 1,
        "malformed annotations": 1,
        "missing files": 1,
    }
    assert all(line.startswith(str(json_path)) for line in data.bad)
    assert any("class 9 is not one of" in line for line in data.bad)
    # Entries are parsed before classes are looked up: the bad bbox is the first to stop it.
    with pytest.raises(DataError, match=rf"^{re.escape(str(json_path))}: annotation id=4 is not"):
        read_coco(FS, str(tmp_path), fail_on_bad=True)


def test_coco_file_that_does_not_parse_is_an_error(tmp_path):
    write_text(tmp_path / "annotations/instances_train.json", '{"images": [')
    with pytest.raises(DataError, match=r"instances_train\.json: not a COCO annotation file"):
        read_coco(FS, str(tmp_path))


# ------------------------------------------------------------------ Pascal VOC


def voc_xml(objects: list[tuple], size: tuple[int, int] | None = (40, 30)) -> str:
    """objects: (name, xmin, ymin, xmax, ymax, difficult)."""
    parts = ["<annotation><filename>x.jpg</filename>"]
    if size:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height></size>")
    for name, x0, y0, x1, y1, difficult in objects:
        box = f"<xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult>"
            f"<bndbox>{box}</bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def write_voc(root: Path, annotations: dict[str, str], train: list[str], val: list[str]):
    for stem, xml in annotations.items():
        write_text(root / f"Annotations/{stem}.xml", xml)
        write_image(root / f"JPEGImages/{stem}.jpg", (20, 10))
    write_text(root / "ImageSets/Main/train.txt", "".join(f"{s}\n" for s in train))
    write_text(root / "ImageSets/Main/val.txt", "".join(f"{s}\n" for s in val))


def test_voc_boxes_are_zero_based_with_difficult_ignored(tmp_path):
    write_voc(
        tmp_path,
        {
            "a": voc_xml([("dog", 3, 4, 12, 9, 0), ("cat", 1, 1, 40, 30, 1)]),
            "b": voc_xml([]),
            "c": voc_xml([("cat", 2, 2, 5, 5, 0)], size=None),  # size from the image: 20x10
        },
        ["a", "b"],
        ["c"],
    )
    data = read_voc(FS, str(tmp_path))
    assert data.class_names == ["cat", "dog"]  # every <name>, sorted
    a, b = data.splits["train"]
    assert (a.image, a.width, a.height) == (str(tmp_path / "JPEGImages/a.jpg"), 40, 30)
    assert_boxes(a, [[2, 3, 12, 9], [0, 0, 40, 30]], [1, 0])  # 1-based: minimums less 1
    assert a.ignore.tolist() == [False, True]
    assert_boxes(b, [], [])
    (c,) = data.splits["val"]
    assert (c.width, c.height) == (20, 10)
    assert data.skipped == {"background images": 1}

    data = read_voc(FS, str(tmp_path), class_names=["dog", "cat"])
    assert data.splits["train"][0].labels.tolist() == [0, 1]


def test_voc_bad_annotations_are_fixed_or_skipped_and_counted(tmp_path):
    objects = [
        ("cat", 31, 21, 50, 40, 0),  # partly outside the 40x30 image
        ("cat", 6, 5, 5, 9, 0),  # xmax before xmin: no width (xmin == xmax is 1 px in VOC)
        ("cow", 1, 1, 9, 9, 0),  # not one of the class names given
    ]
    write_voc(
        tmp_path,
        {
            "a": voc_xml(objects),
            "b": "<annotation><object><name>cat</name>",  # truncated
            "c": voc_xml([("cat", "x", 1, 9, 9, 0)]),
        },
        ["a", "b", "c"],
        ["a"],
    )
    data = read_voc(FS, str(tmp_path), class_names=["cat"])
    a, c = data.splits["train"]
    assert_boxes(a, [[30, 20, 40, 30]], [0])
    assert_boxes(c, [], [])
    assert data.skipped == {
        "clipped boxes": 2,  # a is in both splits
        "degenerate boxes": 2,
        "unknown classes": 2,
        "malformed files": 1,
        "malformed annotations": 1,
        "background images": 1,  # c: its only object is malformed
    }
    b_xml = tmp_path / "Annotations/b.xml"
    assert any(line.startswith(f"{b_xml}: not a Pascal VOC annotation") for line in data.bad)
    assert any(line.startswith(f"{tmp_path}/Annotations/c.xml: object 1") for line in data.bad)
    with pytest.raises(DataError, match=rf"^{re.escape(str(b_xml))}: not a Pascal VOC"):
        read_voc(FS, str(tmp_path), class_names=["cat"], fail_on_bad=True)


def test_voc_without_its_lists_or_folders_is_a_one_line_error(tmp_path):
    write_voc(tmp_path, {"a": voc_xml([])}, ["a"], [])
    (tmp_path / "ImageSets/Main/train.txt").unlink()
    with pytest.raises(DataError, match=r"ImageSets/Main has no train.txt \(found val.txt\)"):
        read_voc(FS, str(tmp_path))
    (tmp_path / "Annotations/a.xml").unlink()
    (tmp_path / "Annotations").rmdir()
    with pytest.raises(DataError, match=r"not a Pascal VOC folder \(found ImageSets/ \(Main/\)"):
        read_voc(FS, str(tmp_path))


# ------------------------------------------------------------------ YOLO


def test_yolo_boxes_in_pixels_background_images_and_names(tmp_path):
    write_text(tmp_path / "data.yaml", "names:\n  0: cat\n  1: dog\n")
    write_image(tmp_path / "images/train/a.jpg", (40, 20))
    write_text(tmp_path / "labels/train/a.txt", "1 0.5 0.5 0.5 0.5\n\n0 0.25 0.5 0.5 1\n")
    write_image(tmp_path / "images/train/b.png", (40, 20))  # no label file
    write_image(tmp_path / "images/train/c.jpg", (40, 20))
    write_text(tmp_path / "labels/train/c.txt", "")
    write_image(tmp_path / "images/val/d.jpg", (40, 20), orientation=6)  # shown as 20x40
    write_text(tmp_path / "labels/val/d.txt", "0 0.5 0.5 0.5 0.5\n")
    data = read_yolo(FS, str(tmp_path))
    assert data.class_names == ["cat", "dog"]
    records = by_name(data.splits["train"])
    assert_boxes(records["a.jpg"], [[10, 5, 30, 15], [0, 0, 20, 20]], [1, 0])
    assert records["a.jpg"].ignore.tolist() == [False, False]
    assert_boxes(records["b.png"], [], [])
    assert_boxes(records["c.jpg"], [], [])
    (d,) = data.splits["val"]
    assert (d.width, d.height) == (20, 40)  # the upright image, as the decoder turns it
    assert_boxes(d, [[5, 10, 15, 30]], [0])
    assert data.skipped == {"background images": 2} and data.bad == []


def test_yolo_split_folders_and_explicit_names(tmp_path):
    write_image(tmp_path / "train/images/a.jpg", (40, 20))
    write_text(tmp_path / "train/labels/a.txt", "1 0.5 0.5 0.5 0.5\n")
    data = read_yolo(FS, str(tmp_path), splits=("train",), class_names=["cat", "dog"])
    assert data.class_names == ["cat", "dog"]
    assert data.splits["train"][0].labels.tolist() == [1]


def test_yolo_bad_lines_are_fixed_or_skipped_and_counted(tmp_path):
    write_text(tmp_path / "data.yaml", "names: [cat]\n")
    write_image(tmp_path / "images/train/a.jpg", (40, 20))
    label = tmp_path / "labels/train/a.txt"
    lines = [
        "0 0.9 0.5 0.4 0.2",  # partly outside: x from 28 to 44, clipped to 40
        "0 0.5 0.5 0.0 0.2",  # no width
        "0 0.5 0.5",  # 3 fields
        "0 0.5 0.5 abc 0.2",  # not a number
        "5 0.5 0.5 0.2 0.2",  # no class 5
    ]
    write_text(label, "\n".join(lines))
    data = read_yolo(FS, str(tmp_path), splits=("train",))
    (a,) = data.splits["train"]
    assert_boxes(a, [[28, 8, 40, 12]], [0])
    assert data.skipped == {
        "clipped boxes": 1,
        "degenerate boxes": 1,
        "malformed annotations": 2,
        "unknown classes": 1,
    }
    assert [line.split(": ")[0] for line in data.bad] == [f"{label}:3", f"{label}:4", f"{label}:5"]
    assert "class 5 is not one of the 1 classes of" in data.bad[2]
    with pytest.raises(DataError, match=rf"^{re.escape(str(label))}:3: expected 'class x_"):
        read_yolo(FS, str(tmp_path), splits=("train",), fail_on_bad=True)


def test_yolo_without_class_names_is_a_one_line_error(tmp_path):
    write_image(tmp_path / "images/train/a.jpg", (40, 20))
    (tmp_path / "labels/train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no data\.yaml"):
        read_yolo(FS, str(tmp_path))


@pytest.mark.parametrize(
    ("read", "expected"),
    [
        (read_coco, "no COCO 'train' split .* expected annotations/instances_<split>.json"),
        (read_voc, "not a Pascal VOC folder .* expected Annotations/"),
        (read_yolo, "no YOLO 'train' split .* expected images/<split>/"),
    ],
)
def test_a_folder_of_another_format_names_what_it_holds(tmp_path, read, expected):
    write_image(tmp_path / "pictures/a.jpg", (8, 8))
    with pytest.raises(DataError, match=expected) as caught:
        read(FS, str(tmp_path))
    assert "found pictures/" in str(caught.value) and "\n" not in str(caught.value)


# ------------------------------------------------------------------ the real samples


def shared(name: str) -> Path:
    root = SHARED_DATA / name
    if not root.is_dir():
        pytest.skip(f"{root} is not beside this clone")
    return root


def test_real_balloon_coco():
    """README: 1 class, 61 / 13 images, 255 / 50 objects, iscrowd 0."""
    root = shared("balloon")
    data = read_coco(FS, str(root))
    assert data.class_names == ["balloon"]
    train, val = data.splits["train"], data.splits["val"]
    assert (len(train), len(val)) == (61, 13)
    assert (sum(len(r.boxes) for r in train), sum(len(r.boxes) for r in val)) == (255, 50)
    assert not any(r.ignore.any() for r in train + val)
    first = by_name(train)["10464445726_6f1e3bbe6a_k.jpg"]  # bbox [241, 152.5, 205.8, 255]
    assert (first.width, first.height) == (512, 505)
    np.testing.assert_allclose(first.boxes[0], [241, 152.5, 446.8, 407.5], rtol=1e-6)
    # 3945575930_ce99a7e98d_b.jpg is 362 px high and one box ends at 169 + 193.5.
    assert data.skipped == {"clipped boxes": 1} and data.bad == []


def test_real_kangaroo_voc():
    """README: 1 class, 164 images (132 / 32); 00090.jpg is truncated, which is the
    decoder's to find: its annotation reads as any other."""
    root = shared("kangaroo_voc")
    data = read_voc(FS, str(root))
    assert data.class_names == ["kangaroo"]
    train, val = data.splits["train"], data.splits["val"]
    assert (len(train), len(val)) == (132, 32)
    assert all(len(r.boxes) >= 1 for r in train + val)
    assert sum(len(r.boxes) for r in train + val) == 266
    first = by_name(train)["00001.jpg"]  # xml: 233 89 386 262, 450x319
    assert (first.width, first.height) == (450, 319)
    assert first.boxes[0].tolist() == [232, 88, 386, 262]
    assert "00090.jpg" in by_name(train + val)
    assert data.skipped == {"clipped boxes": 1} and data.bad == []  # 00178.xml: xmin 0
