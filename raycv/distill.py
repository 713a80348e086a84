"""Knowledge distillation: a trained teacher's softened outputs as a second target.

The loop asks ``Teacher.blend`` for the training loss, so distillation is a hook on the
loss, not a copy of the loop: every worker holds the teacher in eval mode on its own
device and runs it on the same (augmented) batch as the student (Hinton et al. 2015)."""

from __future__ import annotations

import torch
from torch import nn

from raycv.artifacts import checkpoint_file, load_checkpoint, load_trained
from raycv.config import Config, ConfigError, DistillConfig, validate
from raycv.tasks import Task


class Teacher:
    def __init__(self, model: nn.Module, temperature: float, weight: float) -> None:
        self.model = model.eval().requires_grad_(False)
        self.temperature = temperature
        self.weight = weight

    def blend(
        self, task: Task, losses: dict[str, torch.Tensor], outputs, batch: dict
    ) -> dict[str, torch.Tensor]:
        """``(1 - w) * hard loss + w * soft loss``: the task's soft-target loss between the
        student's and the teacher's outputs on the same batch, a loss part of its own."""
        with torch.no_grad():
            teacher = task.logits(task.forward(self.model, batch))
        soft = task.distill_loss(task.logits(outputs), teacher, self.temperature)
        return {
            **{name: (1 - self.weight) * value for name, value in losses.items()},
            "distill": self.weight * soft,
        }


def load_teacher(cfg: DistillConfig, device: torch.device) -> Teacher | None:
    """On a worker: the configured teacher on ``device``, or None when distillation is off."""
    if not cfg.teacher:
        return None
    model = load_trained(cfg.teacher).model.to(device)
    return Teacher(model, cfg.temperature, cfg.weight)


def resolve_teacher(cfg: Config) -> Config:
    """On the driver, before Ray starts: ``distill.teacher`` as the absolute path of its
    checkpoint file, which every worker can open whatever its working directory."""
    if not cfg.distill.teacher:
        return cfg
    try:
        file = checkpoint_file(cfg.distill.teacher)
    except FileNotFoundError as e:
        raise ConfigError(f"distill.teacher={cfg.distill.teacher!r}: {e}") from e
    raw = cfg.model_dump(mode="json")
    raw["distill"]["teacher"] = str(file.resolve())
    return validate(raw)


def check_teacher_classes(cfg: Config, class_names: list[str]) -> None:
    """The teacher's outputs are targets: it must know the data's classes, in its order."""
    if not cfg.distill.teacher:
        return
    known = list(load_checkpoint(cfg.distill.teacher)["class_names"])
    if known != class_names:
        raise ConfigError(
            f"distill.teacher predicts {known}, the data has {class_names}; distil from a "
            "model trained on the same classes"
        )
