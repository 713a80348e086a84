"""Finding a segmentation dataset's image/mask pairs and its splits in a folder, with nothing
renamed and no key set. Recognised layouts:

* ``<split>/images/*`` + ``<split>/masks/*.png`` (e.g. the balloon sample);
* ``train/`` + ``trainannot/`` and ``val/`` + ``valannot/`` (CamVid as SegNet ships it);
* ``images/`` + ``masks/`` at the root (the validation pairs are carved out of them);
* ``X.jpg`` + ``X_mask.png`` side by side, in the root or in ``<split>/``;
* Pascal VOC: ``JPEGImages/``, ``SegmentationClass/``, ``ImageSets/Segmentation/{train,val}.txt``.

An image pairs with the mask of the same stem (plus ``mask_suffix`` when masks add one).
``data.mask_folder.images``, ``.masks`` and ``.mask_suffix`` override what is found. A folder
that fits no layout, or more than one, is a one-line ``DataError`` that names what is there.
Only lists files: a folder that cannot work fails before anything is decoded."""

from __future__ import annotations

import logging
import posixpath
from collections import Counter
from dataclasses import dataclass

import pyarrow.fs as pafs

from raycv.config import MaskFolderConfig
from raycv.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
IMAGE_DIRS = ("images", "imgs", "image", "img", "JPEGImages")
MASK_DIRS = ("masks", "mask", "labels", "annotations", "SegmentationClass", "gt")
ANNOT_SUFFIXES = ("annot", "_annot", "_labels", "_masks", "_mask", "_gt")
VOC_LISTS = "ImageSets/Segmentation"
VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
KNOWN = (
    "<split>/images/ + <split>/masks/, train/ + trainannot/, images/ + masks/, "
    "X.jpg + X_mask.png, VOC (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/)"
)


@dataclass(frozen=True)
class Split:
    """One split's (image, mask) paths in image-path order, and the images that cannot be
    used as (path, one-line reason): no mask, or listed but absent."""

    pairs: list[tuple[str, str]]
    missing: list[tuple[str, str]]


@dataclass(frozen=True)
class MaskLayout:
    name: str  # what was found, e.g. "<split>/images/ + <split>/masks/"
    train: Split
    val: Split | None  # None: no validation split; carve data.val_fraction out of train
    classes: tuple[str, ...] | None = None  # the layout's standard class names (VOC)


@dataclass(frozen=True)
class _Dirs:
    images: str  # relative to the root; "" is the root
    masks: str
    stems: str | None = None  # a file listing the split's stems (VOC)


@dataclass(frozen=True)
class _Plan:
    name: str
    train: _Dirs
    val: _Dirs | None
    classes: tuple[str, ...] | None = None
    suffix: str | None = None  # found while detecting (side by side); else found per split
    split_folders: bool = False  # train/ exists: a missing val/ is worth a warning


class _Tree:
    """The folder under ``root``, listed once per sub-folder (a remote store answers each
    listing in a round trip)."""

    def __init__(self, fs: pafs.FileSystem, root: str) -> None:
        self.fs, self.root = fs, root
        self._listed: dict[str, list[pafs.FileInfo]] = {}

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def entries(self, rel: str) -> list[pafs.FileInfo]:
        if rel not in self._listed:
            selector = pafs.FileSelector(self.path(rel), allow_not_found=True)
            found = self.fs.get_file_info(selector)
            self._listed[rel] = [e for e in found if not e.base_name.startswith(".")]
        return self._listed[rel]

    def dirs(self, rel: str) -> list[str]:
        return sorted(e.base_name for e in self.entries(rel) if e.type == pafs.FileType.Directory)

    def images(self, rel: str) -> list[str]:
        """Paths of the image files (by extension) directly in ``rel``, sorted."""
        return sorted(
            e.path
            for e in self.entries(rel)
            if e.type == pafs.FileType.File and _extension(e.path) in IMAGE_EXTENSIONS
        )

    def read_text(self, rel: str) -> str | None:
        path = self.path(rel)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return f.read().decode("utf-8")


