"""Data sources by name. Each returns Ray Datasets of images decoded once to the working
size and cached in the object store, with the columns the task learns from (its
``targets``), so each epoch pays only for augmentation:

* classification: ``{"image": uint8 (W, W, 3), "label": int64}``, and for a folder's training
  split ``"aspect"``: the width / height of the whole image squeezed into the square;
* segmentation: ``{"image": uint8 (W, W, 3), "mask": uint8 (W, W)}`` of class ids
  (``data.ignore_index`` for "ignore"), the mask resized nearest, and for a mask folder
  ``"aspect"`` on both splits (its images are squeezed whole, never centre-cropped).

The cache keeps the order the source lists its images in: each epoch's shuffle
(data/order.py) numbers rows by it, so the same files give the same rows in every run, and
a resumed run reads on in the same order."""

from __future__ import annotations

import logging
import math
import posixpath
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs
import ray.data
from ray.data.expressions import col

from raycv.config import Config
from raycv.data import mask_layouts, masks, shapes
from raycv.data.decoders import SHAPES_TARGETS, DecodeFolder, RenderShapes, class_of
from raycv.errors import BadImageError, DataError
from raycv.registry import Registry
from raycv.tasks import TASKS

log = logging.getLogger(__name__)
DECODE_BATCH = 64  # files per decode task, and rows per block of the cache


@dataclass
class SourceData:
    class_names: list[str]
    train: ray.data.Dataset
    val: ray.data.Dataset
    skipped: list[str] = field(default_factory=list)  # unreadable files left out


SOURCES: Registry[Callable[[Config], SourceData]] = Registry("data source")


# ------------------------------------------------------------------ shapes (built in)


@SOURCES.register("shapes")
def shapes_source(cfg: Config) -> SourceData:
    s = cfg.data.shapes
    targets = check_targets(cfg, tuple(SHAPES_TARGETS))
    render_args = {
        "image_size": s.image_size,
        "num_classes": s.num_classes,
        "difficulty": s.difficulty,
        "seed": s.seed,
        "classes": s.classes,
    }
    train_idx, val_idx = split_indices(s.num_images, cfg.data.val_fraction, cfg.data.split_seed)

    def rendered(indices: np.ndarray) -> ray.data.Dataset:
        fn = RenderShapes(indices, render_args, cfg.working_size, targets, cfg.data.max_boxes)
        return cached(ray.data.range(len(indices)).map_batches(fn, batch_size=256))

    names = shapes.class_names(s.num_classes, s.classes)
    if "mask" in targets:  # a semantic mask's value 0 is the background, a class of its own
        names = ["background", *names]
    return SourceData(names, rendered(train_idx), rendered(val_idx))


def check_targets(cfg: Config, available: tuple[str, ...]) -> tuple[str, ...]:
    """The columns ``cfg.task`` learns from; a source that cannot make one says so."""
    targets = TASKS.get(cfg.task).targets
    missing = [t for t in targets if t not in available]
    if missing:
        raise DataError(
            f"data.source={cfg.data.source} has no {', '.join(missing)} for task={cfg.task} "
            f"(it gives {', '.join(available)}); choose a source that annotates them"
        )
    return targets


def cached(ds: ray.data.Dataset) -> ray.data.MaterializedDataset:
    """``ds`` materialized in its input order (by default Ray Data keeps blocks in the order
    their tasks finish, which differs from run to run)."""
    ds.context.execution_options.preserve_order = True
    return ds.materialize()


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


# ------------------------------------------------------------------ folder (ImageFolder)


@dataclass(frozen=True)
class FolderSplit:
    """An ImageFolder's classes and the files of each split, listed before any decoding."""

    classes: list[str]
    train: list[str]
    val: list[str]


@SOURCES.register("folder")
def folder_source(cfg: Config) -> SourceData:
    check_targets(cfg, ("label",))
    fs, root = filesystem(cfg.data.folder.root)
    split = find_split(fs, root, cfg)
    class_index = {c: i for i, c in enumerate(split.classes)}
    fail = cfg.data.bad_images == "fail"
    train, bad_train = _decoded(
        split.train,
        DecodeFolder(fs, class_index, cfg.working_size, cfg.data.folder.train_images == "whole"),
        fail,
    )
    if bad_train:  # skipped files may have emptied a class
        check_classes_left(split.classes, split.train, bad_train)
    val, bad_val = _decoded(split.val, DecodeFolder(fs, class_index, cfg.working_size), fail)
    if bad_train or bad_val:
        log.warning(
            "skipped %d unreadable files, e.g. %s",
            len(bad_train + bad_val),
            (bad_train + bad_val)[0],
        )
    return SourceData(split.classes, train, val, bad_train + bad_val)


