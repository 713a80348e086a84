"""Class-id masks and boxes drawn for people: one colour per class (the Pascal VOC colour
map, which segmentation datasets and viewers share), palette PNGs of class ids, masks laid
over their images, and boxes drawn on them. Used by ``raycv eval`` (worst images),
``raycv predict`` and ``raycv data preview``."""

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


def box_colours() -> np.ndarray:
    """uint8 (255, 3): the colour of each detection class id; VOC's map from its second
    colour (class 0 of a detector is an object, not the black background), brightened to
    full strength: a thin outline in VOC's dark red is lost on a photo."""
    colours = palette()[1:].astype(np.float64)
    return np.rint(colours * 255 / colours.max(axis=1, keepdims=True)).astype(np.uint8)


def draw_boxes(
    image: np.ndarray, boxes: np.ndarray, colours: np.ndarray, width: int = 1
) -> np.ndarray:
    """uint8 (H, W, 3) with (K, 4) xyxy pixel ``boxes`` outlined, each in its (K, 3) colour.
    No text: at training sizes (64-128 px) a label would hide the object; a legend names
    the colours."""
    import torch
    from torchvision.utils import draw_bounding_boxes

    if not len(boxes):
        return image.copy()
    drawn = draw_bounding_boxes(
        torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1),  # a read-only array too
        torch.as_tensor(np.asarray(boxes, np.float32)),
        colors=[tuple(int(c) for c in rgb) for rgb in colours],
        width=width,
    )
    return drawn.permute(1, 2, 0).numpy()
