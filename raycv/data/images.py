"""Decoding real-world image files into RGB arrays of one working size.

Palette, greyscale, CMYK and alpha images are converted to RGB; files that cannot be
decoded raise ``BadImageError`` naming the file, and the caller decides whether to skip
and count them or stop (``data.bad_images``)."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, ImageOps

from raycv.errors import BadImageError

# A decompression bomb check that still admits large real photos (e.g. 20,000 px panoramas).
Image.MAX_IMAGE_PIXELS = 400_000_000
REDUCE_MARGIN = 2  # the final resize still averages at least 2 x 2 pixels into one
REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "CMYK", "I", "F"})  # PIL reduces these


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """A file's bytes; a file gone since it was listed, or unreadable, is a BadImageError."""
    try:
        with fs.open_input_file(path) as f:
            return f.read()
    except OSError as e:
        raise BadImageError(f"{path}: not readable ({type(e).__name__}: {e})") from e


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for every mode; transparency is composited on white, not dropped to black."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: scale, don't clip, to 8 bits
        img = Image.fromarray((np.asarray(img, np.uint32) >> 8).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def shrink(img: Image.Image, size: int) -> Image.Image:
    """A large image box-reduced by an integer factor in its own mode, its shorter side
    kept at least twice ``size``. Only JPEG decodes at reduced scale (``draft``): a
    20,000-px PNG is otherwise transposed, converted and cropped at full size, each step
    a full-size copy. Palette images are left whole (averaging palette indices would
    invent colours), as are 16-bit ones (PIL cannot reduce them)."""
    factor = min(img.size) // (REDUCE_MARGIN * size)
    if factor < 2 or img.mode not in REDUCIBLE_MODES:
        return img
    return img.reduce(factor)


def _open(data: bytes, path: str, size: int) -> Image.Image:
    """Bytes of an image file -> an upright RGB image, reduced towards ``size`` on the way."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.draft("RGB", (size, size))  # JPEG: decode at reduced scale, much faster
            # Rotate first (to_rgb drops EXIF), in place: no full-size copy when upright.
            ImageOps.exif_transpose(img, in_place=True)
            return to_rgb(shrink(img, size))
    except Exception as e:  # PIL raises many types for broken files
        raise BadImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def decode(data: bytes, path: str, size: int) -> np.ndarray:
    """Bytes of an image file -> uint8 (size, size, 3): shorter side resized to ``size``,
    then centre-cropped, so each epoch's augmentation starts from a small cached array."""
    img = _open(data, path, size)
    return np.asarray(ImageOps.fit(img, (size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def decode_whole(data: bytes, path: str, size: int) -> tuple[np.ndarray, float]:
    """Bytes of an image file -> (uint8 (size, size, 3), width / height): the whole image
    squeezed into the square, and the aspect ratio that undoes the squeeze. Training reads
    these: a random resized crop drawn in the image's own proportions (data/augment.py)
    then reaches the sides of a wide photo, as torchvision's does on the file itself,
    which a centre crop cut off for good."""
    img = _open(data, path, size)
    aspect = img.width / img.height
    pixels = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(pixels, dtype=np.uint8), aspect


def decode_batch(
    datas: Sequence[bytes], paths: Sequence[str], size: int, whole: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode a Ray Data batch of file bytes -> (uint8 (N, size, size, 3), aspect ratios,
    error texts): centre-cropped (``decode``), or ``whole`` (``decode_whole``; otherwise the
    aspect ratio is 1, that of the square crop).

    Never raises: an exception inside a Ray task surfaces as a generic task error that has
    lost the file name, so a bad file becomes a zero image and its error text ("" when good)
    and the caller decides whether to skip or stop."""
    images = np.zeros((len(paths), size, size, 3), np.uint8)
    aspects = np.ones(len(paths), np.float32)
    errors = np.full(len(paths), "", dtype=object)
    for i, (data, path) in enumerate(zip(datas, paths)):
        try:
            if whole:
                images[i], aspects[i] = decode_whole(data, path, size)
            else:
                images[i] = decode(data, path, size)
        except BadImageError as e:
            errors[i] = str(e)
    return images, aspects, errors
