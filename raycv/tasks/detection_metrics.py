"""Detection metrics: COCO mAP, computed exactly once per evaluation.

torchmetrics' ``MeanAveragePrecision`` syncs its lists of boxes across processes by itself, and
under DDP with Ray that is known to hang or to give each rank its own value (torchmetrics issue
3199): its per-rank lists differ in length, which is the normal case in detection. Here each
worker keeps its images' detections and targets on the CPU, ``sync`` gathers them all to
rank 0, which alone runs COCO's evaluation (faster_coco_eval) with torchmetrics' own sync
switched off, and broadcasts the numbers; every worker then reports the same values."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from raycv.tasks.detection import Detection

Boxes = dict[str, torch.Tensor]

# faster_coco_eval logs COCO's whole summary table at INFO on every evaluation, which Ray's
# workers forward; raycv reports the numbers itself.
logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)


class DetectionEvaluator:
    """Training passes give loss parts only (torchvision's detectors return no detections in
    training mode): the running mean of their sum is ``<prefix>_loss``. Evaluation passes give
    detections: ``<prefix>_map`` (mAP@[.5:.95]), ``_map50``, ``_map75`` and ``_ap/<class>``."""

    def __init__(self, task: Detection) -> None:
        self.task = task
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros(2, dtype=torch.float64)  # sum of batch losses, batches
        self.predictions: list[Boxes] = []
        self.truths: list[Boxes] = []
        self.scores: dict[str, float] | None = None

    def process(self, batch: dict[str, torch.Tensor], outputs: Any, losses: dict) -> None:
        if losses:
            self.loss += torch.tensor([sum(v.detach() for v in losses.values()).item(), 1.0])
        if isinstance(outputs, list):  # detections, one dict per image
            self.predictions += [_cpu(d, ("boxes", "scores", "labels")) for d in outputs]
            self.truths += [_cpu(t, ("boxes", "labels", "iscrowd")) for t in self.task.truth(batch)]

    def sync(self, device: torch.device) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            self.scores = self._compute(self.predictions, self.truths)
            return
        loss = self.loss.to(device)
        dist.all_reduce(loss)
        self.loss = loss.cpu()
        if not self._anyone_has_predictions(device):
            return  # a training pass: no detections anywhere, nothing to gather
        rank = dist.get_rank()
        gathered = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object((self.predictions, self.truths), gathered, dst=0)
        result = [None]
        if rank == 0:
            predictions = [p for preds, _ in gathered for p in preds]
            truths = [t for _, truth in gathered for t in truth]
            result = [self._compute(predictions, truths)]
        dist.broadcast_object_list(result, src=0)
        self.scores = result[0]

    def _anyone_has_predictions(self, device: torch.device) -> bool:
        count = torch.tensor([len(self.predictions)], device=device)
        dist.all_reduce(count)
        return bool(count.item())

    def _compute(self, predictions: list[Boxes], truths: list[Boxes]) -> dict[str, float] | None:
        if not truths:
            return None
        return coco_map(predictions, truths, self.task.class_names)[0]

    def evaluate(self, prefix: str) -> dict[str, float]:
        out = {}
        if self.loss[1] > 0:
            out[f"{prefix}_loss"] = (self.loss[0] / self.loss[1]).item()
        if self.scores is None and self.predictions:  # one process that did not sync
            self.scores = self._compute(self.predictions, self.truths)
        for key, value in (self.scores or {}).items():
            out[f"{prefix}_{key}"] = value
        return out


def _cpu(boxes: dict[str, torch.Tensor], keys: tuple[str, ...]) -> Boxes:
    return {k: boxes[k].detach().cpu() for k in keys if k in boxes}


def coco_map(
    predictions: list[Boxes], truths: list[Boxes], class_names: list[str], curves: bool = False
) -> tuple[dict[str, float], dict[str, Any]]:
    """COCO's box mAP of one process's detections against their truths: ``map``, ``map50``,
    ``map75``, ``ap/<class>`` (NaN where COCO has nothing to score), and torchmetrics' raw
    result (with ``curves``, its precision array: IoU x recall x class x area x max dets)."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        class_metrics=True,
        extended_summary=curves,
        backend="faster_coco_eval",
        sync_on_compute=False,  # the data is already all here, on rank 0 alone
    )
    metric.update(predictions, truths)
    found = metric.compute()
    scores = {"map": found["map"], "map50": found["map_50"], "map75": found["map_75"]}
    classes = found["classes"].reshape(-1).tolist()
    per_class = found["map_per_class"].reshape(-1).tolist()
    for cls, ap in zip(classes, per_class):
        scores[f"ap/{class_names[int(cls)]}"] = ap
    # COCO marks "no ground truth to score" with -1: no number rather than a wrong one.
    return {k: math.nan if float(v) < 0 else float(v) for k, v in scores.items()}, found
