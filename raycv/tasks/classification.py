"""Classification: one label per image, top-1 (and top-5) accuracy."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from raycv.tasks.base import TASKS, Metric, SummedEvaluator, soft_target_loss

AUX_LOSS_WEIGHT = 0.4  # Inception paper's weight for the auxiliary classifier


class ClassificationEvaluator(SummedEvaluator):
    """Running sums: loss_sum, count, top1, top5."""

    def __init__(self, task: Classification) -> None:
        super().__init__(4)
        self.task = task
        self.num_classes = len(task.class_names)

    def process(self, batch: dict[str, torch.Tensor], outputs: Any, losses: dict) -> None:
        logits, labels = self.task.logits(outputs).detach(), batch["label"]
        top = logits.topk(min(5, self.num_classes), dim=1).indices
        hits = top == labels[:, None]
        n = labels.numel()
        loss = sum(v.detach() for v in losses.values()).item()
        self.sums += torch.tensor(
            [loss * n, n, hits[:, 0].sum().item(), hits.any(dim=1).sum().item()],
            dtype=torch.float64,
        )

    def evaluate(self, prefix: str) -> dict[str, float]:
        loss, n, top1, top5 = self.sums.tolist()
        n = max(n, 1.0)
        out = {f"{prefix}_loss": loss / n, f"{prefix}_acc": top1 / n}
        if self.num_classes > 5:
            out[f"{prefix}_acc5"] = top5 / n
        return out


@TASKS.register("classification")
class Classification:
    """Batches are ``{"image": float (N, 3, H, W), "label": int64 (N,)}``."""

    targets: ClassVar[tuple[str, ...]] = ("label",)
    primary: ClassVar[Metric] = Metric("val_acc", "max")
    whole_frame: ClassVar[bool] = False

    def __init__(self, class_names: list[str], cfg) -> None:
        self.class_names = list(class_names)
        self.label_smoothing = cfg.train.label_smoothing

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        return model(batch["image"])

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cross-entropy; Inception's training output also carries aux logits."""
        labels = batch["label"]
        parts = {"ce": self._ce(self.logits(outputs), labels)}
        aux = getattr(outputs, "aux_logits", None)
        if aux is not None:
            parts["aux"] = AUX_LOSS_WEIGHT * self._ce(aux, labels)
        return parts

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def logits(self, outputs: Any) -> torch.Tensor:
        return outputs.logits if hasattr(outputs, "logits") else outputs

    def evaluator(self) -> ClassificationEvaluator:
        return ClassificationEvaluator(self)

    def distill_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        return soft_target_loss(student, teacher, temperature)
