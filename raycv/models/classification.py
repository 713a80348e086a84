"""torchvision classifiers."""

from __future__ import annotations

from typing import Any

from torch import nn

from raycv.models.registry import MODELS, ModelSpec

# Inception's stem needs 75 px; its auxiliary head needs a 17x17 map, i.e. 299 px inputs.
INCEPTION_AUX_MIN_SIZE = 299


def _inception_options(weights: str | None, image_size: int | None) -> dict[str, Any]:
    # Pretrained weights include the auxiliary head; smaller inputs cannot feed it.
    return {"aux_logits": weights is not None or (image_size or 0) >= INCEPTION_AUX_MIN_SIZE}


def _inception_adapt(model: nn.Module, image_size: int | None) -> None:
    if (image_size or 0) < INCEPTION_AUX_MIN_SIZE:  # the weights' aux head cannot run
        model.aux_logits, model.AuxLogits = False, None


for _name in ("resnet18", "resnet34", "resnet50"):
    MODELS.add(_name, ModelSpec(_name, heads=("fc",)))
for _name in ("vgg11_bn", "vgg16_bn"):
    MODELS.add(_name, ModelSpec(_name, heads=("classifier.6",)))
for _name in ("mobilenet_v3_small", "mobilenet_v3_large"):
    MODELS.add(_name, ModelSpec(_name, heads=("classifier.3",)))
MODELS.add("efficientnet_b0", ModelSpec("efficientnet_b0", heads=("classifier.1",)))
MODELS.add("convnext_tiny", ModelSpec("convnext_tiny", heads=("classifier.2",)))
MODELS.add(
    "inception_v3",
    ModelSpec(
        "inception_v3",
        heads=("fc", "AuxLogits.fc"),
        min_size=75,
        kwargs={"init_weights": False},
        options=_inception_options,
        adapt=_inception_adapt,
    ),
)
# torchvision's VisionTransformer reshapes its patches with a fixed ``hidden_dim`` and
# splits attention heads by the embedding width: removing embedding channels breaks it.
MODELS.add(
    "vit_b_16",
    ModelSpec(
        "vit_b_16",
        heads=("heads.head",),
        min_size=16,
        patch=16,
        weights_size=224,
        channel_prunable=False,
    ),
)
