"""Tasks: what a batch holds, the loss and the metrics. The training loop stays the same
for every task; detection and segmentation add entries here."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from raycv.registry import Registry

TASKS: Registry[type] = Registry("task")

AUX_LOSS_WEIGHT = 0.4  # Inception paper's weight for the auxiliary classifier


@dataclass
class ClassificationMetrics:
    """Running sums that can be all-reduced across workers as one tensor."""

    num_classes: int
    sums: torch.Tensor = field(init=False)  # loss_sum, count, top1, top5

    def __post_init__(self) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64)

    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        k = min(5, self.num_classes)
        top = logits.topk(k, dim=1).indices
        hits = top == labels[:, None]
        n = labels.numel()
        self.sums += torch.tensor(
            [loss.item() * n, n, hits[:, 0].sum().item(), hits.any(dim=1).sum().item()],
            dtype=torch.float64,
        )

    def compute(self, prefix: str) -> dict[str, float]:
        loss, n, top1, top5 = self.sums.tolist()
        n = max(n, 1.0)
        out = {f"{prefix}_loss": loss / n, f"{prefix}_acc": top1 / n}
        if self.num_classes > 5:
            out[f"{prefix}_acc5"] = top5 / n
        return out


@TASKS.register("classification")
class Classification:
    """Batches are ``{"image": float (N,3,H,W), "label": int64 (N,)}``."""

    def __init__(self, num_classes: int, label_smoothing: float = 0.0) -> None:
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing

    def inputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["image"]

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["label"]

    def loss(self, outputs, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (loss, logits); Inception's training output also carries aux logits."""
        logits, aux = (
            (outputs.logits, outputs.aux_logits) if hasattr(outputs, "logits") else (outputs, None)
        )
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        if aux is not None:
            loss = loss + AUX_LOSS_WEIGHT * F.cross_entropy(
                aux, labels, label_smoothing=self.label_smoothing
            )
        return loss, logits

    def metrics(self) -> ClassificationMetrics:
        return ClassificationMetrics(self.num_classes)
