"""Class-id masks drawn for people: one colour per class (the Pascal VOC colour map, which
segmentation datasets and viewers share), palette PNGs of class ids, and masks laid over
their images. Used by ``raycv eval`` (worst images), ``raycv predict`` and
``raycv data preview``."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# VOC's colour for its 255 "void" label; given to ``ignore_index`` whatever its value.
IGNORE_COLOUR = (224, 224, 192)
ALPHA = 0.5  # share of the class colour in a tinted pixel


def palette(ignore_index: int = 255) -> np.ndarray:
    """uint8 (256, 3): the colour of each mask value. Class 0 (background) is black, the
    next ones dark red, green, olive, blue, ... (VOC's bit-interleaved map), so class ids
    keep their colours whatever the class count; ``ignore_index`` is cream."""
    values = np.arange(256)
    colours = np.zeros((256, 3), np.int64)
    for bit in range(8):  # the value's bits, three at a time, from the top of each channel
        for channel in range(3):
            colours[:, channel] |= ((values >> (3 * bit + channel)) & 1) << (7 - bit)
    colours[ignore_index] = IGNORE_COLOUR
    return colours.astype(np.uint8)


def mask_png(ids: np.ndarray, colours: np.ndarray) -> bytes:
    """uint8 (H, W) class ids -> a palette PNG whose pixel values are the ids (read back with
    ``np.asarray(Image.open(f))``) and which viewers show in ``colours``."""
    image = Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint8))
    image.putpalette(colours.tobytes())  # an "L" image becomes "P", its values kept
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    """uint8 (H, W, 3) -> JPEG bytes."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def overlay(image: np.ndarray, ids: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) ``image`` with each pixel tinted by its class's colour; background
    (class 0) is left as it is, so the objects stand out."""
    tinted = ids != 0
    out = image.copy()
    blend = (1 - ALPHA) * image[tinted] + ALPHA * colours[ids[tinted]]
    out[tinted] = np.rint(blend).astype(np.uint8)
    return out


def legend(
    class_names: list[str], colours: np.ndarray, ignore_index: int
) -> dict[str, tuple[int, ...]]:
    """Name -> RGB of the colours ``overlay`` draws: every class but the background, and the
    ignored pixels."""
    shown = {name: colours[i] for i, name in enumerate(class_names) if i}
    shown["ignored"] = colours[ignore_index]
    return {name: tuple(int(c) for c in rgb) for name, rgb in shown.items()}


def classes_present(ids: np.ndarray, class_names: list[str]) -> list[str]:
    """The names of the classes other than background found in ``ids``, in class order."""
    counts = np.bincount(ids.ravel(), minlength=256)
    return [name for i, name in enumerate(class_names) if i and counts[i]]
