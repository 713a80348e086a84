"""Optimizers and learning-rate schedules by name."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from raycv.config import OptimizerConfig, SchedulerConfig
from raycv.registry import Registry

OPTIMIZERS: Registry[Callable[[list[dict], OptimizerConfig, float], torch.optim.Optimizer]] = (
    Registry("optimizer")
)
SCHEDULERS: Registry[Callable[[SchedulerConfig, int, int], Callable[[int], float]]] = Registry(
    "scheduler"
)


@OPTIMIZERS.register("sgd")
def _sgd(groups: list[dict], cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    nesterov = cfg.nesterov and cfg.momentum > 0  # torch refuses Nesterov without momentum
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=nesterov)


@OPTIMIZERS.register("adamw")
def _adamw(groups: list[dict], cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas)


@OPTIMIZERS.register("adam")
def _adam(groups: list[dict], cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=lr, betas=cfg.betas)


def param_groups(
    model: nn.Module, weight_decay: float, lr: float, lr_scales: dict[str, float] | None = None
) -> list[dict]:
    """One group per (weight decay, learning rate): norm scales and biases (1-D tensors) get
    no weight decay; ``lr_scales`` (parameter name -> factor) gives discriminative rates.
    Frozen parameters are included: they take no step while they have no gradient, and
    train at their group's rate once unfrozen."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        decay = 0.0 if p.ndim <= 1 else weight_decay
        scale = (lr_scales or {}).get(name, 1.0)
        groups.setdefault((decay, scale), []).append(p)
    return [
        {"params": params, "weight_decay": decay, "lr": lr * scale}
        for (decay, scale), params in sorted(groups.items(), key=lambda kv: -kv[0][1])
    ]


def scaled_lr(lr: float, rule: str, global_batch: int, base_batch: int) -> float:
    """The linear (Goyal et al.) or square-root rule for changing the batch size."""
    ratio = global_batch / base_batch
    return {"none": lr, "linear": lr * ratio, "sqrt": lr * math.sqrt(ratio)}[rule]


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, lr: float, lr_scales: dict[str, float] | None = None
) -> torch.optim.Optimizer:
    """The first group has the highest learning rate (the head's, when rates differ)."""
    groups = param_groups(model, cfg.weight_decay, lr, lr_scales)
    return OPTIMIZERS.get(cfg.name)(groups, cfg, lr)


@dataclass(frozen=True)
class _Warmup:
    """Linear warm-up over ``warmup`` steps in front of another per-step factor."""

    warmup: int
    after: Callable[[int], float]

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return self.after(step - self.warmup)


@dataclass(frozen=True)
class _Cosine:
    total: int

    def __call__(self, step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(step, self.total) / max(1, self.total)))


@dataclass(frozen=True)
class _Step:
    every: int
    gamma: float

    def __call__(self, step: int) -> float:
        return self.gamma ** (step // self.every)


@dataclass(frozen=True)
class _OneCycle:
    """Triangular ramp up for 30% of training, then cosine down (Smith's one-cycle shape)."""

    total: int

    def __call__(self, step: int) -> float:
        peak = max(1, int(0.3 * self.total))
        if step < peak:
            return 0.04 + 0.96 * step / peak
        return _Cosine(self.total - peak)(step - peak)


@SCHEDULERS.register("cosine")
def _cosine(cfg: SchedulerConfig, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    return _Warmup(warmup, _Cosine(steps_per_epoch * epochs - warmup))


@SCHEDULERS.register("step")
def _step(cfg: SchedulerConfig, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    return _Warmup(warmup, _Step(cfg.step_size * steps_per_epoch, cfg.gamma))


@SCHEDULERS.register("onecycle")
def _onecycle(cfg: SchedulerConfig, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    return _OneCycle(steps_per_epoch * epochs)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-optimizer-step schedule: a factor of the base learning rate for each step."""
    factor = SCHEDULERS.get(cfg.name)(cfg, steps_per_epoch, epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
