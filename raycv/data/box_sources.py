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

import numpy as np
import ray.data

from raycv.config import Config
from raycv.data import box_formats
from raycv.data.box_formats import BoxRecord, BoxSplits
from raycv.data.decoders import DecodeBoxes
from raycv.data.sources import (
    SOURCES,
    SourceData,
    cached,
    check_targets,
    filesystem,
    good_rows,
    split_indices,
)
from raycv.errors import DataError

log = logging.getLogger(__name__)

Reader = Callable[..., BoxSplits]


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
