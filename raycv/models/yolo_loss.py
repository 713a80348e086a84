"""Training targets and losses of the ``yolo`` detectors (``raycv/models/yolo.py``).

Assignment is task-aligned (the TOOD paper's idea, also used by YOLOv8): an anchor point is
a candidate for a ground-truth box when its centre lies inside the box; each candidate gets
an alignment ``score ** alpha * iou ** beta`` from the model's own current prediction (the
sigmoid score of the box's class and the IoU of the predicted box with it), and the
``top_k`` best-aligned candidates of every box become its positives. An anchor claimed by
several boxes keeps the one its prediction overlaps most. Because the targets follow the
predictions, classification and localisation are pushed towards the same anchors, which
is what lets the scores rank boxes well for NMS and mAP.

Losses:

* ``loss_cls``: binary cross-entropy on every anchor and class. A positive's target is not
  1 but its alignment rescaled so that each box's best anchor gets that anchor's IoU: a
  score that predicts box quality (IoU-aware), so a well-placed box outranks a poor one.
* ``loss_box``: GIoU loss (``torchvision.ops.generalized_box_iou_loss``) on the positives,
  weighted by the same soft targets.

Both are divided by the summed soft targets of the batch, clamped to at least 1 so that an
image with few (or no) boxes does not blow the loss up. Everything is vectorised over the
batch by padding each image's boxes to the batch's largest count (``valid`` marks real ones).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-9


class Padded(NamedTuple):
    """A batch's boxes (B, G, 4) xyxy, labels (B, G) and the mask of real rows (B, G)."""

    boxes: Tensor
    labels: Tensor
    valid: Tensor


class Assignment(NamedTuple):
    """Per anchor (B, A): whether it is positive, its box (B, A, 4) and its soft
    classification target (B, A, C); all zero on negatives."""

    positive: Tensor
    boxes: Tensor
    scores: Tensor


def pad_targets(targets: list[dict[str, Tensor]], device: torch.device) -> Padded:
    """Each image's boxes padded to the batch's largest count; at least one row, so a batch
    of background images keeps the same tensor shapes (all rows invalid)."""
    rows = max(1, max(len(t["labels"]) for t in targets))
    boxes = torch.zeros(len(targets), rows, 4, device=device)
    labels = torch.zeros(len(targets), rows, dtype=torch.long, device=device)
    valid = torch.zeros(len(targets), rows, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        k = len(t["labels"])
        boxes[i, :k] = t["boxes"].to(device, torch.float32)
        labels[i, :k] = t["labels"].to(device)
        valid[i, :k] = True
    return Padded(boxes, labels, valid)


def pairwise_iou(gt: Tensor, pred: Tensor) -> Tensor:
    """IoU of every box in ``gt`` (B, G, 4) with every box in ``pred`` (B, A, 4): (B, G, A).
    torchvision's ``box_iou`` takes one image at a time; broadcasting does the batch."""
    a, b = gt[:, :, None], pred[:, None]
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter + EPS)


def centres_inside(anchors: Tensor, gt: Tensor) -> Tensor:
    """(B, G, A): anchor point (A, 2) strictly inside box (B, G, 4)."""
    lt = anchors[None, None] - gt[:, :, None, :2]
    rb = gt[:, :, None, 2:] - anchors[None, None]
    return torch.cat([lt, rb], -1).amin(-1) > EPS


@torch.no_grad()
def task_aligned_assign(
    scores: Tensor,
    pred_boxes: Tensor,
    anchors: Tensor,
    gt: Padded,
    top_k: int = 10,
    alpha: float = 1.0,
    beta: float = 6.0,
) -> Assignment:
    """Targets for sigmoid ``scores`` (B, A, C) and ``pred_boxes`` (B, A, 4) at ``anchors``
    (A, 2). No gradient: the targets are labels, not part of the model's output."""
    iou = pairwise_iou(gt.boxes, pred_boxes)  # (B, G, A)
    class_score = scores.transpose(1, 2).gather(1, _per_anchor(gt.labels, scores.shape[1]))
    candidate = centres_inside(anchors, gt.boxes) & gt.valid[..., None]
    align = class_score.pow(alpha) * iou.pow(beta) * candidate
    # top-k over every anchor, then kept only where a candidate: boxes with fewer than k
    # anchors inside would otherwise take some from outside.
    best = align.topk(min(top_k, align.shape[-1]), dim=-1).indices
    chosen = torch.zeros_like(candidate).scatter_(-1, best, True) & candidate
    # An anchor chosen by several boxes keeps the one its prediction overlaps most.
    owner = torch.where(chosen, iou, -1.0).argmax(1)  # (B, A)
    positive = chosen.any(1)
    mask = F.one_hot(owner, gt.boxes.shape[1]).transpose(1, 2).bool() & positive[:, None]
    return _targets(gt, owner, positive, align * mask, iou * mask, scores.shape[-1])


def _per_anchor(labels: Tensor, anchors: int) -> Tensor:
    """Gather index (B, G, A) that picks each box's class score at every anchor."""
    return labels[..., None].expand(-1, -1, anchors)


def _targets(
    gt: Padded, owner: Tensor, positive: Tensor, align: Tensor, iou: Tensor, classes: int
) -> Assignment:
    """Box and soft class targets of every anchor from its owning box. The alignment is
    rescaled per box so that its best anchor's target is the best IoU any of its anchors
    reached: absolute alignments (IoU ** 6) are tiny early in training and would make every
    target near zero."""
    scale = iou.amax(-1, keepdim=True) / (align.amax(-1, keepdim=True) + EPS)
    soft = (align * scale).amax(1)  # (B, A); zero on negatives
    boxes = gt.boxes.gather(1, owner[..., None].expand(-1, -1, 4))
    labels = gt.labels.gather(1, owner)
    scores = F.one_hot(labels, classes).float() * soft[..., None]
    return Assignment(positive, boxes * positive[..., None], scores)


def detection_losses(
    logits: Tensor,
    pred_boxes: Tensor,
    anchors: Tensor,
    targets: list[dict[str, Tensor]],
    box_weight: float = 2.0,
    **assign_options,
) -> dict[str, Tensor]:
    """``loss_cls`` and ``loss_box`` of class ``logits`` (B, A, C) and decoded
    ``pred_boxes`` (B, A, 4) xyxy pixels at anchor points ``anchors`` (A, 2)."""
    from torchvision.ops import generalized_box_iou_loss  # see detection_dense.dense_rows

    # float32 under autocast too: IoUs and the loss normaliser need the precision.
    logits, pred_boxes = logits.float(), pred_boxes.float()
    gt = pad_targets(targets, logits.device)
    t = task_aligned_assign(
        logits.detach().sigmoid(), pred_boxes.detach(), anchors, gt, **assign_options
    )
    weight = t.scores.sum(-1)  # (B, A): the soft target of each positive
    norm = weight.sum().clamp(min=1.0)
    cls = F.binary_cross_entropy_with_logits(logits, t.scores, reduction="sum") / norm
    fg = t.positive
    giou = generalized_box_iou_loss(pred_boxes[fg], t.boxes[fg], reduction="none")
    # The zero term keeps every box output in the graph when no anchor is positive (a batch
    # of background images, or a level without positives): DDP needs a gradient for every
    # parameter in every step.
    box = (giou * weight[fg]).sum() / norm + 0.0 * pred_boxes.sum()
    return {"loss_cls": cls, "loss_box": box_weight * box}
