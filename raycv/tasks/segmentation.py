"""Semantic segmentation: a class id per pixel (0 = background), mIoU from a confusion
matrix that all-reduces exactly across workers."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn
from torchmetrics.functional.classification import multiclass_confusion_matrix

from raycv.models import MODELS
from raycv.tasks.base import TASKS, Metric, SummedEvaluator, soft_target_loss


class SegmentationEvaluator(SummedEvaluator):
    """Running sums: loss_sum, images, then the (C, C) confusion matrix (rows: truth)."""

    def __init__(self, task: Segmentation) -> None:
        self.num_classes = len(task.class_names)
        super().__init__(2 + self.num_classes**2)
        self.task = task

    def process(self, batch: dict[str, torch.Tensor], outputs: Any, losses: dict) -> None:
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


def segmentation_scores(
    confusion: torch.Tensor, class_names: list[str], prefix: str
) -> dict[str, float]:
    """mIoU, pixel accuracy and each class's IoU from a confusion matrix (rows: truth).
    A class absent from both truth and prediction has no IoU and is left out of the mean,
    as in torchvision's references."""
    confusion = confusion.double()
    hits = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - hits
    iou = hits / union  # NaN where union == 0
    out = {
        f"{prefix}_miou": iou.nanmean().nan_to_num(0.0).item(),
        f"{prefix}_pixel_acc": (hits.sum() / confusion.sum().clamp(min=1)).item(),
    }
    for name, value in zip(class_names, iou.tolist()):
        out[f"{prefix}_iou/{name}"] = value
    return out


@TASKS.register("segmentation")
class Segmentation:
    """Batches are ``{"image": float (N, 3, H, W), "mask": uint8 (N, H, W)}``, mask values
    class ids or ``data.ignore_index``. Models return logits (N, C, H, W) or torchvision's
    ``{"out", "aux"}``; the auxiliary map joins the loss with its registry entry's weight."""

    targets: ClassVar[tuple[str, ...]] = ("mask",)
    primary: ClassVar[Metric] = Metric("val_miou", "max")
    whole_frame: ClassVar[bool] = True

    def __init__(self, class_names: list[str], cfg) -> None:
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
