"""Segmentation masks: reading a mask file as class ids, checking it against its image, and
decoding an image and its mask together to the working size.

A mask's pixel values are class ids (0 = background, ``data.ignore_index`` = left out of the
loss). Palette PNGs ("P") are read as their indices, never converted to RGB; greyscale as its
values; colour-coded RGB masks through ``data.mask_folder.palette``. A mask that is not what
it claims to be (its size differs from its image's, a value that is no class) raises
``BadImageError`` naming the file: the caller skips and counts it or stops
(``data.bad_images``), but never trains on a mask that no longer lines up with its image.

EXIF orientation: the photo is turned upright (``exif_transpose``, as data/images.py does),
and masks carry no EXIF, so a mask must be drawn on the upright photo, as annotation tools
show it. Sizes are compared after the turn: a mask drawn on the raw pixels of a photo turned
by 90 degrees is caught by its size. One turned by 180 degrees keeps its size and cannot be
caught; such files are rare (phones store 90-degree turns)."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
from PIL import ExifTags, Image, ImageOps

from raycv.data.images import read_bytes, shrink, to_rgb
from raycv.errors import BadImageError

GREY_MODES = frozenset({"L", "P", "1"})  # one value per pixel, read as it is
WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L"})  # fine while values fit 8 bits
_SWAPS_SIDES = frozenset({5, 6, 7, 8})  # EXIF orientations that turn by 90 degrees


@dataclass(frozen=True)
class MaskSpec:
    """What a valid mask holds: ``num_classes`` ids and ``ignore_index``; ``palette``
    (num_classes, 3) uint8: the RGB colour of each class, for colour-coded masks."""

    num_classes: int
    ignore_index: int = 255
    palette: np.ndarray | None = None


def read_mask(data: bytes, path: str, palette: np.ndarray | None = None) -> np.ndarray:
    """Bytes of a mask file -> uint8 (H, W) class ids (not yet checked against the classes)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except Exception as e:  # PIL raises many types for broken files
        raise BadImageError(f"{path}: not a readable mask ({type(e).__name__}: {e})") from e
    if img.mode in GREY_MODES or img.mode in ("LA", "PA"):
        values = np.asarray(img.getchannel(0) if img.mode in ("LA", "PA") else img)
        return values.astype(np.uint8)
    if img.mode in WIDE_GREY_MODES:
        values = np.asarray(img, dtype=np.int64)
        if values.size and not 0 <= values.min() <= values.max() <= 255:
            raise BadImageError(
                f"{path}: mask values {values.min()}-{values.max()} do not fit 0-255; save "
                "class ids as an 8-bit PNG"
            )
        return values.astype(np.uint8)
    if img.mode in ("RGB", "RGBA"):
        return _colour_ids(np.asarray(img.convert("RGB")), path, palette)
    raise BadImageError(
        f"{path}: a {img.mode} mask holds no class ids; save masks as palette or greyscale PNG"
    )


def _colour_ids(rgb: np.ndarray, path: str, palette: np.ndarray | None) -> np.ndarray:
    """A colour-coded mask's class ids through ``palette``; without one, an RGB file whose
    channels are equal is a greyscale mask saved as RGB."""
    if palette is None:
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
            return np.ascontiguousarray(rgb[..., 0])
        raise BadImageError(
            f"{path}: colour-coded RGB mask; set data.mask_folder.palette to the RGB colour "
            "of each class, in class order"
        )
    codes = _rgb_codes(rgb)
    keys = _rgb_codes(palette)
    order = np.argsort(keys)
    at = np.minimum(np.searchsorted(keys[order], codes), len(keys) - 1)
    known = keys[order][at] == codes
    if not known.all():
        unknown = tuple(int(c) for c in rgb[~known][0])
        raise BadImageError(
            f"{path}: mask colour {unknown} is not in data.mask_folder.palette; add it "
            "or fix the mask"
        )
    return order[at].astype(np.uint8)


