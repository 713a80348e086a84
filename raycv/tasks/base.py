"""The task interface: everything a stage needs to know about what is learnt.

Each stage (the training loop, evaluation, prediction, export, compression, distillation,
sweeps, reports) asks the task, never ``if task == ...``: adding a task is one module here,
its models' registry entries (raycv/models/) and a data source that yields its columns.

A batch is a dict of tensors as Ray Data hands it over, ``image`` uint8 (N, 3, S, S) and the
task's ``targets`` columns, with ``image`` made the model's normalised float input on the
worker's device (``raycv.data.augment.normalize``) before it reaches ``forward``. A model's
raw output goes to the task, which knows its shape (logits, a dict of maps, Inception's named
tuple)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from raycv.registry import Registry

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class Metric:
    """A metric that ranks models, and which way is better."""

    name: str
    mode: str  # "max" or "min"


def metric_words(name: str) -> str:
    """A metric's name for headings: "val acc", "val mIoU", "val mAP50"."""
    return name.replace("_", " ").replace("miou", "mIoU").replace("map", "mAP")


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


@dataclass(frozen=True)
class EvalResult:
    """What ``raycv eval`` records: ``metrics`` (metrics.json and the manifest), the
    ``paths`` of the pictures written, relative to the run folder, and ``summary``: the
    table the log shows."""

    metrics: dict[str, Any]
    paths: dict[str, str]
    summary: str


def per_class_lines(scores: dict[str, float | None], score: str, column: str, cells) -> list[str]:
    """An eval summary's per-class table: each class's ``score`` (``-`` where there was
    nothing to score) and one more ``column`` from ``cells``, in class order."""
    width = max(map(len, [*scores, "class"]))
    lines = [f"  {'class'.ljust(width)}  {score.ljust(6)}  {column}"]
    for (name, value), cell in zip(scores.items(), cells):
        shown = "-     " if value is None else f"{value:.4f}"
        lines.append(f"  {name.ljust(width)}  {shown}  {cell}")
    return lines


class EvalReport(Protocol):
    """``raycv eval``'s one pass over the validation split, in the driver."""

    def process(self, batch: dict[str, np.ndarray], outputs: Any) -> None:
        """A prepared NumPy batch (uint8 ``image`` and the ``targets``) and the model's outputs for
        it in evaluation mode (``Task.forward``: logits, or detections)."""

    def write(self, folder: Path) -> EvalResult:
        """Draw the pictures into the eval run ``folder``; what to record."""


class PredictionWriter(Protocol):
    """``raycv predict``'s outputs, made in three places: ``columns`` in the model actors,
    ``render`` (None: nothing to do) in Ray Data tasks after them, for per-file work that
    needs no model, and ``collect`` in the driver, batch by batch (files written as they
    come), then ``table``: one row per file, in listing order."""

    render: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None
    paths: dict[str, str]  # outputs beside the tables, relative to the run folder
    settings: dict[str, Any]  # what shaped the outputs (top_k), for the manifest

    def columns(self, outputs: Any, bad: np.ndarray) -> dict[str, np.ndarray]:
        """Per-row NumPy columns from the model's outputs for a batch (``Task.forward`` in
        evaluation mode); rows where ``bad`` have no image."""

    def collect(self, batch: dict[str, np.ndarray]) -> None:
        """A batch of results: ``path``, ``error`` and what ``columns``/``render`` gave."""

    def table(self) -> pa.Table:
        """``path``, the task's columns and ``error`` ("" for a good file), per file."""


@dataclass(frozen=True)
class ExportSpec:
    """A task's export signature (raycv/export.py): the shapes of the input ``image`` and
    of the one output, a name where a dimension is dynamic, and the (height, width) of
    the batches that check the files against PyTorch (more than one: dynamic sides)."""

    input_shape: tuple[int | str, ...]
    output_shape: tuple[int | str, ...]
    output_meaning: str  # for the model card
    check_sides: tuple[tuple[int, int], ...]
    output_name: str = "logits"
    # How a decoded file becomes the input square, in words, where the eval preset's own
    # steps do not say it (a detector's letterbox); None: the preset's steps.
    fit: str | None = None
    atol: float = 1e-4  # the check's absolute tolerance, in the output's units (export.py)
    # ONNX through the TorchScript-based exporter: a graph whose sizes depend on the data
    # (NMS inside), which torch.export cannot hold
    traced_onnx: bool = False

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the files take, where it is not dynamic."""
        batch = self.input_shape[0]
        return batch if isinstance(batch, int) else None

    @property
    def dynamic(self) -> dict[int, str]:
        """Input dimension -> its name, for each dynamic one."""
        return {i: d for i, d in enumerate(self.input_shape) if isinstance(d, str)}


@dataclass(frozen=True)
class Preview:
    """``raycv data preview``'s pictures: uint8 (N, H, W, 3) images with their targets drawn
    on, a title each, and the colours drawn (name -> RGB; None: none)."""

    images: np.ndarray
    titles: list[str]
    legend: dict[str, tuple[int, ...]] | None = None


class Task(Protocol):
    """What a task implements once (``raycv/tasks/<name>.py``, registered in ``TASKS``)."""

    targets: ClassVar[tuple[str, ...]]  # batch columns besides "image" (as sources cache them)
    primary: ClassVar[Metric]  # default of checkpoint.metric, tune.objective.metric, reports
    whole_frame: ClassVar[bool]  # evaluation sees the whole image, not a centre crop
    default_model: ClassVar[str]  # model.name when the config names none
    distills: ClassVar[bool]  # has a soft-target loss (``distill_loss``) for distillation

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

    def eval_report(self) -> EvalReport:
        """``raycv eval``'s metrics and pictures."""

    def prediction_writer(self, files: list[str], folder: Path, top_k: int) -> PredictionWriter:
        """``raycv predict``'s outputs for ``files``, written into the run ``folder``."""

    def export_spec(
        self, image_size: int, side_multiple: int | None, dynamic_sides: bool = True
    ) -> ExportSpec:
        """``raycv export``'s signature and checks for a model trained at ``image_size``
        whose input sides must be multiples of ``side_multiple`` (None: any);
        ``dynamic_sides`` False: the model exports at its training size only."""

    def exportable(self, model: nn.Module) -> nn.Module:
        """``model`` as ``raycv export`` ships it: one tensor out (``export_spec``)."""

    def preview(self, batch: dict[str, np.ndarray]) -> Preview:
        """A prepared NumPy batch drawn for people, targets on the images."""


class Logits(nn.Module):
    """A classifier or segmenter as exported: its task's main output as one tensor
    (``Task.logits``: a torchvision segmenter's ``out`` map, not its dict)."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.task = task  # a plain object: it adds nothing to the state dict

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.task.logits(self.task.forward(self.model, {"image": image}))


TASKS: Registry[type[Task]] = Registry("task")


def build_task(cfg, class_names: list[str]) -> Task:
    """The single way in: ``build_task(cfg, class_names)``."""
    return TASKS.get(cfg.task)(class_names, cfg)


def in_listing_order(rows: dict[str, Any], files: list[str]) -> list[Any]:
    """``rows`` by path, in the order of ``files``; every file must have one."""
    missing = [f for f in files if f not in rows]
    if missing:  # every file is read and flagged, so this means a path was rewritten
        raise RuntimeError(f"{len(missing)} files got no prediction, e.g. {missing[0]}")
    return [rows[f] for f in files]


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