def find_split(fs: pafs.FileSystem, root: str, cfg: Config) -> FolderSplit:
    """The classes and the train and val files under ``root``: ``val_split`` when it is
    there, else ``data.val_fraction`` of the training files, carved with a fixed seed.
    Only lists files, so a folder that cannot work fails in a second."""
    f = cfg.data.folder
    train_dir = posixpath.join(root, f.train_split)
    if _info(fs, train_dir).type != pafs.FileType.Directory:
        train_dir = root  # no split folders: the root holds the class folders
    classes = _class_names(fs, train_dir)
    train_files = _list_files(fs, train_dir, classes)
    val_dir = posixpath.join(root, f.val_split)
    if train_dir != root and _info(fs, val_dir).type == pafs.FileType.Directory:
        split = FolderSplit(classes, train_files, _list_files(fs, val_dir, classes))
    else:
        if train_dir != root:
            _warn_unused_splits(fs, root, cfg)
        train_idx, val_idx = split_indices(
            len(train_files), cfg.data.val_fraction, cfg.data.split_seed
        )
        split = FolderSplit(
            classes, [train_files[i] for i in train_idx], [train_files[i] for i in val_idx]
        )
    check_classes_left(classes, split.train, [])
    return split


def _warn_unused_splits(fs: pafs.FileSystem, root: str, cfg: Config) -> None:
    """A validation folder under another name (valid/, validation/) would otherwise be
    ignored without a word while the validation images are carved out of train/."""
    f = cfg.data.folder
    others = [name for name in _subfolders(fs, root) if name != f.train_split]
    if others:
        log.warning(
            "%s has no %s/ folder: validating on data.val_fraction=%g of %s/, not on %s; "
            "set data.folder.val_split=%s to validate on it",
            root,
            f.val_split,
            cfg.data.val_fraction,
            f.train_split,
            ", ".join(f"{name}/" for name in others),
            others[0],
        )


def check_classes_left(classes: list[str], train_files: list[str], bad: list[str]) -> None:
    """Every class needs training images, and a classifier at least two classes with
    them: an empty class folder, a carved split or skipped unreadable files can leave
    fewer than the class folders promise."""
    skipped = set(bad)
    counts = Counter(class_of(p) for p in train_files if p not in skipped)
    empty = [c for c in classes if not counts[c]]
    if len(classes) - len(empty) < 2:
        raise DataError(
            f"class folders with readable training images: {len(classes) - len(empty)} of "
            f"{len(classes)}; a classifier needs at least 2: add images to {', '.join(empty)}"
        )
    if empty:
        log.warning(
            "no readable training images in class folder(s) %s: the model can never predict "
            "them; add images or remove the folders",
            ", ".join(empty),
        )


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), posixpath.abspath(uri)


def _info(fs: pafs.FileSystem, path: str) -> pafs.FileInfo:
    return fs.get_file_info(path)


def _subfolders(fs: pafs.FileSystem, directory: str) -> list[str]:
    entries = fs.get_file_info(pafs.FileSelector(directory))
    return sorted(
        e.base_name
        for e in entries
        if e.type == pafs.FileType.Directory and not e.base_name.startswith(".")
    )


def _class_names(fs: pafs.FileSystem, directory: str) -> list[str]:
    classes = _subfolders(fs, directory)
    if len(classes) < 2:
        found = f" ({classes[0]})" if classes else ""
        raise DataError(
            f"{directory} has {len(classes)} class folder(s){found}; a classifier needs at "
            "least 2: put each class's images in a folder of its own, "
            "root/<class>/*.jpg or root/train/<class>/*.jpg"
        )
    return classes


def _list_files(fs: pafs.FileSystem, directory: str, classes: list[str]) -> list[str]:
    files = []
    for name in classes:
        selector = pafs.FileSelector(
            posixpath.join(directory, name), allow_not_found=True, recursive=False
        )
        files += sorted(
            e.path
            for e in fs.get_file_info(selector)
            if e.type == pafs.FileType.File and not e.base_name.startswith(".")
        )
    if not files:
        raise DataError(
            f"{directory} holds no files under its class folders {', '.join(classes)}; "
            "put the images in them (<class>/*.jpg)"
        )
    return files


def _decoded(
    files: list[str], decoder: DecodeFolder, fail_on_bad: bool
) -> tuple[ray.data.Dataset, list[str]]:
    """Decode once and cache; return the good rows and the paths of the bad ones."""
    blocks = max(1, math.ceil(len(files) / DECODE_BATCH))  # the cache's blocks, as decoded
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=blocks)
    return good_rows(cached(ds.map_batches(decoder, batch_size=DECODE_BATCH)), fail_on_bad)


