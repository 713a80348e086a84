"""Detection's stage outputs: ``raycv eval``'s box report (COCO mAP and each class's AP, the
precision-recall curve at IoU 0.5, and the worst images drawn with their true and predicted
boxes) and ``raycv predict``'s boxes in each file's own pixels, with an overlay each."""

from __future__ import annotations

import json
import math
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
from raycv.overlays import box_colours, draw_boxes, jpeg
from raycv.tasks.base import EvalResult, in_listing_order, per_class_lines
from raycv.tasks.detection_metrics import Boxes, coco_map
from raycv.tasks.segmentation_outputs import OVERLAY_SIDE, OVERLAYS, output_names

if TYPE_CHECKING:
    from raycv.tasks.detection import Detection

WORST_SHOWN = 8  # validation images with the lowest F1 that raycv eval draws
SHOWN_SCORE = 0.5  # detections drawn, and counted in an image's F1, from this score up
MATCH_IOU = 0.5  # a detection finds a true box of its class from this IoU up
MAX_KEPT = 100  # detections per file that predict keeps (torchvision's detections_per_img)
COCO_RESULTS = "detections.json"  # predict's detections in COCO's results format


class BoxReport:
    """``raycv eval``: COCO mAP over the split (training's ``val_map`` numbers), each class's
    AP, precision against recall at IoU 0.5 per class (plots/pr_curve.png), and the
    ``WORST_SHOWN`` images with the lowest F1 of their own (detections scoring at least
    ``SHOWN_SCORE`` matched at IoU ``MATCH_IOU``), truth beside prediction (plots/worst.png)."""

    def __init__(self, task: Detection) -> None:
        self.task = task
        self.colours = box_colours()
        self.predictions: list[Boxes] = []
        self.truths: list[Boxes] = []
        self.worst: list[tuple[float, int, list[np.ndarray]]] = []  # F1, row, pictures

    def process(self, batch: dict[str, np.ndarray], outputs: list[Boxes]) -> None:
        columns = ("boxes", "labels", "crowd")
        # Ray may hand over read-only views of its object store; torch wants writable arrays.
        given = {k: np.require(batch[k], requirements=["W"]) for k in columns if k in batch}
        truths = self.task.truth({k: torch.from_numpy(v) for k, v in given.items()})
        found = [{k: v.detach().cpu().float() for k, v in d.items()} for d in outputs]
        for d in found:
            d["labels"] = d["labels"].long()
        offset = len(self.truths)
        self.truths += truths
        self.predictions += found
        scores = [image_f1(p, t) for p, t in zip(found, truths)]
        self._keep_worst(batch["image"], offset, scores)

    def _keep_worst(self, images: np.ndarray, offset: int, scores: list[float]) -> None:
        """The lowest F1s so far; only the images that make the cut are drawn."""
        candidates = [(f1, offset + i) for i, f1 in enumerate(scores)]
        ranked = sorted([(f1, row) for f1, row, _ in self.worst] + candidates)[:WORST_SHOWN]
        pictures = {row: shown for _, row, shown in self.worst}
        new = [row - offset for _, row in ranked if row not in pictures]
        for i, image in zip(new, displayable(images[new]) if new else []):
            pictures[offset + i] = self._drawn(image, offset + i)
        self.worst = [(f1, row, pictures[row]) for f1, row in ranked]

    def _drawn(self, image: np.ndarray, row: int) -> list[np.ndarray]:
        truth, found = self.truths[row], self.predictions[row]
        shown = found["scores"] >= SHOWN_SCORE
        return [
            draw_boxes(image, truth["boxes"].numpy(), self.colours[truth["labels"].numpy()]),
            draw_boxes(
                image, found["boxes"][shown].numpy(), self.colours[found["labels"][shown].numpy()]
            ),
        ]

    def write(self, folder: Path) -> EvalResult:
        from raycv import plots  # matplotlib: only where pictures are drawn, not in workers

        names = self.task.class_names
        scores, raw = coco_map(self.predictions, self.truths, names, curves=True)
        metrics = {
            "map": scores["map"],
            "map50": scores["map50"],
            "map75": scores["map75"],
            "per_class_ap": {n: _number(scores.get(f"ap/{n}", math.nan)) for n in names},
            "images": len(self.truths),
            "boxes": int(sum(len(t["labels"]) for t in self.truths)),
            "worst": [{"row": row, "f1": f1} for f1, row, _ in self.worst],
        }
        legend = {n: tuple(int(c) for c in self.colours[i]) for i, n in enumerate(names)}
        plots.precision_recall(_curves(raw, names), folder / "plots" / "pr_curve.png")
        paths = {"pr_curve": "plots/pr_curve.png"}
        if self.worst:
            rows = [(f"row {row}: F1 {f1:.2f}", shown) for f1, row, shown in self.worst]
            headers = ["truth", f"prediction (score >= {SHOWN_SCORE})"]
            plots.image_rows(rows, headers, folder / "plots" / "worst.png", legend)
            paths["worst"] = "plots/worst.png"
        return EvalResult(metrics, paths, self._summary(metrics))

    def _summary(self, metrics: dict[str, Any]) -> str:
        counts = np.bincount(
            torch.cat([t["labels"] for t in self.truths]).numpy(),
            minlength=len(self.task.class_names),
        )
        head = (
            f"mAP {metrics['map']:.4f} (mAP@.5 {metrics['map50']:.4f}, mAP@.75 "
            f"{metrics['map75']:.4f}) on {metrics['images']} images, {metrics['boxes']} boxes"
        )
        # AP "-": no true box of the class to score
        table = per_class_lines(metrics["per_class_ap"], "AP", "boxes", counts)
        return "\n".join([head, *table])


