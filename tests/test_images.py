"""Image hygiene: real-world files through ``decode`` and through the folder source on Ray.

Palette, greyscale, CMYK and alpha images come out as uint8 RGB of the working size;
unreadable files raise ``BadImageError`` naming the file, and the folder source skips and
lists them (``data.bad_images=skip``) or stops on them (``fail``)."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from raycv.config import from_dict
from raycv.data.images import decode, decode_batch, decode_whole, to_rgb
from raycv.data.sources import SOURCES, SourceData, split_indices
from raycv.errors import BadImageError

SIZE = 24
RED, WHITE = (220, 20, 40), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but holds no pixels (bomb check only)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    )


def half_transparent_rgba() -> Image.Image:
    """Left half fully transparent (black underneath), right half opaque red."""
    img = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    img.paste((*RED, 255), (20, 0, 40, 40))
    return img


def half_transparent_palette() -> Image.Image:
    """Palette image: index 0 (black) is transparent on the left, index 1 is red."""
    img = Image.new("P", (40, 40), 0)
    img.putpalette([0, 0, 0, *RED] + [0] * 762)
    img.paste(1, (20, 0, 40, 40))
    img.info["transparency"] = 0
    return img


def palette_opaque() -> Image.Image:
    return Image.new("RGB", (40, 30), RED).convert("P", palette=Image.Palette.ADAPTIVE)


def wide_png() -> Image.Image:
    return Image.new("RGB", (20_000, 10), RED)


# name -> (bytes, expected colour at the left edge, at the right edge, tolerance)
GOOD_FILES: dict[str, tuple[Callable[[], bytes], tuple, tuple, int]] = {
    "palette.png": (lambda: encode(palette_opaque(), "PNG"), RED, RED, 0),
    "palette_transparent.png": (
        lambda: encode(half_transparent_palette(), "PNG", transparency=0),
        WHITE,
        RED,
        0,
    ),
    "palette.gif": (
        lambda: encode(half_transparent_palette(), "GIF", transparency=0),
        WHITE,
        RED,
        0,
    ),
    "grey.jpg": (lambda: encode(Image.new("L", (40, 30), 128), "JPEG"), (128,) * 3, (128,) * 3, 2),
    "grey_alpha.png": (
        lambda: encode(Image.new("LA", (30, 30), (0, 0)), "PNG"),
        WHITE,
        WHITE,
        0,
    ),
    "cmyk.jpg": (
        lambda: encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"),
        (255, 0, 0),
        (255, 0, 0),
        3,
    ),
    "rgba.png": (lambda: encode(half_transparent_rgba(), "PNG"), WHITE, RED, 0),
    "rgba.webp": (lambda: encode(half_transparent_rgba(), "WEBP", lossless=True), WHITE, RED, 0),
    "one_pixel.png": (lambda: encode(Image.new("RGB", (1, 1), RED), "PNG"), RED, RED, 0),
    "wide_20000x10.png": (lambda: encode(wide_png(), "PNG"), RED, RED, 0),
    "grey16.png": (lambda: encode(Image.new("I;16", (30, 30), 40000), "PNG"), None, None, 0),
}


@pytest.mark.parametrize("name", list(GOOD_FILES))
def test_decode_gives_rgb_uint8_of_the_working_size(name):
    make, left, right, tolerance = GOOD_FILES[name]
    image = decode(make(), f"/data/{name}", SIZE)
    assert image.dtype == np.uint8
    assert image.shape == (SIZE, SIZE, 3)
    if left is not None:
        # Columns well away from the middle, where bilinear resizing blends the halves.
        np.testing.assert_allclose(
            image[:, :4], np.broadcast_to(left, (SIZE, 4, 3)), atol=tolerance
        )
        np.testing.assert_allclose(
            image[:, -4:], np.broadcast_to(right, (SIZE, 4, 3)), atol=tolerance
        )


def test_decode_resizes_the_shorter_side_and_crops_the_centre():
    img = Image.new("RGB", (90, 30), (0, 0, 255))
    img.paste(RED, (30, 0, 60, 30))  # the centre third is red
    image = decode(encode(img, "PNG"), "wide.png", SIZE)
    # Bilinear resizing may blend the outermost columns with the blue beyond the crop.
    np.testing.assert_array_equal(image[:, 2:-2], np.broadcast_to(RED, (SIZE, SIZE - 4, 3)))


def test_decode_follows_exif_orientation():
    img = Image.new("RGB", (60, 20), (0, 0, 0))
    img.paste(WHITE, (0, 0, 30, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display: the left half goes on top
    upright = decode(encode(img, "JPEG"), "plain.jpg", 20)[..., 0].astype(int)
    rotated = decode(encode(img, "JPEG", exif=exif.tobytes()), "rotated.jpg", 20)[..., 0]
    assert upright[:, :5].mean() > 240 and upright[:, -5:].mean() < 15
    assert rotated[:5].mean() > 240 and rotated[-5:].mean() < 15


def test_decode_follows_exif_orientation_of_alpha_images():
    img = Image.new("RGBA", (60, 20), (0, 0, 0, 255))
    img.paste((255, 255, 255, 255), (0, 0, 30, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = decode(encode(img, "PNG", exif=exif.tobytes()), "rotated.png", 20)[..., 0]
    assert rotated[:5].mean() > 240 and rotated[-5:].mean() < 15


def test_decode_scales_16_bit_greyscale():
    mid_grey = 128 * 257  # 50 % in 16 bits
    image = decode(encode(Image.new("I;16", (30, 30), mid_grey), "PNG"), "grey16.png", SIZE)
    np.testing.assert_allclose(image, 128, atol=1)


def truncated_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    return data[: len(data) // 2]


BAD_FILES: dict[str, Callable[[], bytes]] = {
    "truncated.jpg": truncated_jpeg,
    "notes renamed.jpg": lambda: b"shopping list: milk, eggs\n",
    "empty.jpg": lambda: b"",
    "bomb.png": lambda: png_header(30_000, 30_000),  # 900 M pixels: over twice the limit
    "big.png": lambda: png_header(25_000, 20_000),  # 500 M pixels: over the limit
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_unreadable_file_raises_bad_image_error_naming_it(name):
    path = f"/data/train/cat/{name}"
    with pytest.raises(BadImageError) as info:
        decode(BAD_FILES[name](), path, SIZE)
    message = str(info.value)
    assert message.startswith(f"{path}: not a readable image (")
    assert "\n" not in message
    assert info.value.__cause__ is not None


def test_truncated_jpeg_is_really_a_jpeg_cut_short():
    whole = encode(Image.new("RGB", (64, 64), RED), "JPEG")
    assert decode(whole, "whole.jpg", SIZE).shape == (SIZE, SIZE, 3)
    assert truncated_jpeg()[:3] == whole[:3] == b"\xff\xd8\xff"


def test_decode_batch_flags_bad_files_with_a_zero_image():
    red = encode(Image.new("RGB", (40, 30), RED), "PNG")
    paths = ["/data/red.png", "/data/truncated.jpg", "/data/red again.png"]
    for whole in (False, True):
        images, aspects, errors = decode_batch([red, truncated_jpeg(), red], paths, SIZE, whole)
        assert images.shape == (3, SIZE, SIZE, 3) and images.dtype == np.uint8
        np.testing.assert_array_equal(images[[0, 2]], np.broadcast_to(RED, (2, SIZE, SIZE, 3)))
        assert not images[1].any()
        assert errors[0] == errors[2] == ""
        assert errors[1].startswith("/data/truncated.jpg: not a readable image (")
        assert aspects[[0, 2]].tolist() == pytest.approx([40 / 30 if whole else 1.0] * 2)
    empty, _, no_errors = decode_batch([], [], SIZE)
    assert empty.shape == (0, SIZE, SIZE, 3) and len(no_errors) == 0


def test_decode_whole_keeps_the_sides_that_a_centre_crop_cuts_off():
    """A wide photo, red | green | blue in thirds: the centre crop keeps only green; the whole
    decode keeps all three, squeezed into the square, and the aspect that undoes it."""
    img = Image.new("RGB", (96, 32), (0, 200, 0))
    img.paste(RED, (0, 0, 32, 32))
    img.paste((0, 0, 220), (64, 0, 96, 32))
    data = encode(img, "PNG")
    cropped = decode(data, "wide.png", SIZE)
    pixels, aspect = decode_whole(data, "wide.png", SIZE)
    assert aspect == 3.0 and pixels.shape == (SIZE, SIZE, 3)
    for part, colour in zip(np.split(pixels, 3, axis=1), (RED, (0, 200, 0), (0, 0, 220))):
        inner = part[:, 1:-1].reshape(-1, 3).astype(int)  # away from the bilinear seams
        assert np.abs(inner - colour).max() <= 2, (colour, inner.min(0), inner.max(0))
    assert np.abs(cropped[:, 1:-1].astype(int) - (0, 200, 0)).max() <= 2


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(
    not (SHARED_DATA / "clothing6").is_dir(), reason="../shared/data is not beside this clone"
)
def test_real_photos_decode_whole_in_their_own_proportions():
    """Real portrait and landscape JPEGs (EXIF orientation, draft decoding): the whole photo
    is squeezed into the square, with the aspect ratio the crops are drawn in."""
    files = sorted((SHARED_DATA / "clothing6" / "train").glob("*/*.jpg"))[::40]
    aspects = []
    for path in files:
        pixels, aspect = decode_whole(path.read_bytes(), str(path), 37)
        photo = to_rgb(ImageOps.exif_transpose(Image.open(path)))
        aspects.append(photo.width / photo.height)
        assert aspect == pytest.approx(aspects[-1], rel=0.02), path
        expected = np.asarray(photo.resize((37, 37), Image.Resampling.BOX), dtype=float)
        gap = np.abs(pixels - expected).mean()  # the same picture, all of it
        cropped = np.abs(decode(path.read_bytes(), str(path), 37) - expected).mean()
        assert gap < 8 and (cropped > 3 * gap or abs(aspect - 1) < 0.1), (path, gap, cropped)
    assert min(aspects) < 0.8 and max(aspects) > 1.2  # both portraits and landscapes


# ------------------------------------------------------------------ folder source on Ray

MODES = ["RGB", "P", "L", "CMYK", "RGBA", "LA"]


def draw(index: int, mode: str) -> Image.Image:
    """A distinct, never all-black picture in ``mode``."""
    rng = np.random.default_rng(index)
    img = Image.fromarray(rng.integers(40, 255, (30 + index % 7, 36, 3), dtype=np.uint8))
    if mode == "P":
        return img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return img.convert(mode)


def write_class(folder: Path, count: int, start: int = 0, names: Callable | None = None) -> list:
    """``count`` good images in rotating modes and formats; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        mode = MODES[i % len(MODES)]
        fmt = "JPEG" if mode in ("L", "CMYK", "RGB") and i % 2 else "PNG"
        stem = names(i) if names else f"img_{i:03d}"
        path = folder / f"{stem}.{'jpg' if fmt == 'JPEG' else 'png'}"
        draw(i, mode).save(path, fmt)
        paths.append(path)
    return paths


