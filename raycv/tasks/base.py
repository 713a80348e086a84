"""The task interface: everything a stage needs to know about what is learnt.

Each stage (the training loop, evaluation, prediction, export, compression, distillation,
sweeps, reports) asks the task, never ``if task == ...``: adding a task is one module here,
its models' registry entries (raycv/models/) and a data source that yields its columns.

A batch is a dict of tensors as Ray Data hands it over: ``image`` (normalised float
(N, 3, S, S)) and the task's ``targets`` columns. A model's raw output goes to the task,
which knows its shape (logits, a dict of maps, Inception's named tuple)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.distributed as dist
from torch import nn

from raycv.registry import Registry


@dataclass(frozen=True)
class Metric:
    """A metric that ranks models, and which way is better."""

    name: str
    mode: str  # "max" or "min"


class Evaluator(Protocol):
    """detectron2's three verbs: ``reset``, ``process`` per batch, ``evaluate`` at the end.
    ``sync`` combines the workers' states before ``evaluate`` (summed tensors, or a gather to
    rank 0); every worker calls it, and then ``evaluate`` gives the same numbers on each."""

    def reset(self) -> None: ...

    def process(self, batch: dict[str, torch.Tensor], outputs: Any, losses: dict) -> None: ...

    def sync(self, device: torch.device) -> None: ...

    def evaluate(self, prefix: str) -> dict[str, float]: ...


class SummedEvaluator:
    """An evaluator whose whole state is one float64 tensor of running sums (loss sums,
    counts, a confusion matrix): combining workers is one all-reduce, exact and safe with
    uneven shards."""

    def __init__(self, size: int | tuple[int, ...]) -> None:
        self.sums = torch.zeros(size, dtype=torch.float64)

    def reset(self) -> None:
        self.sums.zero_()

    def sync(self, device: torch.device) -> None:
        if dist.is_available() and dist.is_initialized():
            sums = self.sums.to(device)
            dist.all_reduce(sums)
            self.sums = sums.cpu()


class Task(Protocol):
    """What a task implements once (``raycv/tasks/<name>.py``, registered in ``TASKS``)."""

    targets: ClassVar[tuple[str, ...]]  # batch columns besides "image" (as sources cache them)
    primary: ClassVar[Metric]  # default of checkpoint.metric, tune.objective.metric, reports
    whole_frame: ClassVar[bool]  # evaluation sees the whole image, not a centre crop

    def __init__(self, class_names: list[str], cfg) -> None: ...

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        """The model's raw output for ``batch["image"]`` (training or eval mode)."""

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named loss parts; their sum trains, each is logged."""

    def logits(self, outputs: Any) -> torch.Tensor:
        """The main output as one tensor: what eval, predict, export and distillation read."""

    def evaluator(self) -> Evaluator: ...

    def distill_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """Soft-target loss between two ``logits`` outputs."""


TASKS: Registry[type[Task]] = Registry("task")


def build_task(cfg, class_names: list[str]) -> Task:
    """The single way in: ``build_task(cfg, class_names)``."""
    return TASKS.get(cfg.task)(class_names, cfg)


def total(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss that trains: the sum of the named parts."""
    return sum(losses.values())


def soft_target_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * KL(teacher_T || student_T)`` over the class dimension (dim 1), averaged over
    every other one: per image for logits (N, C), per pixel for maps (N, C, H, W). The T^2
    keeps the soft term's gradients on the hard term's scale whatever the temperature
    (Hinton et al. 2015)."""
    t = temperature
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(student.float() / t, dim=1),
        torch.log_softmax(teacher.float() / t, dim=1),
        log_target=True,
        reduction="none",
    )
    return kl.sum(dim=1).mean() * t * t
