"""Object detection: boxes (x1, y1, x2, y2 in pixels of the model's input) and a class each.

A batch is ``{"image": (N, 3, S, S), "boxes": float32 (N, K, 4), "labels": int64 (N, K)}``
with ``K = data.max_boxes``: Ray Data carries fixed-shape tensor columns, so each image's boxes
are padded and label -1 marks padding. An optional ``crowd`` column, bool (N, K), marks boxes
that neither train nor count in the metric (COCO ``iscrowd``, VOC ``difficult``). Class ids
start at 0, the first class name; a model whose class 0 is background (its registry entry's
``background_class``) sees them shifted by one, here and nowhere else.

Training calls ``model(images, targets)``, which returns torchvision's dict of named loss
parts; evaluation calls ``model(images)`` for detections, scored with COCO mAP
(``detection_metrics``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import numpy as np
import torch
from torch import nn

from raycv import overlays
from raycv.checkpoint import unwrap
from raycv.config import ConfigError
from raycv.data.augment import displayable
from raycv.models import MODELS
from raycv.models.registry import DenseOutput
from raycv.tasks.base import TASKS, ExportSpec, Metric, Preview
from raycv.tasks.detection_metrics import DetectionEvaluator
from raycv.tasks.detection_outputs import BoxReport, BoxWriter

Target = dict[str, torch.Tensor]


@TASKS.register("detection")
class Detection:
    targets: ClassVar[tuple[str, ...]] = ("boxes", "labels")
    primary: ClassVar[Metric] = Metric("val_map", "max")
    whole_frame: ClassVar[bool] = True  # a box anywhere in the frame counts
    default_model: ClassVar[str] = "fasterrcnn_mobilenet_v3_large_320_fpn"
    distills: ClassVar[bool] = False

    def __init__(self, class_names: list[str], cfg) -> None:
        self.class_names = list(class_names)
        self.shift = int(MODELS.get(cfg.model.name).background_class)
        self.image_size = cfg.model.image_size
        self.model_name = cfg.model.name

    def truth(self, batch: dict[str, torch.Tensor]) -> list[Target]:
        """Each image's own boxes, labels and crowd flags, padding left out."""
        crowd = batch.get("crowd")
        out = []
        for i, (boxes, labels) in enumerate(zip(batch["boxes"], batch["labels"])):
            real = labels >= 0
            flags = crowd[i][real] if crowd is not None else torch.zeros_like(labels[real])
            out.append({"boxes": boxes[real], "labels": labels[real], "iscrowd": flags.long()})
        return out

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        """Training mode: the loss dict; evaluation mode: one dict of detections per image."""
        images = list(batch["image"])
        if unwrap(model).training:  # the loop sets the mode of the module inside DDP
            targets = [
                {"boxes": t["boxes"][keep], "labels": t["labels"][keep] + self.shift}
                for t in self.truth(batch)
                for keep in [t["iscrowd"] == 0]
            ]
            return model(images, targets)
        found = model(images)
        return [{**d, "labels": d["labels"] - self.shift} for d in found]

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # torchvision's detectors compute their losses in training mode, none in evaluation.
        return outputs if isinstance(outputs, dict) else {}

    def evaluator(self) -> DetectionEvaluator:
        return DetectionEvaluator(self)

    def logits(self, outputs: Any) -> NoReturn:
        _not_yet("single-tensor output (detections are per-image dicts)")

    def distill_loss(self, student, teacher, temperature: float) -> NoReturn:
        _not_yet("distillation")

    def eval_report(self) -> BoxReport:
        return BoxReport(self)

    def prediction_writer(self, files: list[str], folder: Path, top_k: int) -> BoxWriter:
        return BoxWriter(self, files, folder, self.image_size)

    def export_spec(
        self, image_size: int, side_multiple: int | None, dynamic_sides: bool = True
    ) -> ExportSpec:
        """A one-stage detector: every anchor point's box and class scores at the training
        size, before the score threshold and NMS. Those stay outside (the card's
        ``postprocess``): they are a few lines in any runtime, and ONNX's NonMaxSuppression
        differs between them. A two-stage one (no ``dense`` rows: its second stage runs on
        the boxes its first stage's NMS keeps): its detections, NMS inside, one image at a
        time, as torchvision exports it."""
        count = len(self.class_names)
        common = {
            "check_sides": ((image_size, image_size),),
            "output_name": "detections",
            # Box corners are pixels: float32 convolutions in ONNX Runtime move a corner by
            # about 1e-5 of the image side (RetinaNet's ResNet-50 at 128 px: up to 8e-4 px
            # near 0, where the relative tolerance allows nothing); scores by under 1e-6.
            "atol": 1e-5 * image_size + 1e-4,
            "fit": f"fit the whole image into {image_size}x{image_size} keeping its aspect "
            "ratio, centred, the borders black (a letterbox); boxes come in this square's "
            "pixels",
        }
        if MODELS.get(self.model_name).dense is None:
            return ExportSpec(
                input_shape=(1, 3, image_size, image_size),
                output_shape=("detections", 6),
                output_meaning="one row per detection after the model's own NMS, best "
                "first: x1, y1, x2, y2 in pixels of the input, the score, and the class "
                "index in the order of classes (as a float)",
                traced_onnx=True,
                **common,
            )
        return ExportSpec(
            input_shape=("batch", 3, image_size, image_size),
            output_shape=("batch", "anchors", 4 + count),
            output_meaning=(
                "one row per anchor point (a fixed number at this input size): x1, y1, x2, "
                f"y2 in pixels of the input, then {count} class scores in [0, 1] in the order "
                "of classes; detections are the (row, class) pairs left by the card's "
                "postprocess"
            ),
            **common,
        )

    def exportable(self, model: nn.Module) -> nn.Module:
        dense = MODELS.get(self.model_name).dense
        return Detections(model, self.shift) if dense is None else Dense(model, dense)

    def preview(self, batch: dict[str, np.ndarray]) -> Preview:
        """Each image with its boxes in its classes' colours; crowd or difficult boxes,
        which neither train nor count, in the colour of ignored pixels."""
        colours = overlays.box_colours()
        crowd = batch.get("crowd", np.zeros(batch["labels"].shape, bool))
        shown, titles = [], []
        for image, boxes, labels, ignored in zip(
            displayable(batch["image"]), batch["boxes"], batch["labels"], crowd
        ):
            real = labels >= 0
            drawn = np.where(ignored[real, None], overlays.IGNORE_COLOUR, colours[labels[real]])
            shown.append(overlays.draw_boxes(image, boxes[real], drawn))
            counts = Counter(self.class_names[k] for k in labels[real])
            titles.append(", ".join(f"{n} {name}" for name, n in counts.items()) or "no boxes")
        names = enumerate(self.class_names)
        legend = {name: tuple(int(c) for c in colours[i]) for i, name in names}
        if crowd.any():
            legend["ignored"] = overlays.IGNORE_COLOUR
        return Preview(np.stack(shown), titles, legend)


def _not_yet(what: str) -> NoReturn:
    # Config checks refuse a teacher or a student for detection (``Detection.distills``).
    raise ConfigError(f"task=detection has no {what} yet")


class Dense(nn.Module):
    """A detector as exported: its rows before NMS (the registry entry's ``dense``), and the
    settings that turn them into detections as raycv does (``postprocess``, for the card)."""

    def __init__(self, model: nn.Module, dense: DenseOutput) -> None:
        super().__init__()
        self.model = model
        self.rows = dense.rows
        self.postprocess = dense.settings(model)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.rows(self.model, image)


class Detections(nn.Module):
    """A two-stage detector as exported: one image's detections after its own NMS, as
    (K, 6) rows of box, score and class index (from 0: background's shift undone)."""

    def __init__(self, model: nn.Module, shift: int) -> None:
        super().__init__()
        self.model = model
        self.shift = shift

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        found = self.model(list(image))[0]
        labels = (found["labels"] - self.shift).to(found["boxes"].dtype)
        return torch.cat([found["boxes"], found["scores"][:, None], labels[:, None]], 1)