def write_bad_files(folder: Path) -> list[Path]:
    bad = [folder / "truncated.jpg", folder / "notes.txt", folder / "empty.png"]
    bad[0].write_bytes(truncated_jpeg())
    bad[1].write_text("these are cats\n")
    bad[2].write_bytes(b"")
    return bad


def folder_cfg(root: Path, **data):
    return from_dict(
        {
            "data": {"source": "folder", "folder": {"root": str(root)}, **data},
            "model": {"image_size": 32},
        }
    )


def rows(ds) -> list[dict]:
    return ds.take_all()


def check_images(train: list[dict], val: list[dict], size: int, whole: bool = True) -> None:
    """Training rows carry the aspect ratio of the whole image they squeeze (unless
    centre-cropped on purpose); validation rows are centre crops."""
    cropped = {"image", "label"}
    columns = [cropped | ({"aspect"} if whole else set())] * len(train) + [cropped] * len(val)
    for row, expected in zip(train + val, columns):
        assert set(row) == expected
        image = row["image"]
        assert image.dtype == np.uint8 and image.shape == (size, size, 3)
        assert image.max() > 0, "a zero placeholder of a skipped file slipped through"


def label_counts(found: list[dict], num_classes: int) -> list[int]:
    return np.bincount([row["label"] for row in found], minlength=num_classes).tolist()