def _rgb_codes(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def check_values(ids: np.ndarray, spec: MaskSpec, path: str) -> None:
    """Every value must be a class id or ``ignore_index``: anything else is a mask made for
    another class list (or a lossy JPEG mask), whose pixels would train the wrong class."""
    counts = np.bincount(ids.ravel(), minlength=256)
    counts[: spec.num_classes] = 0
    counts[spec.ignore_index] = 0
    bad = np.flatnonzero(counts)
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise BadImageError(
            f"{path}: mask values {shown} are neither class ids (0-{spec.num_classes - 1}) nor "
            f"data.ignore_index={spec.ignore_index}; fix the mask or the class names"
        )


def open_upright(data: bytes, path: str, size: int) -> tuple[Image.Image, tuple[int, int]]:
    """data/images.py's decoding (upright RGB, reduced towards ``size`` on the way) and the
    (width, height) of the whole upright image: the size its mask must have."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size  # before draft() reduces it
            img.draft("RGB", (size, size))
            # exif_transpose reads the same EXIF (loading a PNG whose EXIF trails its pixels).
            if img.getexif().get(ExifTags.Base.Orientation, 1) in _SWAPS_SIDES:
                width, height = height, width
            ImageOps.exif_transpose(img, in_place=True)
            return to_rgb(shrink(img, size)), (width, height)
    except Exception as e:  # PIL raises many types for broken files
        raise BadImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def decode_pair(
    image: bytes, mask: bytes, image_path: str, mask_path: str, size: int, spec: MaskSpec
) -> tuple[np.ndarray, np.ndarray, float]:
    """An image file and its mask file -> (uint8 (size, size, 3), uint8 (size, size), the
    image's width / height): both squeezed whole into the square, the image bilinear
    (as data/images.py ``decode_whole``), the mask nearest, so its values stay class ids."""
    img, (width, height) = open_upright(image, image_path, size)
    ids = read_mask(mask, mask_path, spec.palette)
    if ids.shape != (height, width):
        raise BadImageError(
            f"{mask_path}: mask is {ids.shape[1]}x{ids.shape[0]} px but its image {image_path} "
            f"is {width}x{height} (after EXIF orientation); draw the mask on the upright image"
        )
    check_values(ids, spec, mask_path)
    pixels = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    squeezed = Image.fromarray(ids).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(pixels, dtype=np.uint8), np.asarray(squeezed), width / height


@dataclass(frozen=True)
class DecodePairs:
    """Ray Data batch function: ``image_path``, ``mask_path`` -> ``image``, ``mask``,
    ``aspect``, and ``path`` / ``error`` ("" when good) naming the file at fault. Opens the
    files itself (pyarrow filesystems pickle). Never raises: an exception inside a Ray task
    loses the file name, so a bad pair becomes zeros and its error text, and the caller
    skips or stops."""

    fs: pafs.FileSystem
    size: int
    spec: MaskSpec

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_path"])
        images = np.zeros((n, self.size, self.size, 3), np.uint8)
        masks = np.zeros((n, self.size, self.size), np.uint8)
        aspects = np.ones(n, np.float32)
        paths = np.asarray(batch["image_path"], dtype=object).copy()
        errors = np.full(n, "", dtype=object)
        for i, (image_path, mask_path) in enumerate(zip(batch["image_path"], batch["mask_path"])):
            try:
                image, mask = read_bytes(self.fs, image_path), read_bytes(self.fs, mask_path)
                images[i], masks[i], aspects[i] = decode_pair(
                    image, mask, image_path, mask_path, self.size, self.spec
                )
            except BadImageError as e:
                errors[i] = str(e)
                if errors[i].startswith(f"{mask_path}: "):  # messages start with their file
                    paths[i] = mask_path
        return {"image": images, "mask": masks, "aspect": aspects, "path": paths, "error": errors}
