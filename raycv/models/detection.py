"""Detection models: torchvision's detectors, built without downloading anything (no COCO
weights and no ImageNet backbone unless asked for by name).

raycv hands every model ImageNet-normalised images (``raycv.data.augment.normalize``) at
``model.image_size``; a detector's own input transform is therefore told to leave them as
they are (mean 0, std 1) and, where it resizes, to keep them at that size (``min_size =
max_size = image_size``).
SSD models resize to their fixed size themselves (300 or 320 px) and map boxes back."""

from __future__ import annotations

from typing import Any

from torch import nn

from raycv.models import detection_dense
from raycv.models.registry import MODELS, ModelSpec

UNNORMALISED = {"image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0]}


def torchvision_detector(
    spec: ModelSpec, num_classes: int, encoder: str | None, **kwargs: Any
) -> nn.Module:
    """``spec.builder`` for ``num_classes`` object classes (one more where the model reserves
    class 0 for background)."""
    import torchvision

    classes = num_classes + int(spec.background_class)
    return torchvision.models.get_model(
        spec.builder, weights=None, weights_backbone=None, num_classes=classes, **kwargs
    )


def _resized_at(weights: str | None, image_size: int | None) -> dict[str, Any]:
    """The two-stage and dense detectors: inputs kept at the training size."""
    size = image_size or 320
    return {**UNNORMALISED, "min_size": size, "max_size": size}


def _fixed_size(weights: str | None, image_size: int | None) -> dict[str, Any]:
    return dict(UNNORMALISED)


# The layers that depend on the class count: what fine-tuning from COCO weights leaves fresh.
_BOX_PREDICTOR = ("roi_heads.box_predictor",)  # Faster R-CNN: class scores, per-class boxes
_CLASS_LOGITS = ("head.classification_head.cls_logits",)  # RetinaNet, FCOS
_SSD_CLASSES = ("head.classification_head",)  # SSD: one conv per feature map
_SSD, _RETINANET, _FCOS = detection_dense.SSD, detection_dense.RETINANET, detection_dense.FCOS
# name, background class 0, smallest input, options, heads, dense rows (None: two-stage,
# exported with its NMS inside).
# The smallest inputs keep the coarsest feature map at least one cell (stride 32 or 64 with
# an extra FPN level).
for _name, _background, _min_size, _options, _heads, _dense in (
    ("fasterrcnn_mobilenet_v3_large_320_fpn", True, 64, _resized_at, _BOX_PREDICTOR, None),
    ("fasterrcnn_mobilenet_v3_large_fpn", True, 64, _resized_at, _BOX_PREDICTOR, None),
    ("fasterrcnn_resnet50_fpn_v2", True, 64, _resized_at, _BOX_PREDICTOR, None),
    ("retinanet_resnet50_fpn_v2", False, 128, _resized_at, _CLASS_LOGITS, _RETINANET),
    ("fcos_resnet50_fpn", False, 128, _resized_at, _CLASS_LOGITS, _FCOS),
    ("ssd300_vgg16", True, 32, _fixed_size, _SSD_CLASSES, _SSD),
    ("ssdlite320_mobilenet_v3_large", True, 32, _fixed_size, _SSD_CLASSES, _SSD),
):
    MODELS.add(
        _name,
        ModelSpec(
            builder=_name,
            heads=_heads,
            built_heads=True,
            task="detection",
            min_size=_min_size,
            options=_options,
            build=torchvision_detector,
            background_class=_background,
            dense=_dense,
            channel_prunable=False,
            dynamic_sides=False,
            quantizable=False,
        ),
    )