@pytest.fixture(scope="module")
def split_tree(tmp_path_factory) -> dict:
    """root/train/{ant,bee,cat} and root/val/{ant,bee,cat}, with bad files in train/bee
    and val/cat, plus a hidden folder that is not a class."""
    root = tmp_path_factory.mktemp("split") / "root"
    good = {"train": [10, 11, 9], "val": [3, 2, 4]}
    bad = []
    for split, counts in good.items():
        for c, (name, count) in enumerate(zip(["ant", "bee", "cat"], counts)):
            write_class(root / split / name, count, start=100 * c)
    bad += write_bad_files(root / "train" / "bee")
    (root / "val" / "cat" / "broken.jpg").write_bytes(truncated_jpeg())
    bad.append(root / "val" / "cat" / "broken.jpg")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    return {"root": root, "good": good, "bad": bad}


def test_folder_with_val_split(ray_local, split_tree):
    cfg = folder_cfg(split_tree["root"])
    data: SourceData = SOURCES.get("folder")(cfg)

    assert data.class_names == ["ant", "bee", "cat"]
    assert sorted(data.skipped) == sorted(str(p) for p in split_tree["bad"])
    train, val = rows(data.train), rows(data.val)
    assert label_counts(train, 3) == split_tree["good"]["train"]
    assert label_counts(val, 3) == split_tree["good"]["val"]
    check_images(train, val, cfg.working_size)
    assert cfg.working_size == 37
    # Each training row squeezes its whole image: the aspect undoes it (draw(): 36 px wide).
    heights = {round(36 / row["aspect"]) for row in train}
    assert heights == {30 + i for i in range(7)}, heights