def _extension(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def _stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


# ------------------------------------------------------------------ the layouts


def _pick(present: list[str], aliases: tuple[str, ...], explicit: str | None) -> list[str]:
    if explicit:
        return [explicit] if explicit in present else []
    wanted = {a.lower() for a in aliases}
    return [name for name in present if name.lower() in wanted]


def _image_and_mask_dirs(tree: _Tree, rel: str, m: MaskFolderConfig) -> tuple[str, str] | None:
    """The images and masks sub-folders of ``rel``, when it holds one of each."""
    present = tree.dirs(rel)
    images = _pick(present, IMAGE_DIRS, m.images)
    masks = _pick(present, MASK_DIRS, m.masks)
    if not (images and masks):
        return None
    for key, found in (("images", images), ("masks", masks)):
        if len(found) > 1:
            folders = ", ".join(f"{name}/" for name in found)
            raise DataError(
                f"{tree.path(rel)}: ambiguous image/mask layout, several {key} folders "
                f"({folders}); set data.mask_folder.{key} to one"
            )
    return images[0], masks[0]


def _voc(tree: _Tree, m: MaskFolderConfig) -> _Plan | None:
    if "Segmentation" not in tree.dirs("ImageSets"):
        return None
    images, masks = m.images or "JPEGImages", m.masks or "SegmentationClass"
    if not {images, masks} <= set(tree.dirs("")):
        return None
    lists = {_stem(e.path) for e in tree.entries(VOC_LISTS) if e.path.endswith(".txt")}
    if m.train_split not in lists:
        raise DataError(
            f"{tree.path(VOC_LISTS)} has no {m.train_split}.txt (found "
            f"{', '.join(sorted(lists)) or 'nothing'}); set data.mask_folder.train_split"
        )

    def split(name: str) -> _Dirs:
        return _Dirs(images, masks, f"{VOC_LISTS}/{name}.txt")

    val = split(m.val_split) if m.val_split in lists else None
    name = f"VOC ({images}/, {masks}/, {VOC_LISTS}/)"
    return _Plan(name, split(m.train_split), val, VOC_CLASSES)


def _split_folders(tree: _Tree, m: MaskFolderConfig) -> _Plan | None:
    if m.train_split not in tree.dirs(""):
        return None
    found = _image_and_mask_dirs(tree, m.train_split, m)
    if found is None:
        return None
    images, masks = found
    val = None
    if {images, masks} <= set(tree.dirs(m.val_split)):
        val = _Dirs(f"{m.val_split}/{images}", f"{m.val_split}/{masks}")
    train = _Dirs(f"{m.train_split}/{images}", f"{m.train_split}/{masks}")
    return _Plan(f"<split>/{images}/ + <split>/{masks}/", train, val, split_folders=True)


def _annot_folders(tree: _Tree, m: MaskFolderConfig) -> _Plan | None:
    top = tree.dirs("")
    if m.images or m.masks or m.train_split not in top:
        return None
    suffixes = [s for s in ANNOT_SUFFIXES if m.train_split + s in top]
    if len(suffixes) != 1:
        return None
    s = suffixes[0]
    train = _Dirs(m.train_split, m.train_split + s)
    val = _Dirs(m.val_split, m.val_split + s) if m.val_split + s in top else None
    return _Plan(f"<split>/ + <split>{s}/", train, val, split_folders=True)


def _root_folders(tree: _Tree, m: MaskFolderConfig) -> _Plan | None:
    if "Segmentation" in tree.dirs("ImageSets"):
        return None  # VOC: its lists say which of these images have masks
    found = _image_and_mask_dirs(tree, "", m)
    if found is None:
        return None
    images, masks = found
    return _Plan(f"{images}/ + {masks}/", _Dirs(images, masks), None)


def _side_by_side(tree: _Tree, m: MaskFolderConfig) -> _Plan | None:
    if m.images or m.masks:
        return None
    top = tree.dirs("")
    for where in ([m.train_split] if m.train_split in top else []) + [""]:
        stems = {_stem(p) for p in tree.images(where)}
        suffix = _found_suffix(stems, stems, m.mask_suffix)
        if suffix:
            val = _Dirs(m.val_split, m.val_split) if where and m.val_split in top else None
            name = f"X.jpg + X{suffix}.png in {where + '/' if where else 'the root'}"
            return _Plan(name, _Dirs(where, where), val, suffix=suffix, split_folders=bool(where))
    return None


_LAYOUTS = (_voc, _split_folders, _annot_folders, _root_folders, _side_by_side)


def _found_suffix(image_stems: set[str], mask_stems: set[str], explicit: str | None) -> str | None:
    """What mask stems add to image stems: ``explicit`` when it pairs any, else the most
    common ending after an image's stem that starts with a separator and holds a letter
    (``_mask``, ``_L``; not the ``0`` that ``img_1`` and ``img_10`` would suggest)."""
    if explicit:
        paired = any(
            s.endswith(explicit) and s[: -len(explicit)] in image_stems for s in mask_stems
        )
        return explicit if paired else None
    counts: Counter[str] = Counter()
    for stem in mask_stems:
        for cut in range(1, len(stem)):
            if stem[:cut] in image_stems and _looks_added(stem[cut:]):
                counts[stem[cut:]] += 1
    return counts.most_common(1)[0][0] if counts else None


def _looks_added(ending: str) -> bool:
    return ending[0] in "_-. " and any(c.isalpha() for c in ending)


# ------------------------------------------------------------------ pairing


def _pair(tree: _Tree, dirs: _Dirs, suffix: str | None) -> Split:
    """The split's (image, mask) pairs; images without a mask go to ``missing``."""
    images = tree.images(dirs.images)
    if dirs.images == dirs.masks:
        if not suffix:
            raise DataError(
                f"{tree.path(dirs.images)} holds both images and masks: set "
                "data.mask_folder.mask_suffix to what a mask's name adds (e.g. _mask)"
            )
        mask_files = [p for p in images if _stem(p).endswith(suffix)]
        images = [p for p in images if not _stem(p).endswith(suffix)]
    else:
        mask_files = tree.images(dirs.masks)
        if suffix is None:
            image_stems, mask_stems = {_stem(p) for p in images}, {_stem(p) for p in mask_files}
            same = image_stems & mask_stems
            suffix = "" if same else (_found_suffix(image_stems, mask_stems, None) or "")
    masks: dict[str, str] = {}
    for path in sorted(mask_files, key=lambda p: (_extension(p) != ".png", p)):  # PNG first
        stem = _stem(path)
        if stem.endswith(suffix):
            masks.setdefault(stem[: len(stem) - len(suffix)], path)
    if dirs.stems:
        return _listed_pairs(tree, dirs, images, masks)
    pairs, missing = [], []
    for path in images:
        mask = masks.pop(_stem(path), None)
        if mask:
            pairs.append((path, mask))
        else:
            where = f"{tree.path(dirs.masks)}/{_stem(path)}{suffix}.png"
            missing.append((path, f"{path}: no mask ({where} not found)"))
    if masks:
        log.warning(
            "%s: %d masks have no image, e.g. %s; left out",
            tree.path(dirs.masks),
            len(masks),
            next(iter(masks.values())),
        )
    return Split(pairs, missing)


def _listed_pairs(tree: _Tree, dirs: _Dirs, images: list[str], masks: dict[str, str]) -> Split:
    """Pairs of the stems a list file names (VOC: most JPEGImages have no segmentation)."""
    text = tree.read_text(dirs.stems) or ""
    stems = [line.split()[0] for line in text.splitlines() if line.strip()]
    by_stem = {_stem(p): p for p in images}
    pairs, missing = [], []
    for stem in stems:
        image = by_stem.get(stem)
        if image is None:
            path = f"{tree.path(dirs.images)}/{stem}.jpg"
            missing.append((path, f"{path}: listed in {tree.path(dirs.stems)} but not found"))
        elif stem not in masks:
            where = f"{tree.path(dirs.masks)}/{stem}.png"
            missing.append((image, f"{image}: no mask ({where} not found)"))
        else:
            pairs.append((image, masks[stem]))
    return Split(pairs, missing)


# ------------------------------------------------------------------ the way in


def find_layout(fs: pafs.FileSystem, root: str, m: MaskFolderConfig) -> MaskLayout:
    """The layout under ``root`` and each split's pairs. With ``images`` or ``masks`` set,
    VOC, then ``<split>/`` folders, then the root are tried, and the first that has them
    wins; otherwise exactly one layout must fit."""
    tree = _Tree(fs, root)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise DataError(f"data.mask_folder.root={root} is not a folder of images and masks")
    plans = [plan for plan in (find(tree, m) for find in _LAYOUTS) if plan]
    if (m.images or m.masks) and plans:
        plans = plans[:1]
    if not plans:
        raise DataError(
            f"{root}: no known image/mask layout (found {_found(tree)}); expected {KNOWN}; or "
            "set data.mask_folder.images and data.mask_folder.masks (and .mask_suffix)"
        )
    if len(plans) > 1:
        raise DataError(
            f"{root}: ambiguous image/mask layout, found {' and '.join(p.name for p in plans)}; "
            "set data.mask_folder.images and data.mask_folder.masks (looked for in <split>/ "
            "first, then in the root)"
        )
    plan = plans[0]
    suffix = m.mask_suffix if m.mask_suffix is not None else plan.suffix
    train = _pair(tree, plan.train, suffix)
    val = _pair(tree, plan.val, suffix) if plan.val else None
    for split, dirs in ((train, plan.train), (val, plan.val)):
        if split is not None and not split.pairs:
            raise DataError(
                f"{tree.path(dirs.images)}: found {plan.name} but no image with a mask of the "
                "same name; set data.mask_folder.mask_suffix to what a mask's name adds"
            )
    if val is None and plan.split_folders:
        log.warning(
            "%s: no %s/ split beside %s/: validating on data.val_fraction of the training "
            "pairs; set data.mask_folder.val_split to validate on another folder",
            root,
            m.val_split,
            m.train_split,
        )
    return MaskLayout(plan.name, train, val, plan.classes)


def _found(tree: _Tree) -> str:
    """The root's sub-folders (with their own) and image files, for an error message."""
    parts = []
    for name in tree.dirs("")[:8]:
        inner = ", ".join(f"{d}/" for d in tree.dirs(name)[:6])
        parts.append(f"{name}/ ({inner})" if inner else f"{name}/")
    folders = f"sub-folders {', '.join(parts)}" if parts else "no sub-folders"
    return f"{folders}; {len(tree.images(''))} image files in the root"


def class_names(
    fs: pafs.FileSystem, root: str, m: MaskFolderConfig, layout: MaskLayout
) -> list[str]:
    """Class names in pixel-value order, background first: ``data.mask_folder.classes``, else
    ``classes.txt`` in the root (one name per line), else the layout's standard ones."""
    text = None if m.classes else _Tree(fs, root).read_text("classes.txt")
    if m.classes:
        names = list(m.classes)
    elif text is not None:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    elif layout.classes:
        names = list(layout.classes)
    else:
        raise DataError(
            f"{root}: no class names; set data.mask_folder.classes (background first, in "
            f"pixel-value order) or write them into {root}/classes.txt, one per line"
        )
    if len(names) < 2:
        raise DataError(
            f"{len(names)} class name(s) {names}; segmentation needs the background and at "
            "least one class: list them in data.mask_folder.classes or classes.txt"
        )
    if m.palette is not None and len(m.palette) != len(names):
        raise DataError(
            f"data.mask_folder.palette has {len(m.palette)} colours for {len(names)} classes; "
            "give one RGB colour per class, in class order"
        )
    return names
