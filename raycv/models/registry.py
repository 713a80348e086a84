"""The model registry: each entry names a builder and what raycv must know of the model
(its task, smallest input, where its heads sit, whether channel pruning handles it),
behind one entry point, ``create_model``. Model quirks live on their entries, not in
``if name == ...`` checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from raycv.registry import Registry


@dataclass(frozen=True)
class Backbone:
    """Where a classifier's weights go in this model: fine-tuning it from a raycv
    classification run moves the keys under ``source_prefix`` to ``target_prefix``."""

    model: str | None  # the registered classifier it takes; None: the one named model.encoder
    source_prefix: str = ""  # "features." for MobileNet, whose classifier is a sibling
    target_prefix: str = "encoder."


@dataclass(frozen=True)
class DenseOutput:
    """A detector's output before the score threshold and NMS, whose kept boxes depend on
    the scores: one tensor for a batch, what ``raycv export`` ships and torch-pruning traces."""

    # (model, images (B, 3, H, W)) -> (B, A, 4 + C): each row a box (x1, y1, x2, y2 in input
    # pixels) then C class scores in [0, 1]
    rows: Callable[[nn.Module, Tensor], Tensor]
    # model -> the settings that turn rows into detections (score_threshold, pre_nms_top_k,
    # nms_iou, max_detections, and a note where the model's own steps differ)
    settings: Callable[[nn.Module], dict[str, Any]]


@dataclass(frozen=True)
class ModelSpec:
    """What raycv needs to know about one model builder."""

    builder: str  # torchvision builder name, or segmentation-models-pytorch architecture
    heads: tuple[str, ...]  # dotted paths of the layers that map features to classes
    task: str = "classification"
    min_size: int = 32
    patch: int | None = None  # the image side must be a multiple of this
    weights_size: int | None = None  # the only input size the pretrained weights accept
    kwargs: dict[str, Any] = field(default_factory=dict)
    channel_prunable: bool = True  # torch-pruning's channel pruner keeps its forward working
    aux_weight: float = 0.0  # weight of an auxiliary output's loss (segmentation)
    min_batch: int = 1  # smallest training batch per worker (BatchNorm after global pooling)
    dynamic_sides: bool = True  # a segmenter's ONNX export takes any height and width
    encoder: str | None = None  # default encoder (smp, or yolo's backbone); None: no encoder
    encoders: Callable[[], list[str]] | None = None  # the encoder names it accepts
    encoder_weights: bool = False  # model.weights names its encoder's torchvision weights
    # Options that depend on the weights and input size (Inception's auxiliary head).
    options: Callable[[str | None, int | None], dict[str, Any]] | None = None
    # Fix-ups after loading pretrained weights, given the input size.
    adapt: Callable[[nn.Module, int | None], None] | None = None
    build: Callable[..., nn.Module] | None = None  # default: torchvision.models.get_model
    backbone: Backbone | None = None  # segmenters: what a classification run fills
    background_class: bool = False  # a detector whose class 0 is background (Faster R-CNN, SSD)
    # Its heads come built for the class count (a detector's box coder, anchors per cell):
    # transfer learning keeps them as built instead of swapping each class-mapping layer.
    built_heads: bool = False
    # a one-stage detector's; None: a two-stage one, exported with NMS inside, not traced
    dense: DenseOutput | None = None
    prune_keep: tuple[str, ...] = ()  # layers besides ``heads`` whose outputs pruning keeps
    quantizable: bool = True  # int8 through torch.export of its evaluation forward

    @property
    def torchvision(self) -> bool:
        return self.build is None


MODELS: Registry[ModelSpec] = Registry("model")


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


def check_weights(name: str, weights: str | None, encoder: str | None = None) -> None:
    """Raise ValueError naming the valid choices when ``weights`` is not a weights name of
    ``name`` (of its ``encoder`` where the entry says so; checked before Ray starts; the
    download itself happens on the workers)."""
    if not weights or name not in MODELS:
        return
    spec = MODELS.get(name)
    if not spec.torchvision and not spec.encoder_weights:
        raise ValueError(
            f"model.weights: {name} has no torchvision weights; start from a raycv "
            "classification run's backbone with finetune.source=RUN"
        )
    import torchvision

    builder = (encoder or spec.encoder) if spec.encoder_weights else spec.builder
    enum = torchvision.models.get_model_weights(builder)
    names = list(enum.__members__)  # includes the DEFAULT alias
    if weights not in names and weights not in {f"{enum.__name__}.{n}" for n in names}:
        whose = f"{name}'s encoder {builder}" if spec.encoder_weights else name
        raise ValueError(
            f"model.weights={weights!r} is not a weights name of {whose}; "
            f"choose one of: {', '.join(names)}"
        )


def create_model(
    name: str,
    num_classes: int,
    weights: str | None = None,
    image_size: int | None = None,
    encoder: str | None = None,
) -> nn.Module:
    """Build ``name`` for ``num_classes`` classes, optionally from torchvision weights,
    replacing the pretrained heads when the class count differs; ``encoder`` picks a
    segmentation-models-pytorch encoder (default: the entry's own)."""
    spec = MODELS.get(name)
    kwargs = {**spec.kwargs, **(spec.options(weights, image_size) if spec.options else {})}
    if spec.patch and image_size and not weights and spec.task == "classification":
        kwargs["image_size"] = image_size  # ViT: its position embeddings fit the input
    if spec.build is not None:
        if spec.encoder_weights:
            kwargs["weights"] = weights
        return spec.build(spec, num_classes, encoder or spec.encoder, **kwargs)
    import torchvision

    if not weights:
        return torchvision.models.get_model(
            spec.builder, weights=None, num_classes=num_classes, **kwargs
        )
    model = torchvision.models.get_model(spec.builder, weights=weights, **kwargs)
    replace_heads(model, spec, num_classes)
    if spec.adapt:
        spec.adapt(model, image_size)
    return model


def replace_heads(model: nn.Module, spec: ModelSpec, num_classes: int, fresh: bool = False) -> None:
    """Swap every class-mapping layer (Linear, or a segmentation head's Conv2d) for a fresh
    one with ``num_classes`` outputs: those of another class count, or all of them with
    ``fresh`` (a new task's classes)."""
    for path in spec.heads:
        parent_path, _, attr = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
        except AttributeError:
            continue  # an optional head (Inception's auxiliary one) that was left out
        old = getattr(parent, attr, None)
        if isinstance(old, nn.Linear) and (fresh or old.out_features != num_classes):
            setattr(parent, attr, nn.Linear(old.in_features, num_classes))
        if isinstance(old, nn.Conv2d) and (fresh or old.out_channels != num_classes):
            setattr(parent, attr, _conv_like(old, num_classes))


def _conv_like(old: nn.Conv2d, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(
        old.in_channels,
        out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        bias=old.bias is not None,
    )
