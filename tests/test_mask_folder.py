"""The mask_folder source: segmentation images and masks found in the common layouts,
paired by stem, decoded to the working size on a real local Ray, and bad annotations
skipped and counted (or fatal with data.bad_images=fail), never trained on misaligned.

Every test picture encodes its number k twice: its left third is painted colour(k) and its
mask's left third holds class k, so a row whose image and mask came from different files,
or a mask that was cropped or shifted, shows after decoding."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

from raycv.config import from_dict
from raycv.data import mask_layouts
from raycv.data.mask_layouts import VOC_CLASSES, find_layout
from raycv.data.masks import MaskSpec, decode_pair, read_mask
from raycv.data.sources import SOURCES, split_indices
from raycv.errors import BadImageError, DataError

SIZE = 24  # the working size
WIDTH, HEIGHT = 36, 24  # every picture: wide, so squeezing and cropping differ
CLASSES = ["background", *(f"class{k}" for k in range(1, 9))]
# VOC's colours: a palette mask converted to RGB would no longer hold its indices.
PALETTE = [
    (0, 0, 0),
    (128, 0, 0),
    (0, 128, 0),
    (128, 128, 0),
    (0, 0, 128),
    (128, 0, 128),
    (0, 128, 128),
    (128, 128, 128),
    (64, 0, 0),
]
GREY = (128, 128, 128)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def colour(k: int) -> tuple[int, int, int]:
    return (25 * k + 30, 220 - 20 * k, 90)


def mask_ids(k: int, size: tuple[int, int] = (WIDTH, HEIGHT)) -> np.ndarray:
    ids = np.zeros(size[::-1], np.uint8)
    ids[:, : size[0] // 3] = k
    return ids


def mask_image(ids: np.ndarray, mode: str) -> Image.Image:
    """``ids`` saved as a grey, palette, grey-as-RGB or colour-coded RGB mask."""
    if mode == "L":
        return Image.fromarray(ids)
    if mode == "P":
        img = Image.frombytes("P", ids.shape[::-1], ids.tobytes())
        # 256 entries, as VOC's: a shorter palette is saved in fewer bits, cutting 255 to 15.
        colours = PALETTE + [(0, 0, 0)] * (255 - len(PALETTE)) + [(224, 224, 192)]
        img.putpalette([c for rgb in colours for c in rgb])
        return img
    if mode == "RGB grey":
        return Image.fromarray(np.repeat(ids[..., None], 3, axis=2))
    return Image.fromarray(np.asarray(PALETTE, np.uint8)[ids])  # colour-coded


def write_pair(image: Path, mask: Path | None, k: int, mode: str = "L") -> None:
    """Picture k at ``image`` and its mask at ``mask`` (no mask when None)."""
    img = Image.new("RGB", (WIDTH, HEIGHT), GREY)
    img.paste(colour(k), (0, 0, WIDTH // 3, HEIGHT))
    image.parent.mkdir(parents=True, exist_ok=True)
    img.save(image, quality=95) if image.suffix == ".jpg" else img.save(image)
    if mask is not None:
        mask.parent.mkdir(parents=True, exist_ok=True)
        mask_image(mask_ids(k), mode).save(mask)


def cfg_for(root: Path, mask_folder: dict | None = None, **data):
    return from_dict(
        {
            "task": "segmentation",
            "model": {"name": "lraspp_mobilenet_v3_large"},
            "data": {
                "source": "mask_folder",
                "mask_folder": {"root": str(root), **(mask_folder or {})},
                "working_size": SIZE,
                **data,
            },
        }
    )


def picture_numbers(ds) -> list[int]:
    """Each row's k, after checking that its image and mask show the same k, squeezed whole
    into the square (the left third of 36 columns is 8 of 24, nearest; a centre crop
    would keep 6) with the aspect ratio that undoes the squeeze."""
    found = []
    for row in ds.take_all():
        image, mask = row["image"], row["mask"]
        assert set(row) == {"image", "mask", "aspect"}
        assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)
        assert mask.dtype == np.uint8 and mask.shape == (SIZE, SIZE)
        assert row["aspect"] == pytest.approx(WIDTH / HEIGHT)
        k = int(mask[0, 0])
        assert (mask[:, : SIZE // 3] == k).all() and (mask[:, SIZE // 3 :] == 0).all()
        np.testing.assert_allclose(image[:, 2, :], np.broadcast_to(colour(k), (SIZE, 3)), atol=6)
        np.testing.assert_allclose(image[:, -3, :], np.broadcast_to(GREY, (SIZE, 3)), atol=6)
        found.append(k)
    return found


def write_classes(root: Path) -> None:
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")


# ------------------------------------------------------------------ the layouts, on Ray


def test_split_folders_with_images_and_masks(ray_local, tmp_path):
    """The balloon layout: <split>/images/*.jpg + <split>/masks/*.png; grey masks, and in
    val RGB masks whose channels are equal (read as grey)."""
    root = tmp_path / "balloon"
    for k in range(1, 6):
        write_pair(root / "train/images" / f"b{k}.jpg", root / "train/masks" / f"b{k}.png", k)
    for k in (6, 7):
        write_pair(
            root / "val/images" / f"b{k}.jpg", root / "val/masks" / f"b{k}.png", k, "RGB grey"
        )
    (root / "annotations").mkdir()  # COCO json beside the masks: not a layout of its own
    write_classes(root)

    data = SOURCES.get("mask_folder")(cfg_for(root))

    assert data.class_names == CLASSES and data.skipped == []
    assert picture_numbers(data.train) == [1, 2, 3, 4, 5]
    assert picture_numbers(data.val) == [6, 7]


def test_camvid_folders_with_palette_masks(ray_local, tmp_path):
    """train/ + trainannot/, val/ + valannot/ (test/ left alone); palette PNG masks are read
    as their indices, and class names come from the config."""
    root = tmp_path / "camvid"
    for split, ks in (("train", [1, 3, 5, 8]), ("val", [2, 4]), ("test", [6])):
        for k in ks:
            stem = f"0001TP_00{k}690"
            write_pair(root / split / f"{stem}.png", root / f"{split}annot" / f"{stem}.png", k, "P")

    data = SOURCES.get("mask_folder")(cfg_for(root, {"classes": CLASSES}))

    assert data.class_names == CLASSES
    assert picture_numbers(data.train) == [1, 3, 5, 8]
    assert picture_numbers(data.val) == [2, 4]


def test_root_images_and_masks_carve_the_val_split(ray_local, tmp_path):
    """images/ + masks/ at the root, colour-coded RGB masks read through the palette; the
    val pairs are the ones split_indices picks over the pairs in name order."""
    root = tmp_path / "flat"
    for k in range(1, 9):
        write_pair(root / "images" / f"p{k}.png", root / "masks" / f"p{k}.png", k, "RGB")
    write_classes(root)
    cfg = cfg_for(root, {"palette": PALETTE}, val_fraction=0.25, split_seed=3)

    data = SOURCES.get("mask_folder")(cfg)

    train_idx, val_idx = split_indices(8, 0.25, 3)
    assert picture_numbers(data.train) == [int(i) + 1 for i in train_idx]
    assert picture_numbers(data.val) == [int(i) + 1 for i in val_idx]


BESIDE = {"root": {"": [1, 2, 3, 4, 5, 6]}, "split": {"train": [1, 2, 3, 4], "val": [5, 6]}}


@pytest.mark.parametrize("where", list(BESIDE))
def test_masks_beside_their_images(ray_local, tmp_path, where):
    """X.jpg + X_mask.png in one folder: the root (val carved) or train/ and val/."""
    root = tmp_path / "beside"
    for split, ks in BESIDE[where].items():
        for k in ks:
            write_pair(root / split / f"cell {k}.jpg", root / split / f"cell {k}_mask.png", k)
    write_classes(root)

    data = SOURCES.get("mask_folder")(cfg_for(root, val_fraction=0.3))

    train, val = picture_numbers(data.train), picture_numbers(data.val)
    if where == "root":
        assert len(val) == 2 and sorted(train + val) == [1, 2, 3, 4, 5, 6]
    else:
        assert (train, val) == ([1, 2, 3, 4], [5, 6])


def test_pascal_voc_reads_the_listed_stems(ray_local, tmp_path):
    """JPEGImages/ + SegmentationClass/ (palette masks with a 255 border: "ignore") and
    ImageSets/Segmentation/{train,val}.txt; VOC's own 21 class names when none are given;
    an image that no list names is left out."""
    root = tmp_path / "VOC2012"
    for k in range(1, 7):
        write_pair(root / "JPEGImages" / f"2007_00{k}.jpg", None, k)
        ids = mask_ids(k)
        ids[0, :] = 255
        mask_image(ids, "P").save(_made(root / "SegmentationClass") / f"2007_00{k}.png")
    write_pair(root / "JPEGImages" / "2008_999.jpg", None, 8)  # detection only, no mask
    (root / "Annotations").mkdir()
    lists = _made(root / "ImageSets" / "Segmentation")
    (lists / "train.txt").write_text("2007_001\n2007_002\n2007_004\n2007_006\n")
    (lists / "val.txt").write_text("2007_003\n2007_005\n")

    data = SOURCES.get("mask_folder")(cfg_for(root))

    assert data.class_names == list(VOC_CLASSES) and len(VOC_CLASSES) == 21
    train, val = data.train.take_all(), data.val.take_all()
    assert [int(row["mask"][-1, 0]) for row in train] == [1, 2, 4, 6]
    assert [int(row["mask"][-1, 0]) for row in val] == [3, 5]
    assert all(row["mask"][0].tolist() == [255] * SIZE for row in train + val)
    assert data.skipped == []


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ------------------------------------------------------------------ bad annotations


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()[:300]


def write_bad_pairs(root: Path) -> list[str]:
    """Five bad kinds in train/ beside good pairs 1-4; the paths they should be counted by."""
    images, masks = root / "train/images", root / "train/masks"
    for k in range(1, 5):
        write_pair(images / f"good{k}.png", masks / f"good{k}.png", k)
    write_pair(images / "no_mask.png", None, 5)
    write_pair(images / "small_mask.png", None, 5)
    Image.fromarray(mask_ids(5, (WIDTH // 2, HEIGHT // 2))).save(masks / "small_mask.png")
    write_pair(images / "stray_value.png", None, 6)
    ids = mask_ids(6)
    ids[3, 3] = 77  # no class, and not the ignore index
    Image.fromarray(ids).save(masks / "stray_value.png")
    write_pair(images / "broken_mask.png", None, 7)
    (masks / "broken_mask.png").write_bytes(b"not a png")
    (images / "truncated.jpg").write_bytes(truncated_jpeg())
    Image.fromarray(mask_ids(1)).save(masks / "truncated.png")
    write_pair(images / "colours.png", masks / "colours.png", 2, "RGB")  # no palette set
    write_pair(root / "val/images/v8.png", root / "val/masks/v8.png", 8)
    write_classes(root)
    return [
        str(images / "no_mask.png"),
        str(masks / "small_mask.png"),
        str(masks / "stray_value.png"),
        str(masks / "broken_mask.png"),
        str(images / "truncated.jpg"),
        str(masks / "colours.png"),
    ]


def test_bad_annotations_are_skipped_and_counted(ray_local, tmp_path, caplog):
    root = tmp_path / "bad"
    bad = write_bad_pairs(root)

    with caplog.at_level(logging.WARNING, logger="raycv.data.sources"):
        data = SOURCES.get("mask_folder")(cfg_for(root))

    assert sorted(data.skipped) == sorted(bad)
    assert picture_numbers(data.train) == [1, 2, 3, 4]
    assert picture_numbers(data.val) == [8]
    assert f"skipped {len(bad)} images without a usable mask" in caplog.text


def test_bad_mask_with_fail_mode_stops_naming_the_file(ray_local, tmp_path):
    root = tmp_path / "fail"
    write_pair(root / "train/images/a.png", root / "train/masks/a.png", 1)
    write_pair(root / "train/images/b.png", None, 2)
    Image.fromarray(mask_ids(2, (WIDTH, HEIGHT + 2))).save(root / "train/masks/b.png")
    write_pair(root / "val/images/c.png", root / "val/masks/c.png", 3)
    write_classes(root)

    with pytest.raises(BadImageError) as info:
        SOURCES.get("mask_folder")(cfg_for(root, bad_images="fail"))

    message = str(info.value)
    assert message.startswith(f"{root / 'train/masks/b.png'}: mask is 36x26 px but its image ")
    assert message.endswith(
        "(data.bad_images=fail; set data.bad_images=skip to leave such files out)"
    )
    assert "\n" not in message


def test_an_image_without_a_mask_fails_before_decoding(tmp_path):
    root = tmp_path / "missing"
    write_pair(root / "images/a.png", root / "masks/a.png", 1)
    write_pair(root / "images/b.png", root / "masks/b.png", 2)
    write_pair(root / "images/lonely.png", None, 3)
    write_classes(root)

    with pytest.raises(BadImageError, match=r"lonely\.png: no mask \(.*/masks/lonely\.png not"):
        SOURCES.get("mask_folder")(cfg_for(root, bad_images="fail"))


