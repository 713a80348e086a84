"""Pruning by name: ``PRUNERS`` maps a method to a pruner that shrinks a model once
(``apply``) and keeps the result valid while it trains (``attach``). ``prune_model`` is the
one entry point; ``fit_to_state_dict`` gives a freshly built model the shapes of a pruned
one's saved weights, so that pruned checkpoints load with ``weights_only=True``."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from torch.nn.utils import prune

from raycv.models import MODELS
from raycv.registry import Registry

if TYPE_CHECKING:  # config imports this module to validate prune.method
    from raycv.config import PruneConfig

log = logging.getLogger(__name__)


class Pruner(Protocol):
    def supports(self, model_name: str) -> bool:
        """Whether this method prunes ``model_name`` correctly."""

    def apply(
        self,
        model: nn.Module,
        cfg: PruneConfig,
        example_inputs: torch.Tensor,
        protected: list[nn.Module],
        batches: Batches = (),
        trace: Trace | None = None,
    ) -> nn.Module:
        """Prune ``model`` (in place) at ``cfg.ratio``, leaving ``protected`` layers alone;
        ``batches`` feed importances that need gradients; ``trace`` runs the model on the
        example for pruners that follow its graph."""

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Keep the pruning valid while ``optimizer`` trains ``model``."""


PRUNERS: Registry[Pruner] = Registry("pruner")


@dataclass(frozen=True)
class Importance:
    """How channels are ranked: torch-pruning's importance class ``kind`` with ``options``;
    ``needs_gradients``: on a few labelled training batches."""

    kind: str
    options: dict[str, Any] = field(default_factory=dict)
    needs_gradients: bool = False

    def build(self) -> Any:
        # Imported where used: torch-pruning imports timm and torchvision (0.9 s), and every
        # command's driver imports this registry to validate its config.
        import torch_pruning as tp

        return getattr(tp.importance, self.kind)(**self.options)


IMPORTANCES: Registry[Importance] = Registry("importance")
IMPORTANCES.add("l1", Importance("MagnitudeImportance", {"p": 1}))
IMPORTANCES.add("l2", Importance("MagnitudeImportance", {"p": 2}))
# First-order Taylor: |weight x d loss / d weight| summed per channel, the loss change that
# removing the channel would cause (Molchanov et al. 2019).
IMPORTANCES.add("taylor", Importance("TaylorImportance", needs_gradients=True))
# One function per training batch: given the model, that batch's loss summed over its
# images (the task's loss, so classifiers and segmenters rank channels alike).
Batches = Iterable[Callable[[nn.Module], torch.Tensor]]
Trace = Callable[[nn.Module, torch.Tensor], Any]  # the forward pass a pruner follows


def _forward_with_aux_heads(model: nn.Module, example_inputs: torch.Tensor) -> Any:
    # torch-pruning traces in eval mode, where Inception skips its auxiliary head, so the
    # channels feeding AuxLogits would be pruned upstream only. Flagging the top module alone
    # as training runs that head while BatchNorm and Dropout below stay in eval mode.
    was_training = model.training
    model.training = True
    try:
        return model(example_inputs)
    finally:
        model.training = was_training


