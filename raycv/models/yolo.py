"""``yolo_n`` and ``yolo_s``: a compact anchor-free one-stage detector in the YOLOX / YOLOv8
style, written here on torchvision parts (no Ultralytics code or dependency).

* **Backbone**: a classifier from raycv's own registry (``model.encoder``, default
  ``resnet18``), built without weights, cut by torchvision's ``create_feature_extractor``
  at the last layer of each of strides 8, 16 and 32 (``RETURN_NODES``). Its state-dict
  keys stay the classifier's under ``backbone.``, so a raycv classification run can fill it.
* **Neck**: a PAN-FPN. 1x1 convs bring the three maps to one width; a top-down pass
  (upsample, concatenate, CSP block) carries the coarse maps' semantics to the fine ones, a
  bottom-up pass (strided conv, concatenate, CSP block) carries the fine maps' localisation
  back up. A CSP block sends half its channels through ``depth`` residual bottlenecks and
  the other half around them, which keeps it cheap and its gradient paths short.
* **Head**: decoupled, one per level: two 3x3 convs then a 1x1 conv for the class logits
  (``head.cls_out.<level>``, the registry's ``heads``), two more then a 1x1 conv for four
  distances (left, top, right, bottom) from the anchor point to the box sides, in strides
  (softplus keeps them positive). Anchor-free: one anchor point per cell centre.
* **Training**: task-aligned assignment, BCE with IoU-aware soft targets and GIoU loss
  (``raycv/models/yolo_loss.py``).
* **Inference**: sigmoid scores, a low score threshold (mAP wants the long tail), the best
  ``pre_nms_top_k`` (anchor, class) pairs, ``torchvision.ops.batched_nms`` per class, at
  most ``max_detections`` per image.

The widths (``WIDTHS``) differ in the neck's and head's channels and the bottlenecks per CSP
block: ``yolo_n`` 64 channels and 1 bottleneck, ``yolo_s`` 128 channels and 2.

Inputs are what raycv hands every detector: a list of ImageNet-normalised (3, S, S)
tensors of one size, a multiple of 32 (rectangles work too, each side a multiple of 32); the
model stacks them and neither normalises nor resizes. Boxes are xyxy pixels of that input,
class ids from 0 (no background class).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raycv.models.registry import MODELS, Backbone, DenseOutput, ModelSpec
from raycv.models.yolo_loss import detection_losses

STRIDES = (8, 16, 32)
# The last layer at stride 8, 16 and 32 of each supported classifier (torchvision names).
RETURN_NODES = {
    "resnet18": ("layer2", "layer3", "layer4"),
    "resnet34": ("layer2", "layer3", "layer4"),
    "resnet50": ("layer2", "layer3", "layer4"),
    "mobilenet_v3_large": ("features.6", "features.12", "features.16"),
    "mobilenet_v3_small": ("features.3", "features.8", "features.12"),
}
# name: neck and head channels, residual bottlenecks per CSP block.
WIDTHS = {"yolo_n": {"width": 64, "depth": 1}, "yolo_s": {"width": 128, "depth": 2}}
# Focal-loss-style prior: every class starts at this probability, so the many negative
# anchors do not swamp the first steps with a huge loss.
PRIOR_PROBABILITY = 0.01


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.SiLU(inplace=True),
        )


class Bottleneck(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(ConvBN(channels, channels, 3), ConvBN(channels, channels, 3))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.convs(x)


class CSPBlock(nn.Module):
    """Cross-stage partial block: half the channels through the bottlenecks, half around."""

    def __init__(self, cin: int, cout: int, depth: int) -> None:
        super().__init__()
        half = cout // 2
        self.main = nn.Sequential(ConvBN(cin, half), *(Bottleneck(half) for _ in range(depth)))
        self.bypass = ConvBN(cin, half)
        self.merge = ConvBN(2 * half, cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.merge(torch.cat([self.main(x), self.bypass(x)], 1))


class PAN(nn.Module):
    """Top-down then bottom-up fusion of the stride 8/16/32 maps, all at ``width``."""

    def __init__(self, in_channels: tuple[int, ...], width: int, depth: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(ConvBN(c, width) for c in in_channels)
        self.top_down = nn.ModuleList(CSPBlock(2 * width, width, depth) for _ in range(2))
        self.down = nn.ModuleList(ConvBN(width, width, 3, stride=2) for _ in range(2))
        self.bottom_up = nn.ModuleList(CSPBlock(2 * width, width, depth) for _ in range(2))

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        c3, c4, c5 = (lateral(f) for lateral, f in zip(self.lateral, feats))
        p4 = self.top_down[0](torch.cat([_up(c5), c4], 1))
        p3 = self.top_down[1](torch.cat([_up(p4), c3], 1))
        n4 = self.bottom_up[0](torch.cat([self.down[0](p3), p4], 1))
        n5 = self.bottom_up[1](torch.cat([self.down[1](n4), c5], 1))
        return [p3, n4, n5]


def _up(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class DecoupledHead(nn.Module):
    """Separate class and box branches per level: the two tasks want different features
    (YOLOX found the shared head converges slower)."""

    def __init__(self, width: int, num_classes: int, levels: int = len(STRIDES)) -> None:
        super().__init__()

        def branch() -> nn.Sequential:
            return nn.Sequential(ConvBN(width, width, 3), ConvBN(width, width, 3))

        self.cls_convs = nn.ModuleList(branch() for _ in range(levels))
        self.box_convs = nn.ModuleList(branch() for _ in range(levels))
        self.cls_out = nn.ModuleList(nn.Conv2d(width, num_classes, 1) for _ in range(levels))
        self.box_out = nn.ModuleList(nn.Conv2d(width, 4, 1) for _ in range(levels))
        for conv in (*self.cls_out, *self.box_out):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        # The prior enters as a constant added to the logits, not as the conv's bias: it
        # survives ``replace_heads`` swapping in a fresh conv for another class count, and
        # weight decay cannot pull it back towards probability 0.5.
        self.prior_logit = -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Class logits (B, A, C) and raw box outputs (B, A, 4), levels fine to coarse."""
        logits, boxes = [], []
        for i, f in enumerate(feats):
            logits.append(_flat(self.cls_out[i](self.cls_convs[i](f))) + self.prior_logit)
            boxes.append(_flat(self.box_out[i](self.box_convs[i](f))))
        return torch.cat(logits, 1), torch.cat(boxes, 1)


