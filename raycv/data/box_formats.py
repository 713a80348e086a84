"""Object-detection annotations in the common formats, read into one form: per split, each
image's path, its size and its boxes (xyxy in pixels, class ids from 0, ignore flags).

* COCO json: ``annotations/instances_<split>.json`` (or Roboflow's
  ``<split>/_annotations.coco.json``), images in ``<split>/images/``, ``images/<split>/``,
  ``<split>/`` or ``<split>2017/`` (e.g. the balloon sample);
* Pascal VOC xml: ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``;
* YOLO txt: ``images/<split>/`` + ``labels/<split>/`` (or ``<split>/images/`` +
  ``<split>/labels/``), one ``class x_center y_center width height`` line per box (fractions
  of the image), class names in ``data.yaml``.

Bad annotations are fixed where the intent is clear and counted in ``BoxSplits.skipped``: a
box partly outside its image is clipped to it, one with no area left is dropped, an image with
no box (none annotated, or none left) is kept as background. Others (a class that is none of
the classes, a malformed line, entry or file, an image that is not there) are left out,
counted and described in one line naming the file in ``BoxSplits.bad``, or raise
``DataError`` with that line (``fail_on_bad``).
Only annotations and image headers are read: broken pixels are the decoder's to find."""

from __future__ import annotations

import json
import logging
import math
import posixpath
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyarrow.fs as pafs
import yaml
from PIL import ExifTags, Image

from raycv.data.mask_layouts import IMAGE_EXTENSIONS
from raycv.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
# The kinds counted in BoxSplits.skipped. The first three are fixed, never errors.
CLIPPED, DEGENERATE, BACKGROUND = "clipped boxes", "degenerate boxes", "background images"
UNKNOWN_CLASS, MALFORMED = "unknown classes", "malformed annotations"
BAD_FILE, MISSING, UNREADABLE = "malformed files", "missing files", "unreadable images"
CLIP_TOLERANCE = 0.01  # px: the rounding of YOLO's fractions is not worth counting as clipping
READ_THREADS = 16  # a remote store answers each file in a round trip: ask for many at once
SWAPS_SIDES = frozenset({5, 6, 7, 8})  # EXIF orientations that turn the photo by 90 degrees

COCO_IMAGE_DIRS = ("{}/images", "images/{}", "{}", "{}2017", "images/{}2017", "images", "")
COCO_EXPECTED = (
    "annotations/instances_<split>.json or <split>/_annotations.coco.json, with the images in "
    "<split>/images/, images/<split>/, <split>/ or <split>2017/"
)
VOC_LISTS = "ImageSets/Main"
VOC_CORNERS = ("xmin", "ymin", "xmax", "ymax")
VOC_EXPECTED = "Annotations/*.xml, JPEGImages/ and ImageSets/Main/<split>.txt"
YOLO_LAYOUTS = (("images/{}", "labels/{}"), ("{}/images", "{}/labels"))
YOLO_EXPECTED = "images/<split>/ + labels/<split>/, or <split>/images/ + <split>/labels/"
YOLO_LINE = "'class x_center y_center width height' (an integer and 4 numbers)"

T = TypeVar("T")


@dataclass(frozen=True, eq=False)  # eq=False: == on the arrays would compare element-wise
class BoxRecord:
    """One image and its boxes. ``width`` x ``height``: the upright image, in pixels;
    ``boxes`` float32 (N, 4): x0, y0, x1, y1 in those pixels; ``labels`` int64 (N,): indices
    into the class names; ``ignore`` bool (N,): crowd (COCO) or difficult (VOC) boxes, kept
    so that training and the metric can leave them out, as COCO does."""

    image: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray


@dataclass
class BoxSplits:
    """The class names and each split's records (a split asked for but absent is left out).
    ``skipped`` counts each kind of bad annotation, fixed or left out; ``bad`` describes each
    one left out in one line that starts with its file."""

    class_names: list[str]
    splits: dict[str, list[BoxRecord]]
    skipped: Counter[str]
    bad: list[str]


@dataclass(frozen=True)
class _Object:
    label: int | str  # the class as annotated: a YOLO id, a VOC or COCO name (or COCO id)
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels, not yet clipped
    ignore: bool
    where: str  # its file (and line), for messages


@dataclass(frozen=True)
class _Image:
    path: str
    width: int
    height: int
    objects: list[_Object]


