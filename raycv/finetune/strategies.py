"""Fine-tune strategies: which parameters train in which epoch, and at what learning rate.

A strategy only answers "is the backbone frozen in this epoch?"; ``FineTuning`` turns the
answer into ``requires_grad`` flags and BatchNorm modes, and gives every parameter its
learning-rate scale (discriminative rates). The backbone is everything but the model's
registered heads (``ModelSpec.heads``), so every registered model is covered."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from raycv.registry import Registry

if TYPE_CHECKING:  # config imports this module to validate finetune.strategy
    from raycv.config import Config, FinetuneConfig

# strategy name -> (finetune config, epoch counted from 1) -> backbone frozen in that epoch
STRATEGIES: Registry[Callable[[FinetuneConfig, int], bool]] = Registry("fine-tune strategy")


@STRATEGIES.register("full")
def _full(cfg: FinetuneConfig, epoch: int) -> bool:
    return False


@STRATEGIES.register("linear_probe")
def _linear_probe(cfg: FinetuneConfig, epoch: int) -> bool:
    return True


@STRATEGIES.register("gradual")
def _gradual(cfg: FinetuneConfig, epoch: int) -> bool:
    return epoch <= cfg.freeze_epochs


_CONTAINERS = (nn.Sequential, nn.ModuleList)
_MIN_EXPANDED = 3  # a container with fewer children is one block (ResNet's 2-block stages)


def head_prefixes(model_name: str) -> tuple[str, ...]:
    from raycv.models import MODELS

    return tuple(f"{path}." for path in MODELS.get(model_name).heads)


def blocks(model: nn.Module) -> list[str]:
    """Module paths of the model's blocks in forward order (registration order): top-level
    children, with long Sequential/ModuleList trunks (VGG/MobileNet ``features``, ViT
    ``encoder.layers``) opened into their stages. Layer-wise decay counts depth in these."""
    return _blocks(model, "")


def _blocks(module: nn.Module, prefix: str) -> list[str]:
    out = []
    for name, child in module.named_children():
        path = prefix + name
        if not _has_params(child):
            continue
        if isinstance(child, _CONTAINERS) and len(child) >= _MIN_EXPANDED:
            out += [f"{path}.{n}" for n, c in child.named_children() if _has_params(c)]
        elif any(isinstance(g, _CONTAINERS) and len(g) >= _MIN_EXPANDED for g in child.children()):
            out += _blocks(child, path + ".")
        else:
            out.append(path)
    return out


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


@dataclass(frozen=True)
class FineTuning:
    """The fine-tune plan of one run: ``cfg.finetune`` applied to ``cfg.model.name``."""

    cfg: Config

    @property
    def heads(self) -> tuple[str, ...]:
        return head_prefixes(self.cfg.model.name)

    def is_head(self, param_name: str) -> bool:
        return param_name.startswith(self.heads)

    def frozen(self, epoch: int) -> bool:
        """Whether the backbone is frozen in ``epoch`` (counted from 1)."""
        f = self.cfg.finetune
        return bool(f.source) and STRATEGIES.get(f.strategy)(f, epoch)

    def set_trainable(self, model: nn.Module, frozen: bool) -> None:
        for name, param in model.named_parameters():
            param.requires_grad_(self.is_head(name) or not frozen)

    def train_mode(self, model: nn.Module, frozen: bool) -> None:
        """``model.train()``, except that a frozen backbone's BatchNorm layers (and all of
        them with ``finetune.freeze_bn``) keep their running statistics."""
        model.train()
        if not (frozen or self.cfg.finetune.freeze_bn):
            return
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not self.is_head(name + "."):
                module.eval()

    def lr_scales(self, model: nn.Module) -> dict[str, float]:
        """Parameter name -> factor of the base learning rate: heads 1; the backbone
        ``backbone_lr_factor``, or ``layer_decay`` to the power of its block's depth below
        the head (deeper from the head, smaller steps)."""
        f = self.cfg.finetune
        names = [n for n, _ in model.named_parameters()]
        if f.layer_decay is None:
            factor = f.backbone_lr_factor if f.source else 1.0
            return {n: 1.0 if self.is_head(n) else factor for n in names}
        body = [  # blocks holding only heads (ViT's ``heads``) are the head
            b
            for b in blocks(model)
            if not all(self.is_head(n) for n in names if n.startswith(b + "."))
        ]
        depth = {b: len(body) - i for i, b in enumerate(body)}  # the top block is 1 below the head
        return {n: 1.0 if self.is_head(n) else f.layer_decay ** _depth(n, depth) for n in names}


def _depth(param_name: str, depth: dict[str, int]) -> int:
    # Bare parameters outside every block (ViT's class token) sit with the deepest block.
    owners = [d for block, d in depth.items() if param_name.startswith(block + ".")]
    return owners[0] if owners else max(depth.values(), default=0)
