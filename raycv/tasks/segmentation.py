"""Semantic segmentation: a class id per pixel (0 = background), mIoU from a confusion
matrix that all-reduces exactly across workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raycv.data.augment import displayable
from raycv.models import MODELS
from raycv.overlays import classes_present, legend, overlay, palette
from raycv.tasks.base import (
    TASKS,
    ExportSpec,
    Logits,
    Metric,
    Preview,
    SummedEvaluator,
    soft_target_loss,
)
from raycv.tasks.iou import segmentation_scores
from raycv.tasks.segmentation_outputs import IoUReport, MaskWriter

# The coarsest output stride of common encoders: a second export check size any model takes.
EXPORT_STEP = 32


class SegmentationEvaluator(SummedEvaluator):
    """Running sums: loss_sum, images, then the (C, C) confusion matrix (rows: truth)."""

    def __init__(self, task: Segmentation) -> None:
        self.num_classes = len(task.class_names)
        super().__init__(2 + self.num_classes**2)
        self.task = task

    def process(self, batch: dict[str, torch.Tensor], outputs: Any, losses: dict) -> None:
        # Imported here for the reason Segmentation.__init__ gives.
        from torchmetrics.functional.classification import multiclass_confusion_matrix

        predicted = self.task.logits(outputs).detach().argmax(dim=1)
        confusion = multiclass_confusion_matrix(
            predicted,
            self.task.mask(batch),
            self.num_classes,
            ignore_index=self.task.ignore_index,
            validate_args=False,
        )
        n = len(predicted)
        loss = sum(v.detach() for v in losses.values()).item()
        self.sums[0] += loss * n
        self.sums[1] += n
        self.sums[2:] += confusion.flatten().to(self.sums)

    @property
    def confusion(self) -> torch.Tensor:
        return self.sums[2:].view(self.num_classes, self.num_classes)

    def evaluate(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}_loss": (self.sums[0] / self.sums[1].clamp(min=1)).item(),
            **segmentation_scores(self.confusion, self.task.class_names, prefix),
        }


@TASKS.register("segmentation")
class Segmentation:
    """Batches are ``{"image": (N, 3, H, W), "mask": uint8 (N, H, W)}``, mask values
    class ids or ``data.ignore_index``. Models return logits (N, C, H, W) or torchvision's
    ``{"out", "aux"}``; the auxiliary map joins the loss with its registry entry's weight."""

    targets: ClassVar[tuple[str, ...]] = ("mask",)
    primary: ClassVar[Metric] = Metric("val_miou", "max")
    whole_frame: ClassVar[bool] = True
    default_model: ClassVar[str] = "unet"  # model.name when the config names none
    distills: ClassVar[bool] = True

    def __init__(self, class_names: list[str], cfg) -> None:
        # Imported here: every run's driver and training workers load this module, and
        # torchmetrics (with the matplotlib it imports) adds about 0.6 s to the start of
        # each; only a segmentation run needs it, or smp's losses.
        from segmentation_models_pytorch.losses import DiceLoss

        self.class_names = list(class_names)
        self.ignore_index = cfg.data.ignore_index
        self.aux_weight = MODELS.get(cfg.model.name).aux_weight
        self.dice_weight = cfg.train.dice_weight
        self.dice = DiceLoss("multiclass", ignore_index=self.ignore_index)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        return model(batch["image"])

    def mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["mask"].long()

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = self.mask(batch)
        logits = self.logits(outputs)
        parts = {"ce": F.cross_entropy(logits, mask, ignore_index=self.ignore_index)}
        if self.dice_weight:
            parts["dice"] = self.dice_weight * self.dice(logits, mask)
        aux = outputs.get("aux") if isinstance(outputs, dict) else None
        if aux is not None and self.aux_weight:
            parts["aux"] = self.aux_weight * F.cross_entropy(
                aux, mask, ignore_index=self.ignore_index
            )
        return parts

    def logits(self, outputs: Any) -> torch.Tensor:
        return outputs["out"] if isinstance(outputs, dict) else outputs

    def evaluator(self) -> SegmentationEvaluator:
        return SegmentationEvaluator(self)

    def distill_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        return soft_target_loss(student, teacher, temperature)  # per-pixel soft targets

    def eval_report(self) -> IoUReport:
        return IoUReport(self)

    def prediction_writer(self, files: list[str], folder: Path, top_k: int) -> MaskWriter:
        return MaskWriter(self, files, folder)

    def export_spec(
        self, image_size: int, side_multiple: int | None, dynamic_sides: bool = True
    ) -> ExportSpec:
        """A class-score map the size of the input. Dynamic height and width are checked at
        the training size and at a larger, non-square one; fixed ones at the training size."""
        step = side_multiple or EXPORT_STEP
        if dynamic_sides:
            sides = f"multiples of {side_multiple}" if side_multiple else "any size"
            height, width = "height", "width"
            checked = ((image_size, image_size), (image_size + step, image_size + 2 * step))
        else:
            sides = "fixed; this model exports at its training size only"
            height = width = image_size
            checked = ((image_size, image_size),)
        return ExportSpec(
            input_shape=("batch", 3, height, width),
            output_shape=("batch", len(self.class_names), height, width),
            output_meaning="unnormalised class scores per pixel in the order of classes; "
            f"argmax over dimension 1 gives each pixel's class id. Height and width: "
            f"{sides} (trained at {image_size}x{image_size})",
            check_sides=checked,
        )

    def exportable(self, model: nn.Module) -> Logits:
        return Logits(model, self)

    def preview(self, batch: dict[str, np.ndarray]) -> Preview:
        colours = palette(self.ignore_index)
        images = displayable(batch["image"])
        shown = np.stack([overlay(i, m, colours) for i, m in zip(images, batch["mask"])])
        names = self.class_names
        titles = [", ".join(classes_present(m, names)) or names[0] for m in batch["mask"]]
        return Preview(shown, titles, legend(self.class_names, colours, self.ignore_index))