@dataclass
class _Report:
    fail_on_bad: bool
    counts: Counter[str] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)

    def skip(self, kind: str, message: str) -> None:
        """An annotation left out: counted and described, or the error with fail_on_bad."""
        if self.fail_on_bad:
            raise DataError(message)
        self.counts[kind] += 1
        self.bad.append(message)


# ------------------------------------------------------------------ files


def _entries(fs: pafs.FileSystem, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
    return [e for e in fs.get_file_info(selector) if not e.base_name.startswith(".")]


def _dirs(fs: pafs.FileSystem, path: str) -> list[str]:
    return sorted(e.base_name for e in _entries(fs, path) if e.type == pafs.FileType.Directory)


def _files(fs: pafs.FileSystem, path: str, recursive: bool = False) -> dict[str, str]:
    """The files under ``path``: relative path -> full path."""
    start = len(path.rstrip("/")) + 1
    found = _entries(fs, path, recursive)
    return {e.path[start:]: e.path for e in found if e.type == pafs.FileType.File}


def _images(fs: pafs.FileSystem, path: str, recursive: bool = False) -> dict[str, str]:
    files = _files(fs, path, recursive)
    return {rel: p for rel, p in files.items() if _extension(rel) in IMAGE_EXTENSIONS}


def _extension(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def _stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _image_size(fs: pafs.FileSystem, path: str) -> tuple[int, int]:
    """(width, height) of the upright image (the decoder turns photos by their EXIF
    orientation), from the file's header: the pixels are not decoded."""
    with fs.open_input_file(path) as f:
        img = Image.open(f)
        # A PNG's getexif() decodes the pixels to look for EXIF after them; such PNGs are rare.
        header_exif = img.format != "PNG" or "exif" in img.info
        if header_exif and img.getexif().get(ExifTags.Base.Orientation, 1) in SWAPS_SIDES:
            return img.height, img.width
        return img.width, img.height


def _parallel(fn: Callable[[Any], T], items: Sequence[Any]) -> list[T | Exception]:
    """``fn`` over ``items``, many at once; an item whose call raised gives its exception."""

    def call(item: Any) -> T | Exception:
        try:
            return fn(item)
        except Exception as e:  # PIL and the filesystems raise many types
            return e

    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(call, items))


def _found(fs: pafs.FileSystem, root: str) -> str:
    """What ``root`` holds, for an error message: sub-folders (with theirs) and files."""
    parts = []
    for name in _dirs(fs, root)[:8]:
        inner = ", ".join(f"{d}/" for d in _dirs(fs, posixpath.join(root, name))[:6])
        parts.append(f"{name}/ ({inner})" if inner else f"{name}/")
    return ", ".join(parts + sorted(_files(fs, root))[:5]) or "nothing"


# ------------------------------------------------------------------ shared steps


def _find_splits(
    root: str, splits: Sequence[str], find: Callable[[str], T | None], missing: Callable[[str], str]
) -> dict[str, T]:
    """Each split's annotations, as ``find`` locates them. The first split must be there
    (else the DataError ``missing(split)``); a later one that is not is left out, so that
    the caller can carve validation out of the first."""
    found = {}
    for split in splits:
        where = find(split)
        if where is not None:
            found[split] = where
        elif split == splits[0]:
            raise DataError(missing(split))
        else:
            log.warning("%s: no %r split; left out", root, split)
    return found


def _known(names: list[str], source: str) -> str:
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return f"the {len(names)} classes of {source} ({shown})"


def _record(image: _Image, ids: Mapping[Any, int], known: str, report: _Report) -> BoxRecord:
    """The image's boxes with class ids, clipped to the image; unknown classes and boxes
    with no area are left out. An image left with no box is counted as background."""
    objects = []
    for obj in image.objects:
        if obj.label in ids:
            objects.append(obj)
        else:
            report.skip(UNKNOWN_CLASS, f"{obj.where}: class {obj.label!r} is not one of {known}")
    boxes = np.array([o.box for o in objects], np.float64).reshape(-1, 4)
    clipped = np.clip(boxes, 0, [image.width, image.height, image.width, image.height])
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])  # NaN: False
    moved = (np.abs(clipped - boxes) > CLIP_TOLERANCE).any(axis=1)
    report.counts[CLIPPED] += int((moved & keep).sum())
    report.counts[DEGENERATE] += int((~keep).sum())
    report.counts[BACKGROUND] += int(not keep.any())
    labels = np.array([ids[o.label] for o in objects], np.int64).reshape(-1)
    ignore = np.array([o.ignore for o in objects], bool).reshape(-1)
    boxes = clipped[keep].astype(np.float32)
    return BoxRecord(image.path, image.width, image.height, boxes, labels[keep], ignore[keep])


