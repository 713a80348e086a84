"""The dense outputs of torchvision's one-stage detectors (SSD, SSDlite, RetinaNet, FCOS):
every anchor's decoded box and class scores before the score threshold and NMS, as one
tensor that exports to ONNX and TorchScript (the registry's ``DenseOutput``).

Written here because torchvision has no such output: its ``forward`` ends in per-image
Python loops and NMS, whose output sizes depend on the scores, and ``model.transform``
loops over the images of a batch (an export would fix the batch size). These functions
take the same steps batched, from the model's own parts: its transform's normalisation,
resize and padding, ``backbone``, ``head``, ``anchor_generator`` and ``box_coder``; boxes
come back in the input's pixels as torchvision's ``postprocess`` maps them.

The detections torchvision itself makes keep the best ``topk_candidates`` per class (SSD)
or per feature level (RetinaNet, FCOS) before NMS. A dense output has no such groups left,
so its card takes the best ``topk_candidates`` x groups over the whole image: a superset of
torchvision's candidates, the same detections except where a group has more than
``topk_candidates`` scores above the threshold and an extra one survives NMS into the top
``max_detections``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raycv.models.registry import DenseOutput

Scores = Callable[[dict[str, Tensor]], Tensor]  # the head's outputs -> (B, A, C) in [0, 1]


def dense_rows(model: nn.Module, images: Tensor, scores: Scores) -> Tensor:
    """(B, A, 4 + C): each anchor's box in ``images``' pixels, then its class scores."""
    # Imported here, as everywhere in raycv.models: torchvision.ops imports torch._dynamo
    # (1.2 s), and every command's driver imports this registry to validate its config.
    from torchvision.models.detection.image_list import ImageList
    from torchvision.ops import clip_boxes_to_image

    height, width = images.shape[-2:]
    x = _transformed(model.transform, images)
    rows, cols = x.shape[-2:]  # resized, before padding: where torchvision clips boxes
    x = F.pad(
        x, (0, -cols % model.transform.size_divisible, 0, -rows % model.transform.size_divisible)
    )
    features = model.backbone(x)
    features = [features] if isinstance(features, Tensor) else list(features.values())
    head = model.head(features)
    # The anchors are the same for every image of the batch: one image's, repeated.
    anchors = model.anchor_generator(ImageList(x[:1], [(rows, cols)]), [f[:1] for f in features])
    batch, count = head["bbox_regression"].shape[:2]
    boxes = _decode(model.box_coder, head["bbox_regression"].reshape(-1, 4), anchors[0], batch)
    boxes = clip_boxes_to_image(boxes.reshape(batch, count, 4), (rows, cols))
    back = boxes.new_tensor([width / cols, height / rows] * 2)  # torchvision's resize_boxes
    return torch.cat([boxes * back, scores(head)], -1)


def _transformed(transform: nn.Module, images: Tensor) -> Tensor:
    """``GeneralizedRCNNTransform``'s normalisation and resize, for the whole batch."""
    mean = images.new_tensor(transform.image_mean).view(1, 3, 1, 1)
    std = images.new_tensor(transform.image_std).view(1, 3, 1, 1)
    x = (images - mean) / std
    if transform.fixed_size is not None:  # SSD: always its own size, (width, height)
        size = [transform.fixed_size[1], transform.fixed_size[0]]
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    sides = images.shape[-2:]
    scale = min(transform.min_size[-1] / min(sides), transform.max_size / max(sides))
    if scale == 1.0:  # raycv's detectors at their training size (models/detection.py)
        return x
    return F.interpolate(
        x, scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
    )


def _decode(coder: Any, codes: Tensor, anchors: Tensor, batch: int) -> Tensor:
    anchors = anchors.repeat(batch, 1)
    # BoxCoder (SSD, RetinaNet) decodes one image's codes with decode_single; FCOS's
    # BoxLinearCoder has decode only, for the same (N, 4) pairs.
    decode = getattr(coder, "decode_single", None) or coder.decode
    return decode(codes, anchors)


def _softmax_without_background(head: dict[str, Tensor]) -> Tensor:
    return head["cls_logits"].softmax(-1)[..., 1:]


def _sigmoid(head: dict[str, Tensor]) -> Tensor:
    return head["cls_logits"].sigmoid()


def _centred_sigmoid(head: dict[str, Tensor]) -> Tensor:
    # FCOS ranks by the geometric mean of the class score and the centre-ness
    return (head["cls_logits"].sigmoid() * head["bbox_ctrness"].sigmoid()).sqrt()


def _settings(model: nn.Module, groups: Callable[[nn.Module], int], per: str) -> dict:
    n = groups(model)
    return {
        "score_threshold": model.score_thresh,
        "pre_nms_top_k": model.topk_candidates * n,
        "nms": "per class, torchvision.ops.batched_nms",
        "nms_iou": model.nms_thresh,
        "max_detections": model.detections_per_img,
        "top_k": f"torchvision keeps the best {model.topk_candidates} per {per} ({n} in all) "
        f"before NMS; the best {model.topk_candidates * n} of the image are a superset",
    }


def _ssd_classes(model: nn.Module) -> int:
    return model.head.classification_head.num_columns - 1  # class 0 is background


def _levels(model: nn.Module) -> int:
    return len(model.anchor_generator.sizes)


def _dense(scores: Scores, groups: Callable[[nn.Module], int], per: str) -> DenseOutput:
    # partials, not lambdas: a registry entry stays picklable
    return DenseOutput(
        partial(dense_rows, scores=scores), partial(_settings, groups=groups, per=per)
    )


SSD = _dense(_softmax_without_background, _ssd_classes, "class")
RETINANET = _dense(_sigmoid, _levels, "feature level")
FCOS = _dense(_centred_sigmoid, _levels, "feature level")