def test_folder_training_images_centre_cropped_on_request(ray_local, split_tree):
    cfg = folder_cfg(split_tree["root"])
    cfg.data.folder.train_images = "centre_crop"
    data = SOURCES.get("folder")(cfg)
    check_images(rows(data.train), rows(data.val), cfg.working_size, whole=False)


def test_folder_without_val_split_carves_one(ray_local, tmp_path):
    root = tmp_path / "root"
    counts = [10, 12]
    for c, name in enumerate(["dog", "cat"]):
        write_class(root / "train" / name, counts[c], start=50 * c)
    bad = write_bad_files(root / "train" / "dog")
    cfg = folder_cfg(root, val_fraction=0.25)

    data = SOURCES.get("folder")(cfg)

    assert data.class_names == ["cat", "dog"]
    assert sorted(data.skipped) == sorted(str(p) for p in bad)
    train, val = rows(data.train), rows(data.val)
    assert len(train) + len(val) == sum(counts)
    # The split is made over all 25 files (bad ones included), then bad files drop out.
    n_val = round(25 * 0.25)
    assert n_val - len(bad) <= len(val) <= n_val
    assert label_counts(train + val, 2) == [12, 10]
    check_images(train, val, cfg.working_size)


def image_keys(found: list[dict]) -> list[bytes]:
    return sorted(row["image"].tobytes() for row in found)


