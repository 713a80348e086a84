"""What each compressed variant costs and how well it does, measured the same way for all:
parameters, MACs, file size, the task's primary metric on the validation split (top-1
accuracy, mIoU, mAP) as each variant is made, and at the end CPU latency per batch size for
all of them at once, the variants taking turns (``time_all``), with the configured threads
and runtime: median and quartiles."""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray.data
import torch
from torch import nn

from raycv import model_stats
from raycv.config import AugmentConfig, LatencyConfig
from raycv.data.augment import normalize
from raycv.tasks import Task

log = logging.getLogger(__name__)


@dataclass
class Row:
    """One line of the compression table."""

    variant: str  # what was done, e.g. "channel 50 %, fine-tuned 3 epochs"
    method: str  # original, student, prune, quantize
    params: int
    nonzero_params: int
    macs: int
    file: str  # the saved model, relative to the compress run folder
    file_bytes: int  # its weights saved alone (fp32 state dict), or the int8 archive
    latency_ms: dict[str, float]  # batch size (as text: JSON keys) -> median ms
    metric: str  # the task's primary metric, e.g. val_acc, val_miou
    score: float  # its value on the validation split
    threads: int
    runtime: str
    epochs: int = 0  # fine-tuning epochs this row's model has had in this run
    # batch size -> [first quartile, third quartile] of the interleaved timings, in ms
    latency_spread_ms: dict[str, list[float]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Costs:
    params: int
    nonzero_params: int
    macs: int


def costs_of(model: nn.Module, image_size: int) -> Costs:
    return Costs(
        params=sum(p.numel() for p in model.parameters()),
        nonzero_params=sum(int(p.count_nonzero()) for p in model.parameters()),
        macs=model_stats.count_macs(model, image_size),
    )


class Measurer:
    """Measures variants one after another, on the same data and timing settings."""

    def __init__(
        self,
        val: ray.data.Dataset,
        task: Task,
        image_size: int,
        latency: LatencyConfig,
        batch_size: int,
        run_dir: Path,
        augment: AugmentConfig,
    ) -> None:
        self.val = val.materialize()  # prepared once, read by every variant
        self.augment = augment  # the normalisation the models were trained with
        self.task = task
        self.image_size = image_size
        self.latency = latency
        self.batch_size = batch_size
        self.run_dir = run_dir
        self.timed: list[tuple[Row, nn.Module]] = []  # every row, its model: time_all

    def row(
        self,
        variant: str,
        method: str,
        model: nn.Module,
        file: Path,
        costs: Costs | None = None,
        epochs: int = 0,
        file_bytes: int | None = None,
    ) -> Row:
        """``costs`` and ``file_bytes``: given for models whose weights are not parameters
        (int8 graphs); otherwise the parameters are counted and the state dict's bytes are
        what saving it alone writes (a checkpoint file also holds the optimizer). Latency
        is left to ``time_all``."""
        costs = costs or costs_of(model, self.image_size)
        lat = self.latency
        row = Row(
            variant=variant,
            method=method,
            params=costs.params,
            nonzero_params=costs.nonzero_params,
            macs=costs.macs,
            file=_relative(file, self.run_dir),
            file_bytes=file_bytes or _state_dict_bytes(model),
            latency_ms={},
            metric=self.task.primary.name,
            score=self.score(model),
            threads=lat.threads,
            runtime=lat.runtime,
            epochs=epochs,
        )
        log.info("%s: %s %.4f", variant, row.metric, row.score)
        self.timed.append((row, model))
        return row

    def time_all(self) -> None:
        """Every row's latency at each batch size, all models taking turns (so that the
        machine's busy moments hit every variant alike): median and quartiles."""
        lat = self.latency
        rows, models = zip(*self.timed)
        for b in lat.batch_sizes:
            timings = model_stats.interleaved_latency_ms(
                models, self.image_size, b, lat.threads, lat.repeats, lat.warmup, lat.runtime
            )
            for row, t in zip(rows, timings):
                row.latency_ms[str(b)] = t.median
                row.latency_spread_ms[str(b)] = [t.q1, t.q3]
        for row in rows:
            log.info("%s: latency %s ms", row.variant, _fmt_latency(row.latency_ms))

    @torch.no_grad()
    def score(self, model: nn.Module) -> float:
        """The task's primary metric of ``model`` on the validation split, in one process."""
        model.eval()
        meter = self.task.evaluator()
        for b in self.val.iter_batches(batch_size=self.batch_size, batch_format="numpy"):
            batch = tensors(b, self.augment)
            outputs = self.task.forward(model, batch)
            meter.process(batch, outputs, self.task.loss(outputs, batch))
        return meter.evaluate("val")[self.task.primary.name]


def tensors(batch: dict[str, np.ndarray], augment: AugmentConfig) -> dict[str, torch.Tensor]:
    """A Ray Data NumPy batch as the tensors a task reads (numeric columns only), its
    uint8 images normalised as ``augment`` says."""
    # Ray Data hands out read-only arrays, which torch warns about: copy only those.
    numeric = {k: v for k, v in batch.items() if v.dtype.kind in "biuf"}
    out = {k: torch.from_numpy(np.require(v, requirements="W")) for k, v in numeric.items()}
    return out | {"image": normalize(out["image"], augment)}


def _state_dict_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def _relative(file: Path, base: Path) -> str:
    try:
        return file.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(file.resolve())


def _fmt_latency(latency: dict[str, float]) -> str:
    return ", ".join(f"{ms:.1f} (batch {b})" for b, ms in latency.items())