def encoded(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


GOOD_IMAGE = Image.new("RGB", (WIDTH, HEIGHT), GREY)
SPEC = MaskSpec(num_classes=3, ignore_index=255)
# kind -> (mask, file format, what the error says after the file name)
BAD_MASKS = {
    "other size": (mask_image(mask_ids(1, (WIDTH, HEIGHT - 1)), "L"), "PNG", "mask is 36x23 px"),
    "stray value": (mask_image(mask_ids(7), "L"), "PNG", "mask values 7 are neither class ids"),
    "colour-coded": (mask_image(mask_ids(1), "RGB"), "PNG", "colour-coded RGB mask; set data."),
    "cmyk": (Image.new("CMYK", (WIDTH, HEIGHT)), "TIFF", "a CMYK mask holds no class ids"),
    "16 bit": (
        Image.new("I;16", (WIDTH, HEIGHT), 300),
        "PNG",
        "mask values 300-300 do not fit 0-255",
    ),
    "unreadable": (None, "PNG", "not a readable mask (UnidentifiedImageError"),
}


@pytest.mark.parametrize("kind", list(BAD_MASKS))
def test_bad_masks_raise_naming_the_mask_file(kind):
    mask, fmt, says = BAD_MASKS[kind]
    data = b"GIF89a" if mask is None else encoded(mask, fmt)
    with pytest.raises(BadImageError) as info:
        decode_pair(encoded(GOOD_IMAGE), data, "/d/a.png", "/d/a_mask.png", SIZE, SPEC)
    assert str(info.value).startswith(f"/d/a_mask.png: {says}")
    assert "\n" not in str(info.value)


def test_ignore_index_and_palette_colours():
    ids = mask_ids(2)
    ids[0] = 255
    assert read_mask(encoded(mask_image(ids, "P")), "m.png").tolist() == ids.tolist()
    _, mask, _ = decode_pair(
        encoded(GOOD_IMAGE), encoded(mask_image(ids, "L")), "i", "m", SIZE, SPEC
    )
    assert mask[0].tolist() == [255] * SIZE and mask[1, 0] == 2
    palette = np.asarray(PALETTE, np.uint8)
    coloured = encoded(mask_image(mask_ids(5), "RGB"))
    assert read_mask(coloured, "m.png", palette).tolist() == mask_ids(5).tolist()
    with pytest.raises(BadImageError, match=r"m\.png: mask colour \(128, 0, 128\) is not in"):
        read_mask(coloured, "m.png", palette[:5])


def test_masks_are_compared_with_the_upright_photo():
    """A phone photo stored sideways (EXIF orientation 6): its mask is drawn on the upright
    photo, 24 x 36, and one drawn on the stored pixels, 36 x 24, is refused."""
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = encoded(GOOD_IMAGE, "JPEG", exif=exif.tobytes())
    upright = encoded(mask_image(mask_ids(1, (HEIGHT, WIDTH)), "L"))
    image, mask, aspect = decode_pair(photo, upright, "p.jpg", "m.png", SIZE, SPEC)
    assert aspect == pytest.approx(HEIGHT / WIDTH)
    assert image.shape == (SIZE, SIZE, 3) and mask[:, : SIZE // 3].min() == 1
    stored = encoded(mask_image(mask_ids(1), "L"))
    with pytest.raises(BadImageError, match=r"m\.png: mask is 36x24 px but .* 24x36 \(after EXIF"):
        decode_pair(photo, stored, "p.jpg", "m.png", SIZE, SPEC)


# ------------------------------------------------------------------ finding the layout


def layout_of(root: Path, **mask_folder):
    cfg = cfg_for(root, mask_folder)
    return find_layout(pafs.LocalFileSystem(), str(root), cfg.data.mask_folder)


def test_two_layouts_at_once_are_ambiguous(tmp_path):
    root = tmp_path / "both"
    write_pair(root / "train/images/a.png", root / "train/masks/a.png", 1)
    write_pair(root / "images/b.png", root / "masks/b.png", 2)
    with pytest.raises(DataError) as info:
        layout_of(root)
    assert str(info.value) == (
        f"{root}: ambiguous image/mask layout, found <split>/images/ + <split>/masks/ and "
        "images/ + masks/; set data.mask_folder.images and data.mask_folder.masks (looked for "
        "in <split>/ first, then in the root)"
    )
    # Setting the names picks the split folders, looked for first.
    assert layout_of(root, images="images", masks="masks").train.pairs == [
        (str(root / "train/images/a.png"), str(root / "train/masks/a.png"))
    ]


def test_two_mask_folders_are_ambiguous(tmp_path):
    root = tmp_path / "two"
    write_pair(root / "images/a.png", root / "masks/a.png", 1)
    (root / "labels").mkdir()
    with pytest.raises(DataError, match=r"several masks folders \(labels/, masks/\); set data"):
        layout_of(root)
    assert len(layout_of(root, masks="masks").train.pairs) == 1


def test_an_unknown_layout_lists_what_it_found(tmp_path):
    root = tmp_path / "odd"
    write_pair(root / "pictures/a.png", root / "outlines/a.png", 1)
    (root / "pictures/extra").mkdir()
    with pytest.raises(DataError) as info:
        layout_of(root)
    message = str(info.value)
    assert message.startswith(
        f"{root}: no known image/mask layout (found sub-folders outlines/, pictures/ (extra/); "
        "0 image files in the root); expected <split>/images/ + <split>/masks/, train/ + "
    )
    assert message.endswith(
        "or set data.mask_folder.images and data.mask_folder.masks (and .mask_suffix)"
    )
    named = layout_of(root, images="pictures", masks="outlines")
    assert named.train.pairs == [(str(root / "pictures/a.png"), str(root / "outlines/a.png"))]


def test_a_suffix_on_mask_names_is_found_or_set(tmp_path):
    root = tmp_path / "suffix"
    for k in (1, 2, 10):  # img_1 is a prefix of img_10: "0" is no suffix
        write_pair(root / f"images/img_{k}.jpg", root / f"masks/img_{k}_L.png", k)
    found = layout_of(root)
    assert [_stem_pair(p) for p in found.train.pairs] == [
        ("img_1", "img_1_L"),
        ("img_10", "img_10_L"),
        ("img_2", "img_2_L"),
    ]
    assert layout_of(root, mask_suffix="_L").train.pairs == found.train.pairs
    with pytest.raises(DataError, match=r"images: found images/ \+ masks/ but no image with a"):
        layout_of(root, mask_suffix="")


def _stem_pair(pair: tuple[str, str]) -> tuple[str, str]:
    return Path(pair[0]).stem, Path(pair[1]).stem


def test_class_names_are_asked_for_when_missing(tmp_path):
    root = tmp_path / "nameless"
    write_pair(root / "images/a.png", root / "masks/a.png", 1)
    cfg = cfg_for(root)
    layout = layout_of(root)
    with pytest.raises(DataError) as info:
        mask_layouts.class_names(pafs.LocalFileSystem(), str(root), cfg.data.mask_folder, layout)
    assert str(info.value) == (
        f"{root}: no class names; set data.mask_folder.classes (background first, in "
        f"pixel-value order) or write them into {root}/classes.txt, one per line"
    )


def test_a_classification_task_is_told_to_choose_segmentation(tmp_path):
    cfg = from_dict({"data": {"source": "mask_folder", "mask_folder": {"root": str(tmp_path)}}})
    with pytest.raises(DataError, match=r"mask_folder has no label for task=classification \(it"):
        SOURCES.get("mask_folder")(cfg)


# ------------------------------------------------------------------ real data


@pytest.mark.skipif(
    not (SHARED_DATA / "balloon").is_dir(), reason="../shared/data is not beside this clone"
)
def test_real_balloon_masks(ray_local):
    root = SHARED_DATA / "balloon"
    data = SOURCES.get("mask_folder")(cfg_for(root, working_size=32))
    assert data.class_names == ["background", "balloon"] and data.skipped == []
    train, val = data.train.take_all(), data.val.take_all()
    assert (len(train), len(val)) == (61, 13)
    values = set()
    for row in train + val:
        assert row["image"].shape == (32, 32, 3) and row["mask"].shape == (32, 32)
        values |= set(np.unique(row["mask"]).tolist())
    assert values == {0, 1}
    first = sorted((root / "train/images").glob("*.jpg"))[0]
    width, height = Image.open(first).size
    assert train[0]["aspect"] == pytest.approx(width / height)