def test_carved_split_is_deterministic(ray_local, tmp_path):
    root = tmp_path / "root"  # class folders straight under the root, no split folders
    for c, name in enumerate(["a", "b", "c"]):
        write_class(root / name, 10, start=20 * c)

    def split(seed: int) -> tuple[list[dict], list[dict]]:
        data = SOURCES.get("folder")(folder_cfg(root, val_fraction=0.2, split_seed=seed))
        assert data.class_names == ["a", "b", "c"] and data.skipped == []
        return rows(data.train), rows(data.val)

    train, val = split(0)
    train_again, val_again = split(0)
    _, val_other = split(1)

    assert (len(train), len(val)) == (24, 6)
    assert image_keys(val) == image_keys(val_again)
    assert image_keys(train) == image_keys(train_again)
    assert image_keys(val) != image_keys(val_other)
    assert not set(image_keys(val)) & set(image_keys(train))
    # The same files as split_indices picks over the sorted file list.
    _, val_idx = split_indices(30, 0.2, 0)
    assert label_counts(val, 3) == np.bincount(val_idx // 10, minlength=3).tolist()


@pytest.fixture(scope="module")
def fail_mode_error(ray_local, tmp_path_factory) -> tuple[Exception, Path]:
    root = tmp_path_factory.mktemp("fail") / "root"
    write_class(root / "train" / "cat", 5)
    write_class(root / "train" / "dog", 5, start=10)
    bad = root / "train" / "dog" / "truncated.jpg"
    bad.write_bytes(truncated_jpeg())
    with pytest.raises(Exception) as info:
        SOURCES.get("folder")(folder_cfg(root, bad_images="fail"))
    return info.value, bad


def test_fail_mode_stops_on_the_bad_file(fail_mode_error):
    error, bad = fail_mode_error
    assert str(bad) in str(error)
    assert "not a readable image" in str(error)


def test_fail_mode_error_is_a_bad_image_error(fail_mode_error):
    error, _ = fail_mode_error
    assert isinstance(error, BadImageError)


def test_paths_with_spaces_and_non_ascii(ray_local, tmp_path):
    root = tmp_path / "données d'essai" / "root"
    classes = ["chat noir", "café", "狗"]
    for c, name in enumerate(classes):
        write_class(root / "train" / name, 4, start=10 * c, names=lambda i: f"photo été {i}")
        write_class(root / "val" / name, 2, start=10 * c + 5, names=lambda i: f"ø image {i}")
    bad = root / "train" / "café" / "reçu cassé.jpg"
    bad.write_bytes(truncated_jpeg())

    data = SOURCES.get("folder")(folder_cfg(root))

    assert data.class_names == sorted(classes)
    assert data.skipped == [str(bad)]
    train, val = rows(data.train), rows(data.val)
    assert label_counts(train, 3) == [4, 4, 4]
    assert label_counts(val, 3) == [2, 2, 2]
    check_images(train, val, 37)


DECODE_IN_A_WORKER = """
import pickle, sys
calls = pickle.loads(sys.stdin.buffer.read())
shapes = [call(batch)["image"].shape for call, batch in calls]
heavy = [m for m in ("torch", "torchvision", "raycv.tasks", "raycv.models") if m in sys.modules]
print(shapes, heavy)
"""


def test_source_batch_functions_run_in_a_process_without_torch(tmp_path):
    """What a Ray Data worker does with a source's batch function: unpickle it (importing
    its module) and call it. None may pull in torch: about 3 s per fresh worker process."""
    import pickle
    import subprocess
    import sys

    import pyarrow.fs as pafs

    from raycv.data.decoders import DecodeBoxes, DecodeFolder, RenderShapes
    from raycv.data.masks import DecodePairs, MaskSpec

    image, mask = tmp_path / "red" / "a.png", tmp_path / "a_mask.png"
    image.parent.mkdir()
    Image.new("RGB", (40, 30), RED).save(image)
    Image.new("L", (40, 30), 1).save(mask)
    fs, path = pafs.LocalFileSystem(), str(image)
    shapes = {"image_size": 32, "num_classes": 3, "difficulty": "easy", "seed": 0}
    boxes = {
        "path": [path],
        "size": np.array([[40, 30]]),
        "boxes": np.array([[[1, 2, 20, 20]]], np.float32),
        "labels": np.array([[0]]),
        "crowd": np.array([[False]]),
    }
    calls = [
        (RenderShapes(np.arange(2), shapes, SIZE), {"id": np.arange(2)}),
        (DecodeFolder(fs, {"red": 0}, SIZE, True), {"path": [path]}),
        (DecodeBoxes(fs, SIZE), boxes),
        (DecodePairs(fs, SIZE, MaskSpec(2)), {"image_path": [path], "mask_path": [str(mask)]}),
    ]
    out = subprocess.run(
        [sys.executable, "-c", DECODE_IN_A_WORKER],
        input=pickle.dumps(calls),
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert out.strip() == f"{[(2, SIZE, SIZE, 3)] + [(1, SIZE, SIZE, 3)] * 3} []"


def test_a_folder_file_gone_since_listing_is_flagged_with_why(tmp_path):
    import pyarrow.fs as pafs

    from raycv.data.decoders import DecodeFolder

    good = tmp_path / "red" / "a.png"
    good.parent.mkdir()
    Image.new("RGB", (40, 30), RED).save(good)
    gone = str(tmp_path / "red" / "gone.png")
    out = DecodeFolder(pafs.LocalFileSystem(), {"red": 0}, SIZE)({"path": [str(good), gone]})
    assert out["error"][0] == "" and out["image"][0].any()
    assert out["error"][1].startswith(f"{gone}: not readable (FileNotFoundError")
    assert not out["image"][1].any() and out["label"].tolist() == [0, 0]
