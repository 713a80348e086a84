"""Segmentation's stage outputs: ``raycv eval``'s IoU report (per-class table, confusion
matrix, the worst images drawn) and ``raycv predict``'s masks, overlays and class areas."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from raycv.data.augment import displayable
from raycv.data.masks import open_upright
from raycv.errors import BadImageError
from raycv.overlays import jpeg, legend, mask_png, overlay, palette
from raycv.tasks.base import EvalResult, in_listing_order, per_class_lines
from raycv.tasks.iou import image_confusions, mean_iou, segmentation_scores

if TYPE_CHECKING:
    from raycv.tasks.segmentation import Segmentation

WORST_SHOWN = 8  # validation images with the lowest IoU that raycv eval draws
OVERLAY_SIDE = 1024  # predict's overlays are pictures to look at: longer side at most this
MASKS, OVERLAYS = "masks", "overlays"  # predict's sub-folders


class IoUReport:
    """``raycv eval``: the pixel confusion matrix summed over the split -> mIoU, pixel
    accuracy and each class's IoU (training's ``val_*`` numbers), the matrix row-normalised
    (plots/confusion.png), and the ``WORST_SHOWN`` images with the lowest IoU of their own,
    with their true and predicted masks (plots/worst.png)."""

    def __init__(self, task: Segmentation) -> None:
        self.task = task
        self.class_names = task.class_names
        self.ignore_index = task.ignore_index
        self.colours = palette(task.ignore_index)
        n = len(task.class_names)
        self.confusion = np.zeros((n, n), np.int64)
        self.images = 0
        self.worst: list[tuple[float, int, np.ndarray]] = []  # IoU, row, (3, H, W, 3) pictures

    def process(self, batch: dict[str, np.ndarray], outputs: Any) -> None:
        logits = self.task.logits(outputs).float()
        truth, predicted = batch["mask"], logits.argmax(dim=1).to(torch.uint8).numpy()
        confusions = image_confusions(truth, predicted, len(self.class_names), self.ignore_index)
        self.confusion += confusions.sum(axis=0)
        ious = [mean_iou(c) for c in confusions]
        self._keep_worst(batch["image"], truth, predicted, ious)
        self.images += len(truth)

    def _keep_worst(
        self, images: np.ndarray, truth: np.ndarray, predicted: np.ndarray, ious: list[float]
    ) -> None:
        """The lowest IoUs so far; only the images that make the cut are drawn."""
        offset = self.images
        candidates = [(iou, offset + i) for i, iou in enumerate(ious) if not math.isnan(iou)]
        ranked = sorted([(iou, row) for iou, row, _ in self.worst] + candidates)[:WORST_SHOWN]
        pictures = {row: picture for _, row, picture in self.worst}
        new = [row - offset for _, row in ranked if row not in pictures]
        for i, image in zip(new, displayable(images[new]) if new else []):
            drawn = [overlay(image, ids[i], self.colours) for ids in (truth, predicted)]
            pictures[offset + i] = np.stack([image, *drawn])
        self.worst = [(iou, row, pictures[row]) for iou, row in ranked]

    def write(self, folder: Path) -> EvalResult:
        from raycv import plots  # matplotlib: only where pictures are drawn, not in workers

        scores = segmentation_scores(torch.from_numpy(self.confusion), self.class_names, "val")
        per_class = {n: scores[f"val_iou/{n}"] for n in self.class_names}
        metrics = {
            "miou": scores["val_miou"],
            "pixel_acc": scores["val_pixel_acc"],
            "per_class_iou": {n: None if math.isnan(v) else v for n, v in per_class.items()},
            "images": self.images,
            "confusion_matrix": self.confusion.tolist(),
            "worst": [{"row": row, "iou": iou} for iou, row, _ in self.worst],
        }
        plots.confusion_shares(
            self.confusion, self.class_names, folder / "plots" / "confusion.png", "pixels"
        )
        paths = {"confusion": "plots/confusion.png"}
        if self.worst:
            rows = [(f"row {row}: IoU {iou:.2f}", list(shown)) for iou, row, shown in self.worst]
            colours = legend(self.class_names, self.colours, self.ignore_index)
            headers = ["image", "truth", "prediction"]
            plots.image_rows(rows, headers, folder / "plots" / "worst.png", colours)
            paths["worst"] = "plots/worst.png"
        return EvalResult(metrics, paths, self._summary(metrics))

    def _summary(self, metrics: dict[str, Any]) -> str:
        truth = self.confusion.sum(axis=1)
        head = (
            f"mIoU {metrics['miou']:.4f}, pixel accuracy {metrics['pixel_acc']:.4f} on "
            f"{self.images} images ({truth.sum():,} labelled pixels)"
        )
        shares = [f"{count / max(truth.sum(), 1):.1%}" for count in truth]
        # IoU "-": the class is in neither truth nor output
        table = per_class_lines(metrics["per_class_iou"], "IoU", "share of pixels", shares)
        return "\n".join([head, *table])


@dataclass(frozen=True)
class RenderMasks:
    """Ray Data batch function after the model: each file's class map (S x S, of the whole
    image squeezed) back at the file's own size, nearest so that ids stay ids, as a palette
    PNG; an overlay JPEG (longer side at most ``OVERLAY_SIDE``); each class's share of the
    image. Reads each file again for its size and pixels (local paths must be readable on
    every node, as for decoding). Never raises: a file that fails now gets its error."""

    num_classes: int
    colours: np.ndarray

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["path"])
        areas = np.full((n, self.num_classes), np.nan)
        masks, overlays = np.full(n, b"", dtype=object), np.full(n, b"", dtype=object)
        errors = np.asarray(batch["error"], dtype=object).copy()
        for i, (path, classes) in enumerate(zip(batch["path"], batch["classes"])):
            if not errors[i]:
                try:
                    masks[i], overlays[i], areas[i] = self.render(str(path), classes)
                except BadImageError as e:
                    errors[i] = str(e)
        return {
            "path": batch["path"],
            "error": errors,
            "areas": areas,
            "mask_png": masks,
            "overlay_jpg": overlays,
        }

    def render(self, path: str, classes: np.ndarray) -> tuple[bytes, bytes, np.ndarray]:
        try:
            data = Path(path).read_bytes()
        except OSError as e:  # gone or changed since it was decoded
            raise BadImageError(f"{path}: not readable ({type(e).__name__}: {e})") from e
        image, (width, height) = open_upright(data, path, OVERLAY_SIDE)
        ids = np.asarray(Image.fromarray(classes).resize((width, height), Image.Resampling.NEAREST))
        areas = np.bincount(ids.ravel(), minlength=self.num_classes) / ids.size
        scale = min(1.0, OVERLAY_SIDE / max(width, height))
        shown = (max(1, round(width * scale)), max(1, round(height * scale)))
        pixels = np.asarray(image.resize(shown, Image.Resampling.BILINEAR))
        small = np.asarray(Image.fromarray(classes).resize(shown, Image.Resampling.NEAREST))
        return mask_png(ids, self.colours), jpeg(overlay(pixels, small, self.colours)), areas


def output_names(files: list[str]) -> dict[str, str]:
    """Each file's output name: its stem, or ``<stem>-<n>`` (n: its place in the listing)
    where stems repeat (a.jpg and a.png, or img.jpg in two folders)."""
    stems = [Path(f).stem for f in files]
    repeated = {stem for stem, count in Counter(stems).items() if count > 1}
    taken = set(stems) - repeated
    names = {}
    for i, (file, stem) in enumerate(zip(files, stems)):
        name = stem
        if stem in repeated:
            name = f"{stem}-{i}"
            while name in taken or name in repeated:  # a file may be called "a-3.jpg" too
                name = f"{name}-{i}"
            taken.add(name)
        names[file] = name
    return names


class MaskWriter:
    """``raycv predict``: per good file, ``masks/<name>.png`` (a palette PNG of class ids at
    the file's own size) and ``overlays/<name>.jpg`` (the image with its mask over it),
    named by ``output_names``. Columns of predictions.parquet:

    * ``mask`` / ``overlay``: those files, relative to the run folder; "" for a bad file.
    * ``area/<class>``: the class's share of the image's pixels (they sum to 1); NaN for a
      bad file (an empty cell in the CSV).
    """

    def __init__(self, task: Segmentation, files: list[str], folder: Path) -> None:
        self.task = task
        self.class_names = task.class_names
        self.files = files
        self.folder = folder
        self.names = output_names(files)
        self.render = RenderMasks(len(task.class_names), palette(task.ignore_index))
        self.paths = {"masks": MASKS, "overlays": OVERLAYS}
        self.settings: dict[str, Any] = {}
        self.rows: dict[str, dict[str, Any]] = {}

    def columns(self, outputs: Any, bad: np.ndarray) -> dict[str, np.ndarray]:
        logits = self.task.logits(outputs)
        return {"classes": logits.argmax(dim=1).to(torch.uint8).cpu().numpy()}

    def collect(self, batch: dict[str, np.ndarray]) -> None:
        for path, error, areas, png, jpg in zip(
            batch["path"], batch["error"], batch["areas"], batch["mask_png"], batch["overlay_jpg"]
        ):
            row = {"areas": areas, "mask": "", "overlay": "", "error": str(error)}
            if not error:
                row["mask"] = self._write(MASKS, str(path), ".png", png)
                row["overlay"] = self._write(OVERLAYS, str(path), ".jpg", jpg)
            self.rows[str(path)] = row

    def _write(self, folder: str, path: str, suffix: str, data: bytes) -> str:
        relative = f"{folder}/{self.names[path]}{suffix}"
        (self.folder / folder).mkdir(exist_ok=True)
        (self.folder / relative).write_bytes(data)
        return relative

    def table(self) -> pa.Table:
        rows = in_listing_order(self.rows, self.files)
        areas = np.stack([r["areas"] for r in rows])
        return pa.table(
            {
                "path": pa.array(self.files, pa.string()),
                "mask": pa.array([r["mask"] for r in rows], pa.string()),
                "overlay": pa.array([r["overlay"] for r in rows], pa.string()),
                **{
                    f"area/{name}": pa.array(areas[:, c], pa.float64())
                    for c, name in enumerate(self.class_names)
                },
                "error": pa.array([r["error"] for r in rows], pa.string()),
            }
        )