def image_f1(found: Boxes, truth: Boxes) -> float:
    """F1 of one image's detections scoring at least ``SHOWN_SCORE``: each true box (crowd
    ones left out) is found by at most one detection of its class at IoU ``MATCH_IOU`` or
    more, the best-scoring first, as COCO matches. 1 when there is nothing to find and
    nothing was found."""
    # Imported here: torchvision.ops imports torch._dynamo (1.2 s), and the driver imports
    # this module with the task registry only to validate a config.
    from torchvision.ops import box_iou

    keep = truth["iscrowd"] == 0
    boxes, labels = truth["boxes"][keep], truth["labels"][keep]
    shown = found["scores"] >= SHOWN_SCORE
    order = torch.argsort(found["scores"][shown], descending=True)
    det_boxes, det_labels = found["boxes"][shown][order], found["labels"][shown][order]
    if not len(labels) and not len(det_labels):
        return 1.0
    taken = torch.zeros(len(labels), dtype=torch.bool)
    overlaps = box_iou(det_boxes, boxes) if len(labels) and len(det_labels) else None
    hits = 0
    for i in range(len(det_labels)):
        if overlaps is None:
            break
        candidates = (det_labels[i] == labels) & ~taken & (overlaps[i] >= MATCH_IOU)
        if candidates.any():
            taken[torch.argmax(torch.where(candidates, overlaps[i], -1.0))] = True
            hits += 1
    return 2 * hits / (len(labels) + len(det_labels))


def _curves(raw: dict[str, Any], names: list[str]) -> dict[str, np.ndarray]:
    """Each class's precision at COCO's 101 recall points, at IoU 0.5, all areas, 100
    detections (torchmetrics' extended summary); classes with no true box left out."""
    precision = raw["precision"]  # (IoU thresholds, recall points, classes, areas, max dets)
    classes = raw["classes"].reshape(-1).tolist()
    curves = {}
    for k, cls in enumerate(classes):
        values = precision[0, :, k, 0, -1].numpy()
        if (values >= 0).any():  # -1: COCO had nothing to score
            curves[names[int(cls)]] = np.clip(values, 0, None)
    return curves


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


@dataclass(frozen=True)
class RenderBoxes:
    """Ray Data batch function after the model: each file's detections, found in the
    letterboxed ``size`` x ``size`` input, moved back to the file's own pixels, and an overlay
    JPEG (longer side at most ``OVERLAY_SIDE``) with those scoring ``SHOWN_SCORE`` or more
    drawn. Reads each file again for its size and pixels; never raises: a file that fails
    now gets its error."""

    size: int
    colours: np.ndarray

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["path"])
        boxes = np.asarray(batch["boxes"], np.float32).copy()
        overlays = np.full(n, b"", dtype=object)
        errors = np.asarray(batch["error"], dtype=object).copy()
        for i, path in enumerate(batch["path"]):
            if not errors[i]:
                try:
                    boxes[i], overlays[i] = self.render(str(path), boxes[i], batch, i)
                except BadImageError as e:
                    errors[i] = str(e)
        kept = {k: batch[k] for k in ("path", "labels", "scores")}
        return {**kept, "boxes": boxes, "overlay_jpg": overlays, "error": errors}

    def render(
        self, path: str, boxes: np.ndarray, batch: dict[str, np.ndarray], i: int
    ) -> tuple[np.ndarray, bytes]:
        try:
            data = Path(path).read_bytes()
        except OSError as e:  # gone or changed since it was decoded
            raise BadImageError(f"{path}: not readable ({type(e).__name__}: {e})") from e
        image, (width, height) = open_upright(data, path, OVERLAY_SIDE)
        # The eval preset fitted the long side to ``size`` and centred the rest: undo that.
        scale = self.size / max(width, height)
        shift = np.array([self.size - width * scale, self.size - height * scale] * 2) / 2
        limits = np.array([width, height, width, height], np.float32)
        own = np.clip((boxes - shift) / scale, 0, limits).astype(np.float32)
        side = min(1.0, OVERLAY_SIDE / max(width, height))
        shown_size = (max(1, round(width * side)), max(1, round(height * side)))
        pixels = np.asarray(image.resize(shown_size, Image.Resampling.BILINEAR))
        labels, scores = batch["labels"][i], batch["scores"][i]
        drawn = (labels >= 0) & (scores >= SHOWN_SCORE)
        picture = draw_boxes(pixels, own[drawn] * side, self.colours[labels[drawn]], width=2)
        return own, jpeg(picture)


