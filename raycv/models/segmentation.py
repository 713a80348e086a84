"""Segmentation models: segmentation-models-pytorch architectures (any of its encoders,
``model.encoder``) and torchvision's segmenters. Both are built without downloading:
smp encoders start random (or from a raycv classification run, finetune.source), and
torchvision's ImageNet backbone weights are only fetched when asked for by name."""

from __future__ import annotations

import torch
from torch import nn

from raycv.models.registry import MODELS, Backbone, ModelSpec

# torchvision's references/segmentation weigh the auxiliary FCN head's loss by 0.5.
TORCHVISION_AUX_WEIGHT = 0.5


def smp_model(spec: ModelSpec, num_classes: int, encoder: str, **kwargs) -> nn.Module:
    import segmentation_models_pytorch as smp

    model = smp.create_model(
        spec.builder, encoder_name=encoder, encoder_weights=None, classes=num_classes, **kwargs
    )
    return without_unused_modules(model, spec.patch or 32)


def without_unused_modules(model: nn.Module, size: int) -> nn.Module:
    """``model`` with the sub-modules its forward never calls replaced by ``nn.Identity``.
    An encoder shallower than its backbone (PSPNet reads 3 of ResNet's 5 stages) keeps the
    deeper stages' parameters; DDP would wait forever for their gradients, and they would
    count as parameters, MACs and checkpoint bytes."""
    called: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda m, _: called.add(id(m))) for m in model.modules()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            used = any(id(m) in called for m in child.modules())  # a ModuleList is iterated
            if not used and any(True for _ in child.parameters()):
                setattr(parent, attr, nn.Identity())
    return model.train()


def smp_encoders() -> list[str]:
    import segmentation_models_pytorch as smp

    return sorted(smp.encoders.get_encoder_names())


# The side must divide by the encoder's total stride (smp checks it in forward).
# Global pooling inside a BatchNorm block (ASPP, the pyramid pooling module) needs at least
# two images per worker in training.
# PSPNet's pyramid pools to 2, 3 and 6 cells: the ONNX exporter turns those adaptive pools
# into gathers fixed at the traced size, so onnxruntime fails on any other one; it is
# exported at its training size only.
for _name, _arch, _stride, _min_batch, _dynamic in (
    ("unet", "unet", 32, 1, True),
    ("pspnet", "pspnet", 8, 2, False),
    ("deeplabv3plus", "deeplabv3plus", 16, 2, True),
):
    MODELS.add(
        _name,
        ModelSpec(
            _arch,
            heads=("segmentation_head.0",),
            task="segmentation",
            patch=_stride,
            min_batch=_min_batch,
            dynamic_sides=_dynamic,
            encoder="resnet18",
            encoders=smp_encoders,
            build=smp_model,
            backbone=Backbone(None),
        ),
    )

_WITH_AUX = {"aux_loss": True, "weights_backbone": None}
_RESNET50 = Backbone("resnet50", "", "backbone.")
# torchvision's MobileNet classifier keeps its trunk under features., the segmenter under backbone.
_MOBILENET = Backbone("mobilenet_v3_large", "features.", "backbone.")
for _name, _min_batch, _backbone in (
    ("deeplabv3_resnet50", 2, _RESNET50),
    ("deeplabv3_mobilenet_v3_large", 2, _MOBILENET),
):
    MODELS.add(
        _name,
        ModelSpec(
            _name,
            heads=("classifier.4", "aux_classifier.4"),
            task="segmentation",
            kwargs=_WITH_AUX,
            aux_weight=TORCHVISION_AUX_WEIGHT,
            min_batch=_min_batch,
            backbone=_backbone,
        ),
    )
MODELS.add(
    "fcn_resnet50",
    ModelSpec(
        "fcn_resnet50",
        heads=("classifier.4", "aux_classifier.4"),
        task="segmentation",
        kwargs=_WITH_AUX,
        aux_weight=TORCHVISION_AUX_WEIGHT,
        backbone=_RESNET50,
    ),
)
MODELS.add(
    "lraspp_mobilenet_v3_large",
    ModelSpec(
        "lraspp_mobilenet_v3_large",
        heads=("classifier.low_classifier", "classifier.high_classifier"),
        task="segmentation",
        kwargs={"weights_backbone": None},
        backbone=_MOBILENET,
    ),
)