class ChannelPruner:
    """Structured pruning: removes whole channels, found through torch-pruning's dependency
    graph together with the inputs of every layer that reads them, ranked by the L1 or L2
    norm of their weights or by first-order Taylor on training batches. The model really
    gets smaller and faster. One step (``raycv compress`` iterates)."""

    def supports(self, model_name: str) -> bool:
        return MODELS.get(model_name).channel_prunable

    def apply(
        self,
        model: nn.Module,
        cfg: PruneConfig,
        example_inputs: torch.Tensor,
        protected: list[nn.Module],
        batches: Batches = (),
        trace: Trace | None = None,
    ) -> nn.Module:
        from raycv.rounded_pruner import RoundedPruner  # torch-pruning: see Importance.build

        was_training = model.training
        importance = IMPORTANCES.get(cfg.importance)
        with warnings.catch_warnings():
            # ConvNeXt's layer_scale (C, 1, 1) is a bare parameter; torch-pruning prunes its
            # last non-singleton dim, the right one, but warns about it on every build.
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            pruner = RoundedPruner(
                model,
                example_inputs,
                importance=importance.build(),
                pruning_ratio=cfg.ratio,
                global_pruning=bool(cfg.global_pruning),  # default: per layer
                ignored_layers=protected,
                round_to=cfg.round_to,
                forward_fn=trace or _forward_with_aux_heads,
                # Fresh dicts: torch-pruning's defaults are shared mutable ones that it fills
                # with this model's grouped layers, which would leak into the next pruner.
                in_channel_groups={},
                out_channel_groups={},
            )
        if importance.needs_gradients:
            _accumulate_gradients(model, batches)
        pruner.step()
        model.zero_grad(set_to_none=True)
        model.train(was_training)  # tracing left the model in eval mode
        return model

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Nothing to keep: the removed channels no longer exist."""


def _accumulate_gradients(model: nn.Module, batches: Batches) -> None:
    """The summed loss gradients of ``batches``, left in each parameter's ``grad`` for the
    importance to read; eval mode, so BatchNorm statistics stay as trained."""
    model.eval()
    model.zero_grad(set_to_none=True)
    seen = 0
    for summed_loss in batches:
        summed_loss(model).backward()
        seen += 1
    if seen == 0:
        raise ValueError("Taylor importance needs labelled training batches; none were given")


class L1UnstructuredPruner:
    """Unstructured pruning: zeroes the weights of smallest magnitude, ranked together across
    all conv and linear layers but the heads (per layer with ``global_pruning: false``).
    The tensors keep their shapes, so dense latency and MACs are unchanged; only
    ``nonzero_params`` falls (the gain needs sparse kernels or compression)."""

    def supports(self, model_name: str) -> bool:
        return True

    def apply(
        self,
        model: nn.Module,
        cfg: PruneConfig,
        example_inputs: torch.Tensor,
        protected: list[nn.Module],
        batches: Batches = (),
        trace: Trace | None = None,
    ) -> nn.Module:
        targets = [(layer, "weight") for layer in _weighted_layers(model, protected)]
        if cfg.global_pruning is False:  # each layer loses the same share
            for layer, name in targets:
                prune.l1_unstructured(layer, name, amount=cfg.ratio)
        else:  # the default: the smallest weights of all layers ranked together
            prune.global_unstructured(
                targets, pruning_method=prune.L1Unstructured, amount=cfg.ratio
            )
        for layer, name in targets:
            prune.remove(layer, name)  # plain ``weight`` again: no weight_orig/weight_mask
        return model

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Re-zero, after every optimizer step, the conv and linear weights that are zero now.
        The masks come from the weights themselves, so this holds after a checkpoint restore
        too; momentum and weight decay would otherwise revive the pruned weights."""
        masks = [(w, w == 0) for w in _weights(model) if not bool(w.all())]
        if masks:
            optimizer.register_step_post_hook(functools.partial(_rezero, masks))


def _rezero(masks: list[tuple[torch.Tensor, torch.Tensor]], *_hook_args: Any) -> None:
    with torch.no_grad():
        for weight, zeros in masks:
            weight.masked_fill_(zeros.to(weight.device), 0)


def _weighted_layers(model: nn.Module, protected: Iterable[nn.Module]) -> list[nn.Module]:
    skip = {id(m) for m in protected}
    return [
        m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in skip
    ]


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in _weighted_layers(model, ())]


PRUNERS.add("channel", ChannelPruner())
PRUNERS.add("l1_unstructured", L1UnstructuredPruner())


def check_prunable(model_name: str, method: str) -> None:
    """Raise ValueError (one line, with the fix) when ``method`` cannot prune ``model_name``.
    Only relevant when the ratio is (or may be searched) above 0."""
    if method not in PRUNERS or model_name not in MODELS:
        return  # the registry checks report unknown names
    if PRUNERS.get(method).supports(model_name):
        return
    fixes = " or ".join(f"prune.method={n}" for n in PRUNERS if PRUNERS.get(n).supports(model_name))
    raise ValueError(f"{method} pruning does not support {model_name}; use {fixes}")


def protected_layers(model: nn.Module, model_name: str) -> list[nn.Module]:
    """The class-mapping heads of ``model`` that exist (Inception's auxiliary one may not),
    and the other layers whose outputs must keep their size (a detector's box outputs)."""
    spec = MODELS.get(model_name)
    found = []
    for path in (*spec.heads, *spec.prune_keep):
        try:
            found.append(model.get_submodule(path))
        except AttributeError:
            continue
    return found


