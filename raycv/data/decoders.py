"""The Ray Data batch functions that make a source's cache: rendering ``shapes``, decoding
a class folder's files, a detection source's images with their boxes (and, in
data/masks.py, image and mask pairs).

They run in Ray Data's worker processes, so this module imports only NumPy, PIL and
pyarrow: a worker that unpickles one imports its module first, and one that pulled in
torch and torchvision (raycv.tasks, raycv.models) took about 3 s more per process before its
first image, which on 2 cores was half the time a 1,320-file folder took to decode
(docs/benchmarks.md). tests/test_images.py checks that they unpickle without torch."""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from raycv.data import shapes
from raycv.data.images import decode_batch, read_bytes
from raycv.data.masks import open_upright
from raycv.errors import BadImageError


@dataclass(frozen=True)
class RenderShapes:
    """Ray Data batch function: row positions -> rendered images at the working size, and
    the columns the task learns from (``targets``: "label", "mask", or "boxes" and "labels")."""

    indices: np.ndarray
    cfg: dict
    size: int
    targets: tuple[str, ...] = ("label",)
    max_boxes: int = 1

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = []
        columns: dict[str, list] = {target: [] for target in self.targets}
        for i in self.indices[batch["id"]]:
            sample = shapes.render(int(i), **self.cfg)
            img = sample["image"]
            if img.shape[0] != self.size:
                img = np.asarray(
                    Image.fromarray(img).resize((self.size, self.size), Image.BILINEAR)
                )
            images.append(img)
            for target in self.targets:
                columns[target].append(SHAPES_TARGETS[target](sample, self.size, self.max_boxes))
        return {
            "image": np.stack(images),
            **{
                target: np.asarray(values, SHAPES_DTYPES[target])
                for target, values in columns.items()
            },
        }


def semantic_mask(sample: dict, size: int) -> np.ndarray:
    """uint8 (size, size) of a rendered sample: 0 background, class id + 1 on each shape's
    visible pixels, resized nearest so that values stay class ids."""
    ids = sample["semantic"]
    if ids.shape[0] != size:
        ids = np.asarray(Image.fromarray(ids).resize((size, size), Image.Resampling.NEAREST))
    return ids


def padded_boxes(sample: dict, size: int, max_boxes: int) -> tuple[np.ndarray, np.ndarray]:
    """A rendered sample's boxes scaled to the working ``size`` and its labels, padded to
    ``max_boxes`` rows (label -1); a stack that has more keeps its first ones (the main
    shape comes first)."""
    boxes = np.zeros((max_boxes, 4), np.float32)
    labels = np.full(max_boxes, -1, np.int64)
    count = min(len(sample["labels"]), max_boxes)
    boxes[:count] = sample["boxes"][:count] * (size / sample["image"].shape[0])
    labels[:count] = sample["labels"][:count]
    return boxes, labels


# What shapes can give each task: column -> (sample, working size, max boxes) -> value.
SHAPES_TARGETS: dict[str, Callable[[dict, int, int], object]] = {
    "label": lambda sample, size, k: sample["label"],
    "mask": lambda sample, size, k: semantic_mask(sample, size),
    "boxes": lambda sample, size, k: padded_boxes(sample, size, k)[0],
    "labels": lambda sample, size, k: padded_boxes(sample, size, k)[1],
}
SHAPES_DTYPES = {"label": np.int64, "mask": np.uint8, "boxes": np.float32, "labels": np.int64}


@dataclass(frozen=True)
class DecodeFolder:
    """Ray Data batch function: ``path`` -> the file's image and class; bad files flagged.
    ``whole`` (the training split) keeps each whole image and its aspect ratio for the
    random resized crop (data/images.py ``decode_whole``); validation is centre-cropped
    once, as torchvision evaluates. Reads its files itself, as the other sources' batch
    functions do: one Ray Data operator, not a read and a decode."""

    fs: pafs.FileSystem
    class_index: dict[str, int]
    size: int
    whole: bool = False

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = batch["path"]
        datas, unread = [], {}
        for i, path in enumerate(paths):
            try:
                datas.append(read_bytes(self.fs, path))
            except BadImageError as e:
                datas.append(b"")
                unread[i] = str(e)
        images, aspects, errors = decode_batch(datas, paths, self.size, self.whole)
        for i, error in unread.items():
            errors[i] = error
        labels = [self.class_index[class_of(p)] for p in paths]
        aspect = {"aspect": aspects} if self.whole else {}
        return {
            "image": images,
            "label": np.asarray(labels, dtype=np.int64),
            **aspect,
            "path": paths,
            "error": errors,
        }


def class_of(path: str) -> str:
    return posixpath.basename(posixpath.dirname(path))


@dataclass(frozen=True)
class DecodeBoxes:
    """Ray Data batch function: ``path`` and the annotated boxes in the image's own pixels
    -> the image squeezed into ``size`` x ``size`` and its boxes scaled with it. Never
    raises (a Ray task's error loses the file name): a bad image is zeros and its error."""

    fs: pafs.FileSystem
    size: int

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["path"])
        images = np.zeros((n, self.size, self.size, 3), np.uint8)
        boxes = np.asarray(batch["boxes"], np.float32).copy()
        aspects = np.ones(n, np.float32)
        errors = np.full(n, "", dtype=object)
        # What a bad row reports (good_rows): its error, which starts with its file, as the
        # annotation readers' messages do, so that every skip says why.
        reported = np.asarray(batch["path"], dtype=object).copy()
        for i, path in enumerate(batch["path"]):
            try:
                images[i], scale, aspects[i] = self._decode(path, batch["size"][i])
                boxes[i] *= scale
            except BadImageError as e:
                errors[i] = reported[i] = str(e)
        kept = {c: batch[c] for c in ("labels", "crowd")}
        columns = {"image": images, "boxes": boxes, "aspect": aspects, **kept}
        return {**columns, "path": reported, "error": errors}

    def _decode(self, path: str, annotated: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        img, (width, height) = open_upright(read_bytes(self.fs, path), path, self.size)
        if (width, height) != tuple(int(v) for v in annotated):
            # Boxes drawn on another size (or on the photo before its EXIF turn) would
            # no longer sit on their objects.
            raise BadImageError(
                f"{path}: the image is {width}x{height} (after EXIF orientation) but its "
                f"annotation says {annotated[0]}x{annotated[1]}; annotate the upright image"
            )
        pixels = img.resize((self.size, self.size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        scale = np.array([self.size / width, self.size / height] * 2, np.float32)
        return np.asarray(pixels, dtype=np.uint8), scale, width / height