def _finish(
    root: str,
    names: list[str],
    images: dict[str, list[_Image]],
    known: str,
    report: _Report,
    ids: Mapping[Any, int] | None = None,
) -> BoxSplits:
    """Every split's records; ``ids``: annotated class -> id (default: name -> position)."""
    if not names or len(set(names)) != len(names):
        raise DataError(f"{root}: class names must be distinct, and at least one (got {names})")
    ids = ids if ids is not None else {name: i for i, name in enumerate(names)}
    splits = {s: [_record(i, ids, known, report) for i in found] for s, found in images.items()}
    for split, records in splits.items():
        if not records:
            example = f", e.g. {report.bad[0]}" if report.bad else ""
            raise DataError(
                f"{root}: no usable image in the {split!r} split ({len(report.bad)} "
                f"annotations left out{example})"
            )
    # Unary + drops the kinds counted zero times.
    return BoxSplits(list(names), splits, +report.counts, report.bad)


# ------------------------------------------------------------------ COCO


def read_coco(
    fs: pafs.FileSystem,
    root: str,
    *,
    splits: Sequence[str] = SPLITS,
    class_names: Sequence[str] | None = None,
    fail_on_bad: bool = False,
) -> BoxSplits:
    """COCO json per split (``bbox`` x, y, width, height; ``iscrowd`` -> ignore). Class names:
    ``class_names`` (categories are matched by name), else the first split's categories in
    id order. A json that does not parse is a DataError: it is the whole split."""
    report = _Report(fail_on_bad)
    found = _find_splits(
        root,
        splits,
        lambda split: _coco_json(fs, root, split),
        lambda split: (
            f"{root}: no COCO {split!r} split (found {_found(fs, root)}); expected {COCO_EXPECTED}"
        ),
    )
    data = {split: _load_coco(fs, path) for split, path in found.items()}
    cats = {split: _coco_categories(data[split], path) for split, path in found.items()}
    names = list(class_names or cats[splits[0]].values())
    images = {s: _coco_images(fs, root, s, found[s], data[s], cats[s], report) for s in found}
    source = "the class names given" if class_names else posixpath.basename(found[splits[0]])
    return _finish(root, names, images, _known(names, source), report)


def _coco_json(fs: pafs.FileSystem, root: str, split: str) -> str | None:
    """The split's COCO file: ``annotations/instances_<split>[2017].json`` (COCO's own
    names), else the one ``<split>/_annotations.coco.json`` or ``annotation*.json``."""
    named = _files(fs, posixpath.join(root, "annotations"))
    for name in (f"instances_{split}.json", f"instances_{split}2017.json"):
        if name in named:
            return named[name]
    inside = sorted(
        path
        for name, path in _files(fs, posixpath.join(root, split)).items()
        if name.lstrip("_").startswith("annotation") and name.endswith(".json")
    )
    if len(inside) > 1:
        raise DataError(f"{root}/{split}: several annotation files ({', '.join(inside)}); keep one")
    return inside[0] if inside else None