def good_rows(ds: ray.data.Dataset, fail_on_bad: bool) -> tuple[ray.data.Dataset, list[str]]:
    """A cached dataset with ``path`` and ``error`` ("" when good) columns -> its good rows
    without them, and the paths of the bad ones; or, with ``fail_on_bad``, the first
    error raised as ``BadImageError``."""
    # Project first: the filter then never moves the decoded pixels around.
    bad = ds.select_columns(["path", "error"]).filter(expr=col("error") != "").take_all()
    if bad and fail_on_bad:
        raise BadImageError(
            f"{bad[0]['error']} (data.bad_images=fail; set data.bad_images=skip to leave such "
            "files out)"
        )
    # Dropping columns is a cheap lazy projection of the cache; filtering out bad rows is
    # not, so only then is the result cached again.
    good = ds.drop_columns(["error", "path"])
    if bad:
        good = cached(ds.filter(expr=col("error") == "").drop_columns(["error", "path"]))
    return good, [row["path"] for row in bad]


# ------------------------------------------------------------------ mask_folder (segmentation)


@SOURCES.register("mask_folder")
def mask_folder_source(cfg: Config) -> SourceData:
    """Images and segmentation masks paired by stem (data/mask_layouts.py), decoded in pairs
    (data/masks.py) to ``{"image", "mask", "aspect"}`` rows on both splits: the whole image
    squeezed into the square, so a random crop can reach every side of it."""
    check_targets(cfg, ("mask",))
    m = cfg.data.mask_folder
    if not m.root:
        raise DataError("data.mask_folder.root is required when data.source=mask_folder")
    fs, root = filesystem(m.root)
    layout = mask_layouts.find_layout(fs, root, m)
    classes = mask_layouts.class_names(fs, root, m, layout)
    train, val = _splits(layout, cfg)
    missing = train.missing + val.missing
    fail = cfg.data.bad_images == "fail"
    if missing and fail:
        raise BadImageError(
            f"{missing[0][1]} (data.bad_images=fail; set data.bad_images=skip to leave such "
            "files out)"
        )
    palette = None if m.palette is None else np.asarray(m.palette, np.uint8)
    decoder = masks.DecodePairs(
        fs, cfg.working_size, masks.MaskSpec(len(classes), cfg.data.ignore_index, palette)
    )
    train_ds, bad_train = _decoded_pairs(train.pairs, decoder, fail)
    if bad_train and len(bad_train) == len(train.pairs):
        raise DataError(f"{root}: no training image has a usable mask, e.g. {bad_train[0]}")
    val_ds, bad_val = _decoded_pairs(val.pairs, decoder, fail)
    skipped = [path for path, _ in missing] + bad_train + bad_val
    if skipped:
        log.warning("skipped %d images without a usable mask, e.g. %s", len(skipped), skipped[0])
    return SourceData(classes, train_ds, val_ds, skipped)


def _splits(
    layout: mask_layouts.MaskLayout, cfg: Config
) -> tuple[mask_layouts.Split, mask_layouts.Split]:
    """The layout's train and val splits; without a val split, ``data.val_fraction`` of the
    training pairs carved out with a fixed seed (``data.split_seed``)."""
    if layout.val is not None:
        return layout.train, layout.val
    pairs = layout.train.pairs
    if len(pairs) < 2:
        raise DataError(
            f"found {len(pairs)} image/mask pair and no validation split; add pairs or a "
            f"{cfg.data.mask_folder.val_split}/ split"
        )
    train_idx, val_idx = split_indices(len(pairs), cfg.data.val_fraction, cfg.data.split_seed)
    train = mask_layouts.Split([pairs[i] for i in train_idx], layout.train.missing)
    return train, mask_layouts.Split([pairs[i] for i in val_idx], [])


def _decoded_pairs(
    pairs: list[tuple[str, str]], decoder: masks.DecodePairs, fail_on_bad: bool
) -> tuple[ray.data.Dataset, list[str]]:
    """Decode (image, mask) pairs once and cache, in the order listed."""
    items = [{"image_path": image, "mask_path": mask} for image, mask in pairs]
    ds = ray.data.from_items(items).map_batches(decoder, batch_size=16)
    return good_rows(cached(ds), fail_on_bad)


# The detection formats register themselves beside these (coco, voc, yolo).
from raycv.data import box_sources  # noqa: E402, F401
