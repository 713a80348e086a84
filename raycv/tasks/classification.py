"""Classification: one label per image, top-1 (and top-5) accuracy."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from raycv.data.augment import displayable
from raycv.tasks.base import (
    TASKS,
    EvalResult,
    ExportSpec,
    Logits,
    Metric,
    Preview,
    SummedEvaluator,
    in_listing_order,
    soft_target_loss,
)

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


def accuracy_report(matrix: np.ndarray, class_names: list[str]) -> dict:
    per_class = matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)
    return {
        "acc": float(matrix.diagonal().sum() / max(matrix.sum(), 1)),
        "per_class_acc": {c: float(a) for c, a in zip(class_names, per_class)},
        "confusion_matrix": matrix.tolist(),
    }


class AccuracyReport:
    """``raycv eval``: counts of (true, predicted) classes -> accuracy, each class's
    accuracy and the confusion matrix (plots/confusion.png)."""

    def __init__(self, task: Classification) -> None:
        self.task = task
        self.class_names = task.class_names
        self.matrix = np.zeros((len(self.class_names), len(self.class_names)), dtype=np.int64)

    def process(self, batch: dict[str, np.ndarray], outputs: Any) -> None:
        predicted = self.task.logits(outputs).float().argmax(dim=1).numpy()
        np.add.at(self.matrix, (batch["label"].astype(np.int64), predicted), 1)

    def write(self, folder: Path) -> EvalResult:
        from raycv import plots  # matplotlib: only where pictures are drawn, not in workers

        metrics = accuracy_report(self.matrix, self.class_names)
        plots.confusion_matrix(self.matrix, self.class_names, folder / "plots" / "confusion.png")
        width = max(map(len, self.class_names))
        lines = [f"  {c.ljust(width)}  {a:.4f}" for c, a in metrics["per_class_acc"].items()]
        summary = f"accuracy {metrics['acc']:.4f} on {self.matrix.sum()} images\n"
        return EvalResult(metrics, {"confusion": "plots/confusion.png"}, summary + "\n".join(lines))


class TopKWriter:
    """``raycv predict``: each file's ``top_k`` classes. Columns of predictions.parquet:

    * ``class``: the top-1 class name; ``""`` for a bad file.
    * ``score``: its softmax probability; NaN for a bad file (an empty cell in the CSV).
    * ``top_classes`` / ``top_scores``: the ``top_k`` best classes and their probabilities,
      best first. Lists (``list<string>``, ``list<double>``) in Parquet, ``;``-joined strings
      in the CSV; empty for a bad file.
    """

    render = None

    def __init__(self, task: Classification, files: list[str], top_k: int) -> None:
        self.task = task
        self.class_names = class_names = task.class_names
        self.files = files
        self.top_k = min(top_k, len(class_names))
        self.paths: dict[str, str] = {}
        self.settings = {"top_k": self.top_k}
        self.rows: dict[str, dict[str, Any]] = {}

    def columns(self, outputs: Any, bad: np.ndarray) -> dict[str, np.ndarray]:
        logits = self.task.logits(outputs).float()
        scores, indices = logits.softmax(dim=1).topk(self.top_k, dim=1)
        scores, indices = scores.cpu().numpy(), indices.cpu().numpy()
        scores[bad], indices[bad] = np.nan, -1
        return {"top_index": indices, "top_score": scores}

    def collect(self, batch: dict[str, np.ndarray]) -> None:
        for path, indices, scores, error in zip(
            batch["path"], batch["top_index"], batch["top_score"], batch["error"]
        ):
            good = not error
            self.rows[str(path)] = {
                "classes": [self.class_names[i] for i in indices] if good else [],
                "scores": [float(s) for s in scores] if good else [],
                "error": str(error),
            }

    def table(self) -> pa.Table:
        rows = in_listing_order(self.rows, self.files)
        top_classes = [r["classes"] for r in rows]
        top_scores = [r["scores"] for r in rows]
        return pa.table(
            {
                "path": pa.array(self.files, pa.string()),
                "class": pa.array([c[0] if c else "" for c in top_classes], pa.string()),
                "score": pa.array([s[0] if s else math.nan for s in top_scores], pa.float64()),
                "top_classes": pa.array(top_classes, pa.list_(pa.string())),
                "top_scores": pa.array(top_scores, pa.list_(pa.float64())),
                "error": pa.array([r["error"] for r in rows], pa.string()),
            }
        )


@TASKS.register("classification")
class Classification:
    """Batches are ``{"image": (N, 3, H, W), "label": int64 (N,)}``."""

    targets: ClassVar[tuple[str, ...]] = ("label",)
    primary: ClassVar[Metric] = Metric("val_acc", "max")
    whole_frame: ClassVar[bool] = False
    default_model: ClassVar[str] = "resnet18"  # model.name when the config names none
    distills: ClassVar[bool] = True

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

    def eval_report(self) -> AccuracyReport:
        return AccuracyReport(self)

    def prediction_writer(self, files: list[str], folder: Path, top_k: int) -> TopKWriter:
        return TopKWriter(self, files, top_k)

    def export_spec(
        self, image_size: int, side_multiple: int | None, dynamic_sides: bool = True
    ) -> ExportSpec:
        """One class-score vector per image at the training size (the classifiers' pooling
        would take other sizes, but only this one is checked)."""
        return ExportSpec(
            input_shape=("batch", 3, image_size, image_size),
            output_shape=("batch", len(self.class_names)),
            output_meaning="unnormalised class scores in the order of classes; softmax for "
            "probabilities",
            check_sides=((image_size, image_size),),
        )

    def exportable(self, model: nn.Module) -> Logits:
        return Logits(model, self)

    def preview(self, batch: dict[str, np.ndarray]) -> Preview:
        titles = [self.class_names[i] for i in batch["label"]]
        return Preview(displayable(batch["image"]), titles)