def _load_coco(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    try:
        data = json.loads(_read(fs, path))
        if not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
            raise ValueError("expected the lists images, annotations and categories")
    except (ValueError, AttributeError) as e:
        raise DataError(f"{path}: not a COCO annotation file ({e}); fix or replace it") from e
    return data


def _coco_categories(data: dict[str, Any], path: str) -> dict[Any, str]:
    """Category id -> name in id order, less the category Roboflow adds for the dataset
    itself: the supercategory of the others, with no box of its own."""
    try:
        cats = dict(sorted((c["id"], str(c["name"])) for c in data["categories"]))
        parents = {
            c.get("supercategory")
            for c in data["categories"]
            if c.get("supercategory") != c["name"]  # COCO's person is its own supercategory
        }
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(
            f"{path}: categories must each have an id and a name ({type(e).__name__}: {e})"
        ) from e
    used = {a.get("category_id") for a in data["annotations"] if isinstance(a, dict)}
    return {i: name for i, name in cats.items() if name not in parents or i in used}


def _coco_images(
    fs: pafs.FileSystem,
    root: str,
    split: str,
    path: str,
    data: dict[str, Any],
    cats: Mapping[Any, str],
    report: _Report,
) -> list[_Image]:
    """The split's images with their objects. Entries that are not what COCO says they are,
    and images whose file is not there, are left out."""
    objects: defaultdict[Any, list[_Object]] = defaultdict(list)
    for ann in data["annotations"]:
        found = _coco_object(ann, cats, path, report)
        if found:
            objects[found[0]].append(found[1])
    entries = [e for e in (_coco_entry(im, path, report) for im in data["images"]) if e]
    folder, files = _coco_image_files(fs, root, split, path, [name for _, name, _ in entries])
    images = []
    for image_id, name, (width, height) in entries:
        boxes = objects.pop(image_id, [])
        if name in files:
            images.append(_Image(files[name], width, height, boxes))
        else:
            report.skip(MISSING, f"{path}: its image {name} is not in {folder}")
    for obj in (obj for left in objects.values() for obj in left):
        report.skip(MALFORMED, f"{obj.where}: its image_id is none of the images'")
    return images


def _coco_object(
    ann: Any, cats: Mapping[Any, str], path: str, report: _Report
) -> tuple[Any, _Object] | None:
    """(image id, the annotation's box), or None for an annotation that is no box."""
    where = f"{path}: annotation id={ann.get('id') if isinstance(ann, dict) else None}"
    try:
        x, y, w, h = (float(v) for v in ann["bbox"])
        label = cats.get(ann["category_id"], ann["category_id"])  # the id where it has no name
        ignore = bool(ann.get("iscrowd", 0))
        return ann["image_id"], _Object(label, (x, y, x + w, y + h), ignore, where)
    except (KeyError, TypeError, ValueError) as e:
        report.skip(
            MALFORMED,
            f"{where} is not a box ({type(e).__name__}: {e}); expected bbox [x, y, width, "
            "height], category_id and image_id",
        )
        return None


def _coco_entry(image: Any, path: str, report: _Report) -> tuple[Any, str, tuple[int, int]] | None:
    """(id, file name, (width, height)) of an entry of images, or None when it is not one."""
    try:
        size = (int(image["width"]), int(image["height"]))
        if min(size) <= 0:
            raise ValueError(f"size {size[0]}x{size[1]}")
        return image["id"], str(image["file_name"]), size
    except (KeyError, TypeError, ValueError) as e:
        report.skip(
            MALFORMED,
            f"{path}: image entry {str(image)[:80]} is no image ({type(e).__name__}: {e}); "
            "expected id, file_name and a positive width and height",
        )
        return None


def _coco_image_files(
    fs: pafs.FileSystem, root: str, split: str, path: str, names: list[str]
) -> tuple[str, dict[str, str]]:
    """The first folder, of those COCO exports use, that holds any of the split's images:
    its path and its files by path relative to it."""
    if not names:
        return root, {}
    for folder in COCO_IMAGE_DIRS:
        where = posixpath.join(root, folder.format(split))
        files = _files(fs, where, recursive=True)
        if files.keys() & set(names):
            return where, files
    tried = ", ".join(f"{folder.format(split)}/" for folder in COCO_IMAGE_DIRS if folder)
    raise DataError(
        f"{path}: none of its {len(names)} images (e.g. {names[0]}) is in {root} or its "
        f"{tried}; put them in {split}/images/"
    )


# ------------------------------------------------------------------ Pascal VOC


def read_voc(
    fs: pafs.FileSystem,
    root: str,
    *,
    splits: Sequence[str] = SPLITS,
    class_names: Sequence[str] | None = None,
    fail_on_bad: bool = False,
) -> BoxSplits:
    """Pascal VOC: each split's stems in ``ImageSets/Main/<split>.txt``, the boxes of stem X
    in ``Annotations/X.xml`` (``difficult`` -> ignore), its image ``JPEGImages/X.*``. Class
    names: ``class_names``, else every ``<name>`` found, sorted."""
    if not {"Annotations", "JPEGImages"} <= set(_dirs(fs, root)):
        raise DataError(
            f"{root}: not a Pascal VOC folder (found {_found(fs, root)}); expected {VOC_EXPECTED}"
        )
    lists = _files(fs, posixpath.join(root, VOC_LISTS))
    found = _find_splits(
        root,
        splits,
        lambda split: lists.get(f"{split}.txt"),
        lambda split: (
            f"{root}/{VOC_LISTS} has no {split}.txt (found "
            f"{', '.join(sorted(lists)) or 'nothing'}); list the stems of each split's images, "
            f"one per line, in {VOC_LISTS}/<split>.txt ({', '.join(splits)})"
        ),
    )
    xmls = {_stem(p): p for p in _files(fs, posixpath.join(root, "Annotations")).values()}
    jpegs = {_stem(p): p for p in _images(fs, posixpath.join(root, "JPEGImages")).values()}
    report = _Report(fail_on_bad)
    images = {s: _voc_split(fs, path, xmls, jpegs, report) for s, path in found.items()}
    annotated = {obj.label for split in images.values() for i in split for obj in i.objects}
    names = list(class_names or sorted(annotated))
    return _finish(root, names, images, _known(names, "the class names given"), report)


def _voc_split(
    fs: pafs.FileSystem,
    list_path: str,
    xmls: dict[str, str],
    jpegs: dict[str, str],
    report: _Report,
) -> list[_Image]:
    """The images that ``list_path`` names, with their objects."""
    text = _read(fs, list_path).decode("utf-8-sig")
    pairs = []
    for stem in (line.split()[0] for line in text.splitlines() if line.strip()):
        if stem not in xmls:
            report.skip(MISSING, f"{list_path}: lists {stem}, which has no Annotations/{stem}.xml")
        elif stem not in jpegs:
            report.skip(MISSING, f"{xmls[stem]}: its image is not in JPEGImages/")
        else:
            pairs.append((xmls[stem], jpegs[stem]))
    contents = _parallel(lambda pair: _read(fs, pair[0]), pairs)
    images = (_voc_image(fs, *pair, data, report) for pair, data in zip(pairs, contents))
    return [image for image in images if image is not None]


def _voc_image(
    fs: pafs.FileSystem, path: str, image: str, data: bytes | Exception, report: _Report
) -> _Image | None:
    tree = _voc_tree(path, data, report)
    if tree is None:
        return None
    size = _voc_size(tree)
    if size is None:  # some tools write 0 or nothing: the image's header knows
        try:
            size = _image_size(fs, image)
        except Exception as e:  # PIL raises many types for broken files
            report.skip(UNREADABLE, f"{path}: no <size>, and {image} is no readable image ({e})")
            return None
    objects = tree.findall("object")
    found = (_voc_object(obj, f"{path}: object {k}", report) for k, obj in enumerate(objects, 1))
    return _Image(image, *size, [obj for obj in found if obj is not None])


def _voc_tree(path: str, data: bytes | Exception, report: _Report) -> ET.Element | None:
    """The parsed annotation file, or None when it is not one."""
    try:
        if isinstance(data, Exception):  # not readable
            raise ValueError(f"{type(data).__name__}: {data}")
        tree = ET.fromstring(data)
        if tree.tag != "annotation":
            raise ValueError(f"its root is <{tree.tag}>, not <annotation>")
    except (ET.ParseError, ValueError) as e:
        report.skip(BAD_FILE, f"{path}: not a Pascal VOC annotation ({e}); fix or delete it")
        return None
    return tree


def _voc_size(tree: ET.Element) -> tuple[int, int] | None:
    try:
        width, height = (int(float(tree.findtext(f"size/{k}") or "")) for k in ("width", "height"))
    except ValueError:
        return None
    return (width, height) if width > 0 and height > 0 else None


def _voc_object(obj: ET.Element, where: str, report: _Report) -> _Object | None:
    name = (obj.findtext("name") or "").strip()
    try:
        x0, y0, x1, y1 = (float(obj.findtext(f"bndbox/{k}") or "") for k in VOC_CORNERS)
        if not name:
            raise ValueError("no <name>")
    except ValueError as e:
        report.skip(
            MALFORMED,
            f"{where} is not a box ({e}); expected <name> and <bndbox> with numbers "
            f"{', '.join(VOC_CORNERS)}",
        )
        return None
    # VOC's corners are 1-based pixel indices, inclusive: (1, W) covers a whole row, which is
    # (0, W) in pixel coordinates. Subtract 1 from the minimums, as detectron2's reader does.
    difficult = (obj.findtext("difficult") or "0").strip() == "1"
    return _Object(name, (x0 - 1, y0 - 1, x1, y1), difficult, where)


# ------------------------------------------------------------------ YOLO


def read_yolo(
    fs: pafs.FileSystem,
    root: str,
    *,
    splits: Sequence[str] = SPLITS,
    class_names: Sequence[str] | None = None,
    fail_on_bad: bool = False,
) -> BoxSplits:
    """YOLO: every image in a split's images folder, with the label file of the same relative
    path (``.txt``) in its labels folder; an image without one, or with an empty one, is
    background. Class names: ``class_names``, else ``names`` in ``data.yaml`` (a list, or
    id -> name). Sizes come from the images' headers."""
    found = _find_splits(
        root,
        splits,
        lambda split: _yolo_dirs(fs, root, split),
        lambda split: (
            f"{root}: no YOLO {split!r} split (found {_found(fs, root)}); expected {YOLO_EXPECTED}"
        ),
    )
    if class_names:
        names, source = list(class_names), "the class names given"
    else:
        names, source = _yolo_names(fs, root)
    report = _Report(fail_on_bad)
    images = {split: _yolo_split(fs, *dirs, report) for split, dirs in found.items()}
    ids = {i: i for i in range(len(names))}
    return _finish(root, names, images, _known(names, source), report, ids)


def _yolo_dirs(fs: pafs.FileSystem, root: str, split: str) -> tuple[str, str] | None:
    for images, labels in YOLO_LAYOUTS:
        pair = (
            posixpath.join(root, images.format(split)),
            posixpath.join(root, labels.format(split)),
        )
        if all(fs.get_file_info(path).type == pafs.FileType.Directory for path in pair):
            return pair
    return None


def _yolo_names(fs: pafs.FileSystem, root: str) -> tuple[list[str], str]:
    """``names`` in the root's data.yaml, and the file's path."""
    path = posixpath.join(root, "data.yaml")
    try:
        names = yaml.safe_load(_read(fs, path))["names"]
        if isinstance(names, dict):  # {0: cat, 1: dog}
            names = [names[i] for i in range(len(names))]
        if not isinstance(names, list):
            raise TypeError(f"names is a {type(names).__name__}, not a list")
    except FileNotFoundError as e:
        raise DataError(
            f"{root}: no data.yaml; write the class names into it (names: [cat, dog], in class "
            "id order) or pass them"
        ) from e
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise DataError(
            f"{path}: no class names ({type(e).__name__}: {e}); write names: as a list in class "
            "id order, or as a mapping from each id (0, 1, ...) to its name"
        ) from e
    return [str(name) for name in names], path


def _yolo_split(
    fs: pafs.FileSystem, images_dir: str, labels_dir: str, report: _Report
) -> list[_Image]:
    images = _images(fs, images_dir, recursive=True)
    labels = _files(fs, labels_dir, recursive=True)
    paths = [images[rel] for rel in sorted(images)]
    label_paths = [labels.get(posixpath.splitext(rel)[0] + ".txt") for rel in sorted(images)]
    sizes = _parallel(lambda path: _image_size(fs, path), paths)
    texts = _parallel(lambda label: _read(fs, label) if label else b"", label_paths)
    found = []
    for path, size, label, text in zip(paths, sizes, label_paths, texts):
        if isinstance(size, Exception):
            report.skip(
                UNREADABLE, f"{path}: no readable image header ({type(size).__name__}: {size})"
            )
        elif isinstance(text, Exception):
            report.skip(BAD_FILE, f"{label}: not readable ({type(text).__name__}: {text})")
        else:
            found.append(_Image(path, *size, _yolo_objects(text, label or "", size, report)))
    return found


def _yolo_objects(text: bytes, label: str, size: tuple[int, int], report: _Report) -> list[_Object]:
    """The boxes of a label file's lines, in pixels of an image of ``size``."""
    width, height = size
    objects = []
    for number, line in enumerate(text.decode("utf-8-sig", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        values = _yolo_values(line)
        if values is None:
            report.skip(
                MALFORMED, f"{label}:{number}: expected {YOLO_LINE}, got {line.strip()[:60]!r}"
            )
            continue
        cls, xc, yc, w, h = values
        box = (
            (xc - w / 2) * width,
            (yc - h / 2) * height,
            (xc + w / 2) * width,
            (yc + h / 2) * height,
        )
        objects.append(_Object(int(cls), box, False, f"{label}:{number}"))
    return objects


def _yolo_values(line: str) -> list[float] | None:
    """A line's class and box as five numbers, or None when it is not one."""
    try:
        values = [float(v) for v in line.split()]
    except ValueError:
        return None
    good = len(values) == 5 and all(map(math.isfinite, values)) and values[0].is_integer()
    return values if good else None