class BoxWriter:
    """``raycv predict``: per good file, ``overlays/<name>.jpg`` (the image with the boxes
    scoring ``SHOWN_SCORE`` or more drawn), named by ``output_names``. Columns of
    predictions.parquet, detections best first (at most ``MAX_KEPT``, from the model's own
    score floor up):

    * ``overlay``: that file, relative to the run folder; "" for a bad file.
    * ``count``: the detections scoring ``SHOWN_SCORE`` or more.
    * ``boxes``: x0, y0, x1, y1 in the file's own (upright) pixels, one list per detection.
    * ``classes`` / ``scores``: each detection's class name and score.
    """

    def __init__(self, task: Detection, files: list[str], folder: Path, size: int) -> None:
        self.class_names = task.class_names
        self.files = files
        self.folder = folder
        self.names = output_names(files)
        self.render = RenderBoxes(size, box_colours())
        self.paths = {"overlays": OVERLAYS, "coco_results": COCO_RESULTS}
        self.settings: dict[str, Any] = {"shown_score": SHOWN_SCORE}
        self.rows: dict[str, dict[str, Any]] = {}

    def columns(self, outputs: list[Boxes], bad: np.ndarray) -> dict[str, np.ndarray]:
        """Each image's detections padded to ``MAX_KEPT`` rows (label -1), best first."""
        n = len(outputs)
        boxes = np.zeros((n, MAX_KEPT, 4), np.float32)
        labels = np.full((n, MAX_KEPT), -1, np.int64)
        scores = np.zeros((n, MAX_KEPT), np.float32)
        for i, found in enumerate(outputs):
            order = torch.argsort(found["scores"], descending=True)[:MAX_KEPT].cpu()
            k = len(order)
            boxes[i, :k] = found["boxes"].cpu()[order].numpy()
            labels[i, :k] = found["labels"].cpu()[order].numpy()
            scores[i, :k] = found["scores"].cpu()[order].numpy()
        labels[bad] = -1
        return {"boxes": boxes, "labels": labels, "scores": scores}

    def collect(self, batch: dict[str, np.ndarray]) -> None:
        for path, error, boxes, labels, scores, jpg in zip(
            batch["path"],
            batch["error"],
            batch["boxes"],
            batch["labels"],
            batch["scores"],
            batch["overlay_jpg"],
        ):
            real = labels >= 0 if not error else np.zeros(len(labels), bool)
            row = {
                "boxes": [[float(v) for v in box] for box in boxes[real]],
                "classes": [self.class_names[k] for k in labels[real]],
                "scores": [float(s) for s in scores[real]],
                "overlay": "",
                "error": str(error),
            }
            if not error:
                row["overlay"] = f"{OVERLAYS}/{self.names[str(path)]}.jpg"
                (self.folder / OVERLAYS).mkdir(exist_ok=True)
                (self.folder / row["overlay"]).write_bytes(jpg)
            self.rows[str(path)] = row

    def table(self) -> pa.Table:
        """The table, once every file is in; the same detections also go to
        ``detections.json`` in COCO's results format."""
        rows = in_listing_order(self.rows, self.files)
        self._coco_results(rows)
        counts = [sum(s >= SHOWN_SCORE for s in r["scores"]) for r in rows]
        return pa.table(
            {
                "path": pa.array(self.files, pa.string()),
                "overlay": pa.array([r["overlay"] for r in rows], pa.string()),
                "count": pa.array(counts, pa.int64()),
                "boxes": pa.array([r["boxes"] for r in rows], pa.list_(pa.list_(pa.float64()))),
                "classes": pa.array([r["classes"] for r in rows], pa.list_(pa.string())),
                "scores": pa.array([r["scores"] for r in rows], pa.list_(pa.float64())),
                "error": pa.array([r["error"] for r in rows], pa.string()),
            }
        )

    def _coco_results(self, rows: list[dict[str, Any]]) -> None:
        """COCO's results format (pycocotools ``loadRes``, faster-coco-eval): one entry per
        detection, ``image_id`` the file's place in the listing (``file_name`` names it),
        ``category_id`` the class id, ``bbox`` x, y, width, height in the file's pixels."""
        results = [
            {
                "image_id": image_id,
                "file_name": path,
                "category_id": self.class_names.index(name),
                "category": name,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": score,
            }
            for image_id, (path, row) in enumerate(zip(self.files, rows))
            for (x0, y0, x1, y1), name, score in zip(row["boxes"], row["classes"], row["scores"])
        ]
        (self.folder / COCO_RESULTS).write_text(json.dumps(results))