def _flat(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H * W, C), row-major like ``anchor_points``."""
    return x.flatten(2).transpose(1, 2)


def anchor_points(height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Cell centres (A, 2) in pixels of a ``height`` x ``width`` input, and their stride
    (A, 1). Rebuilt on every call (a few hundred microseconds): no state between calls."""
    points, strides = [], []
    for s in STRIDES:
        ys = (torch.arange(height // s, device=device, dtype=torch.float32) + 0.5) * s
        xs = (torch.arange(width // s, device=device, dtype=torch.float32) + 0.5) * s
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([x.flatten(), y.flatten()], 1))
        strides.append(torch.full((x.numel(), 1), float(s), device=device))
    return torch.cat(points), torch.cat(strides)


def decode(raw: Tensor, points: Tensor, strides: Tensor) -> Tensor:
    """Raw box outputs (B, A, 4) -> xyxy pixels: positive distances from the anchor point."""
    dist = F.softplus(raw) * strides
    return torch.cat([points - dist[..., :2], points + dist[..., 2:]], -1)


class YOLO(nn.Module):
    """Backbone, neck and head; ``model(images, targets)`` gives the losses in training mode,
    ``model(images)`` the detections in evaluation mode (torchvision's detector contract)."""

    def __init__(
        self,
        backbone: nn.Module,
        in_channels: tuple[int, ...],
        num_classes: int,
        width: int,
        depth: int,
        score_threshold: float = 0.01,
        nms_iou: float = 0.6,
        pre_nms_top_k: int = 1000,
        max_detections: int = 100,
        assign: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = PAN(in_channels, width, depth)
        self.head = DecoupledHead(width, num_classes)
        self.score_threshold, self.nms_iou = score_threshold, nms_iou
        self.pre_nms_top_k, self.max_detections = pre_nms_top_k, max_detections
        self.assign = dict(assign or {})  # options of task_aligned_assign (top_k, alpha, beta)

    def forward(
        self, images: list[Tensor] | Tensor, targets: list[dict[str, Tensor]] | None = None
    ):
        x = torch.stack(list(images)) if not isinstance(images, Tensor) else images
        logits, boxes, points = self._predict(x)
        if self.training:
            if targets is None:
                raise ValueError("yolo in training mode needs targets: model(images, targets)")
            return detection_losses(logits, boxes, points, targets, **self.assign)
        dense = self._dense(logits, boxes, x.shape[-2:])
        return self.detections(dense[..., 4:], dense[..., :4])

    def dense(self, x: Tensor) -> Tensor:
        """Every anchor point's prediction before the score threshold and NMS, (B, A, 4 + C):
        its box (x1, y1, x2, y2 in input pixels, clipped) and its class probabilities. One
        tensor that exports to ONNX and that torch-pruning traces (the registry's ``dense``)."""
        logits, boxes, _ = self._predict(x)
        return self._dense(logits, boxes, x.shape[-2:])

    def _predict(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Class logits (B, A, C), decoded boxes (B, A, 4) and the anchor points (A, 2)."""
        height, width = x.shape[-2:]
        if height % STRIDES[-1] or width % STRIDES[-1]:  # else the levels' grids disagree
            raise ValueError(f"yolo needs image sides divisible by 32, got {height} x {width}")
        logits, raw = self.head(self.neck(list(self.backbone(x).values())))
        points, strides = anchor_points(height, width, x.device)
        return logits, decode(raw, points, strides), points

    @staticmethod
    def _dense(logits: Tensor, boxes: Tensor, sides: tuple[int, int]) -> Tensor:
        from torchvision.ops import clip_boxes_to_image  # see detection_dense.dense_rows

        boxes = clip_boxes_to_image(boxes.float(), tuple(sides))  # float: NMS under autocast
        return torch.cat([boxes, logits.float().sigmoid()], -1)

    @torch.no_grad()
    def detections(self, scores: Tensor, boxes: Tensor) -> list[dict[str, Tensor]]:
        """Per image: the (anchor, class) pairs above the threshold, best ``pre_nms_top_k``,
        non-maximum suppression per class, best ``max_detections``."""
        from torchvision.ops import batched_nms  # see detection_dense.dense_rows

        out = []
        for s, b in zip(scores, boxes):
            flat = s.flatten()  # anchor-major: index = anchor * C + class
            keep = (flat > self.score_threshold).nonzero().squeeze(1)
            top = flat[keep].topk(min(self.pre_nms_top_k, len(keep)))
            idx = keep[top.indices]
            anchor, label = idx // s.shape[1], idx % s.shape[1]
            kept = batched_nms(b[anchor], top.values, label, self.nms_iou)[: self.max_detections]
            out.append(
                {"boxes": b[anchor[kept]], "scores": top.values[kept], "labels": label[kept]}
            )
        return out


def feature_backbone(encoder: str, weights: str | None = None) -> tuple[nn.Module, tuple[int, ...]]:
    """``encoder`` from raycv's registry, with torchvision's ``weights`` for it (ImageNet:
    what lets a detector learn from a few hundred photos) or random ones, cut at strides 8,
    16 and 32; and the channels of those maps (from one small forward pass, in evaluation
    mode so that BatchNorm's running statistics stay untouched)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    from raycv.models.registry import create_model

    if encoder not in RETURN_NODES:
        raise ValueError(
            f"model.encoder={encoder!r} is not a yolo backbone; choose one of: "
            f"{', '.join(RETURN_NODES)}"
        )
    classifier = create_model(encoder, num_classes=1, weights=weights)  # the head is cut off
    nodes = {node: f"p{i + 3}" for i, node in enumerate(RETURN_NODES[encoder])}
    backbone = create_feature_extractor(classifier, nodes)
    with torch.no_grad():
        maps = backbone.eval()(torch.zeros(1, 3, 64, 64)).values()
    backbone.train()
    sides = [m.shape[-1] for m in maps]
    assert sides == [64 // s for s in STRIDES], f"{encoder} strides: {sides}"  # table check
    return backbone, tuple(m.shape[1] for m in maps)


def _postprocess(model: YOLO) -> dict[str, Any]:
    return {
        "score_threshold": model.score_threshold,
        "pre_nms_top_k": model.pre_nms_top_k,
        "nms": "per class, torchvision.ops.batched_nms",
        "nms_iou": model.nms_iou,
        "max_detections": model.max_detections,
    }


def build_yolo(
    spec: ModelSpec, num_classes: int, encoder: str | None, weights: str | None = None, **kwargs
) -> YOLO:
    backbone, channels = feature_backbone(encoder or "resnet18", weights)
    return YOLO(backbone, channels, num_classes, **kwargs)


for _name, _width in WIDTHS.items():
    MODELS.add(
        _name,
        ModelSpec(
            builder=_name,
            heads=tuple(f"head.cls_out.{i}" for i in range(len(STRIDES))),
            task="detection",
            min_size=32,  # the stride-32 map is then one cell
            patch=32,
            kwargs=_width,
            dense=DenseOutput(YOLO.dense, _postprocess),
            prune_keep=tuple(f"head.box_out.{i}" for i in range(len(STRIDES))),
            dynamic_sides=False,
            quantizable=False,
            encoder="resnet18",
            encoders=lambda: list(RETURN_NODES),
            encoder_weights=True,
            build=build_yolo,
            backbone=Backbone(None, target_prefix="backbone."),
            background_class=False,
        ),
    )
