"""Detection sources: ``data.source: coco | voc | yolo``, each at ``data.<source>.root``.

The annotations are read and checked first (data/box_formats.py: only json, xml, txt and
image headers), so a folder that cannot work fails in seconds, before any pixel is decoded.
Then each image is decoded once, squeezed whole into the working square as mask_folder's
images are (its ``aspect`` lets the random crop see it in its own proportions again), and
cached with its boxes scaled alike, padded to ``data.max_boxes`` rows:
``{"image": uint8 (W, W, 3), "boxes": float32 (K, 4), "labels": int64 (K,) (-1: padding),
"crowd": bool (K,), "aspect": float32}``. ``crowd`` marks COCO ``iscrowd`` and VOC
``difficult`` boxes, which neither train nor count in the metric."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import ray.data
from PIL import Image

from raycv.config import Config
from raycv.data import box_formats
from raycv.data.box_formats import BoxRecord, BoxSplits
from raycv.data.masks import open_upright
from raycv.data.sources import (
    SOURCES,
    SourceData,
    cached,
    check_targets,
    filesystem,
    good_rows,
    split_indices,
)
from raycv.errors import BadImageError, DataError

log = logging.getLogger(__name__)

Reader = Callable[..., BoxSplits]


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
        try:
            with self.fs.open_input_file(path) as f:
                data = f.read()
        except OSError as e:  # gone since it was listed, or unreadable
            raise BadImageError(f"{path}: not readable ({type(e).__name__}: {e})") from e
        img, (width, height) = open_upright(data, path, self.size)
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


def box_source(cfg: Config, read: Reader) -> SourceData:
    """The source ``cfg.data.source`` with its annotations read by ``read``."""
    check_targets(cfg, ("boxes", "labels"))
    name = cfg.data.source
    section = getattr(cfg.data, name)
    if not section.root:
        raise DataError(f"data.{name}.root is required when data.source={name}")
    fs, root = filesystem(section.root)
    fail = cfg.data.bad_images == "fail"
    found = read(
        fs,
        root,
        splits=(section.train_split, section.val_split),
        class_names=section.classes,
        fail_on_bad=fail,
    )
    train, val = _split(found, section.train_split, section.val_split, cfg)
    _report(found, train + val, cfg.data.max_boxes)
    decode = DecodeBoxes(fs, cfg.working_size)
    train_ds, bad_train = _decoded(train, decode, cfg.data.max_boxes, fail)
    val_ds, bad_val = _decoded(val, decode, cfg.data.max_boxes, fail)
    bad = bad_train + bad_val
    if bad:
        log.warning("skipped %d images, e.g. %s", len(bad), bad[0])
    return SourceData(found.class_names, train_ds, val_ds, found.bad + bad)


def _split(
    found: BoxSplits, train_split: str, val_split: str, cfg: Config
) -> tuple[list[BoxRecord], list[BoxRecord]]:
    """The two splits; without a validation split, ``data.val_fraction`` of the training
    images carved out with a fixed seed (``data.split_seed``)."""
    records = found.splits[train_split]
    if val_split in found.splits:
        return records, found.splits[val_split]
    if len(records) < 2:
        raise DataError(
            f"found {len(records)} annotated image and no {val_split!r} split; add images "
            f"or a {val_split!r} split"
        )
    train_idx, val_idx = split_indices(len(records), cfg.data.val_fraction, cfg.data.split_seed)
    return [records[i] for i in train_idx], [records[i] for i in val_idx]


def _report(found: BoxSplits, records: list[BoxRecord], max_boxes: int) -> None:
    """One line on what the annotations needed: fixed, left out, or cut at max_boxes."""
    over = sum(len(r.labels) > max_boxes for r in records)
    if over:
        most = max(len(r.labels) for r in records)
        log.warning(
            "%d images have more than data.max_boxes=%d boxes (up to %d): the rest are left "
            "out; raise data.max_boxes",
            over,
            max_boxes,
            most,
        )
    if found.skipped:
        counts = ", ".join(f"{n} {kind}" for kind, n in found.skipped.items())
        example = f"; e.g. {found.bad[0]}" if found.bad else ""
        log.warning("annotations: %s%s", counts, example)


def _decoded(
    records: list[BoxRecord], decode: DecodeBoxes, max_boxes: int, fail_on_bad: bool
) -> tuple[ray.data.Dataset, list[str]]:
    """Decode the images once and cache them with their padded boxes, in the order listed."""
    ds = ray.data.from_items([_row(r, max_boxes) for r in records])
    return good_rows(cached(ds.map_batches(decode, batch_size=16)), fail_on_bad)


def _row(record: BoxRecord, max_boxes: int) -> dict[str, object]:
    """A record's columns, its boxes still in the image's pixels, padded to ``max_boxes``."""
    k = min(len(record.labels), max_boxes)
    boxes = np.zeros((max_boxes, 4), np.float32)
    labels = np.full(max_boxes, -1, np.int64)
    crowd = np.zeros(max_boxes, bool)
    boxes[:k], labels[:k], crowd[:k] = record.boxes[:k], record.labels[:k], record.ignore[:k]
    size = np.array([record.width, record.height], np.int64)
    return {"path": record.image, "size": size, "boxes": boxes, "labels": labels, "crowd": crowd}


for _name, _read in (
    ("coco", box_formats.read_coco),
    ("voc", box_formats.read_voc),
    ("yolo", box_formats.read_yolo),
):
    SOURCES.add(_name, lambda cfg, read=_read: box_source(cfg, read))
