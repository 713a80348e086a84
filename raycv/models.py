"""Classification models by name: torchvision builders plus what raycv must know of each
(smallest input, where the head sits), behind one entry point, ``create_model``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from raycv.registry import Registry


@dataclass(frozen=True)
class ModelSpec:
    """What raycv needs to know about a torchvision classification builder."""

    builder: str
    heads: tuple[str, ...]  # dotted paths of the Linear layers that map to classes
    min_size: int = 32
    patch: int | None = None  # ViTs: the image side must be a multiple of this
    weights_size: int | None = None  # the only input size the pretrained weights accept
    kwargs: dict[str, Any] = field(default_factory=dict)


MODELS: Registry[ModelSpec] = Registry("model")

for _name in ("resnet18", "resnet34", "resnet50"):
    MODELS.add(_name, ModelSpec(_name, heads=("fc",)))
for _name in ("vgg11_bn", "vgg16_bn"):
    MODELS.add(_name, ModelSpec(_name, heads=("classifier.6",)))
for _name in ("mobilenet_v3_small", "mobilenet_v3_large"):
    MODELS.add(_name, ModelSpec(_name, heads=("classifier.3",)))
MODELS.add("efficientnet_b0", ModelSpec("efficientnet_b0", heads=("classifier.1",)))
MODELS.add("convnext_tiny", ModelSpec("convnext_tiny", heads=("classifier.2",)))
# Inception's stem needs 75 px; its auxiliary head needs a 17x17 map, i.e. 299 px inputs.
MODELS.add(
    "inception_v3",
    ModelSpec(
        "inception_v3", heads=("fc", "AuxLogits.fc"), min_size=75, kwargs={"init_weights": False}
    ),
)
MODELS.add(
    "vit_b_16",
    ModelSpec("vit_b_16", heads=("heads.head",), min_size=16, patch=16, weights_size=224),
)

INCEPTION_AUX_MIN_SIZE = 299


def check_input_size(name: str, image_size: int, weights: str | None = None) -> None:
    """Raise ValueError (one line, with the fix) when ``image_size`` cannot work for ``name``."""
    if name not in MODELS:
        return  # the registry check reports unknown names
    spec = MODELS.get(name)
    if image_size < spec.min_size:
        raise ValueError(
            f"model.image_size={image_size} is too small for {name}; use at least {spec.min_size}"
        )
    if spec.patch and image_size % spec.patch:
        raise ValueError(
            f"model.image_size={image_size} must be a multiple of {spec.patch} for {name}"
        )
    if weights and spec.weights_size and image_size != spec.weights_size:
        raise ValueError(
            f"model.image_size={image_size}: {name} weights need {spec.weights_size} px inputs"
        )


def check_weights(name: str, weights: str | None) -> None:
    """Raise ValueError naming the valid choices when ``weights`` is not a weights name of
    ``name`` (checked before Ray starts; the download itself happens on the workers)."""
    if not weights or name not in MODELS:
        return
    import torchvision

    enum = torchvision.models.get_model_weights(MODELS.get(name).builder)
    names = list(enum.__members__)  # includes the DEFAULT alias
    if weights not in names and weights not in {f"{enum.__name__}.{n}" for n in names}:
        raise ValueError(
            f"model.weights={weights!r} is not a weights name of {name}; "
            f"choose one of: {', '.join(names)}"
        )


def create_model(
    name: str, num_classes: int, weights: str | None = None, image_size: int | None = None
) -> nn.Module:
    """Build ``name`` for ``num_classes`` classes, optionally from torchvision weights,
    replacing the pretrained head when the class count differs."""
    import torchvision

    spec = MODELS.get(name)
    kwargs = dict(spec.kwargs)
    if name == "inception_v3":
        kwargs["aux_logits"] = weights is not None or (image_size or 0) >= INCEPTION_AUX_MIN_SIZE
    if spec.patch and image_size and not weights:
        kwargs["image_size"] = image_size
    if weights:
        model = torchvision.models.get_model(spec.builder, weights=weights, **kwargs)
        replace_heads(model, spec, num_classes)
        if name == "inception_v3" and (image_size or 0) < INCEPTION_AUX_MIN_SIZE:
            model.aux_logits, model.AuxLogits = False, None
        return model
    return torchvision.models.get_model(
        spec.builder, weights=None, num_classes=num_classes, **kwargs
    )


def replace_heads(model: nn.Module, spec: ModelSpec, num_classes: int, fresh: bool = False) -> None:
    """Swap every class-mapping Linear layer for a fresh one with ``num_classes`` outputs:
    those of another class count, or all of them with ``fresh`` (a new task's classes)."""
    for path in spec.heads:
        parent_path, _, attr = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
        except AttributeError:
            continue  # an optional head (Inception's auxiliary one) that was left out
        old = getattr(parent, attr, None)
        if isinstance(old, nn.Linear) and (fresh or old.out_features != num_classes):
            setattr(parent, attr, nn.Linear(old.in_features, num_classes))