def prune_model(
    model: nn.Module, model_name: str, cfg: PruneConfig, image_size: int, batches: Batches = ()
) -> nn.Module:
    """Prune ``model`` as ``cfg`` says; ratio 0 returns it untouched. ``batches`` (their
    losses as functions of the model) are needed by importances that rank with gradients
    (taylor)."""
    if cfg.ratio == 0:
        return model
    check_prunable(model_name, cfg.method)
    # Zeros: the pruners trace shapes and rank weights, and must not draw from the global RNG.
    device = next(model.parameters()).device
    example = torch.zeros(1, 3, image_size, image_size, device=device)
    before = _count(model.parameters())
    protected = protected_layers(model, model_name)
    dense = MODELS.get(model_name).dense
    # A detector's eval forward ends in NMS, whose kept boxes depend on the scores: the graph
    # to follow is the dense output before it.
    trace = dense.rows if dense else None
    model = PRUNERS.get(cfg.method).apply(model, cfg, example, protected, batches, trace)
    log.info(
        "pruned %s (%s, ratio %.2f): %d -> %d parameters, %d nonzero",
        model_name,
        cfg.method,
        cfg.ratio,
        before,
        _count(model.parameters()),
        sum(int(torch.count_nonzero(p)) for p in model.parameters()),
    )
    return model


def _count(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors)


# ------------------------------------------------------------- loading pruned weights


def fit_to_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Give a freshly built ``model`` the shapes saved in ``state_dict`` (of a channel-pruned
    model), then load it strictly. An unpruned state dict loads as it always did.

    Our own rather than ``tp.state_dict``/``tp.load_state_dict``: those pickle whole module
    ``__dict__``s, which ``torch.load(..., weights_only=True)`` (our safety rule) refuses.
    Call it before building the optimizer: resized parameters are new tensors.
    """
    for prefix, module in model.named_modules():
        shapes = _changed_shapes(module, f"{prefix}." if prefix else "", state_dict)
        if shapes:
            _fit_attributes(module, shapes)  # reads the old sizes, so before the resize
            _resize_tensors(module, shapes)
    model.load_state_dict(state_dict, strict=True)


def _changed_shapes(
    module: nn.Module, prefix: str, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Size]:
    own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    return {
        name: state_dict[prefix + name].shape
        for name, tensor in own
        if prefix + name in state_dict and state_dict[prefix + name].shape != tensor.shape
    }


def _resize_tensors(module: nn.Module, shapes: dict[str, torch.Size]) -> None:
    # Empty tensors of the saved shapes: load_state_dict fills them right after.
    for name, shape in shapes.items():
        old = getattr(module, name)
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        setattr(module, name, new)  # a buffer stays a (persistent) buffer


@functools.singledispatch
def _fit_attributes(module: nn.Module, shapes: dict[str, torch.Size]) -> None:
    """Update the size attributes a module's forward reads. Modules without any (ConvNeXt's
    block, whose ``layer_scale`` is a bare parameter) need only their tensors resized."""


@_fit_attributes.register
def _(module: nn.Conv2d, shapes: dict[str, torch.Size]) -> None:
    out_channels, in_per_group = shapes.get("weight", module.weight.shape)[:2]
    if module.groups == module.in_channels > 1:
        # A depthwise conv stays depthwise: one group per (remaining) input channel.
        multiplier = module.out_channels // module.in_channels
        module.in_channels = module.groups = out_channels // multiplier
    else:
        module.in_channels = in_per_group * module.groups
    module.out_channels = out_channels


@_fit_attributes.register
def _(module: nn.BatchNorm2d, shapes: dict[str, torch.Size]) -> None:
    module.num_features = (shapes.get("running_mean") or shapes["weight"])[0]


@_fit_attributes.register
def _(module: nn.Linear, shapes: dict[str, torch.Size]) -> None:
    module.out_features, module.in_features = shapes.get("weight", module.weight.shape)


@_fit_attributes.register
def _(module: nn.LayerNorm, shapes: dict[str, torch.Size]) -> None:
    module.normalized_shape = tuple(shapes.get("weight") or shapes["bias"])
