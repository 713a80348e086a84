"""``raycv compress ARTIFACT``: a trained model made smaller and faster, step by step, each
step measured.

The steps run in this order, each on the model the previous one left (``STEPS``):

1. ``student``: a smaller registered model trained on the same data, distilled from the
   teacher (``distill.teacher``, else the artifact itself);
2. ``prune``: ``compress.steps`` rounds of pruning (on the driver, so every worker starts
   from the same channels, and Taylor importance can see training images) each followed
   by ``compress.epochs`` epochs of fine-tuning, a Ray Train run of the shared loop
   (distilled when ``distill.teacher`` is set);
3. ``quantize``: post-training int8, calibrated on training images.

Every model along the way is saved under ``variants/`` and measured by ``Measurer``; the
table lands in ``compression.{csv,json,md}``. The fine-tuning runs live in ``steps/``; a
re-run of the same folder (``--resume``, or a resumed pipeline) reuses finished ones.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raycv import checkpoint
from raycv.artifacts import (
    Trained,
    checkpoint_file,
    load_checkpoint,
    load_trained,
    read_manifest,
)
from raycv.compress.measure import Measurer, Row, costs_of, tensors
from raycv.compress.table import write_outputs
from raycv.config import (
    Config,
    ConfigError,
    PruneConfig,
    dump_config,
    validate,
    with_overrides,
)
from raycv.data.pipeline import Streams
from raycv.distill import resolve_teacher
from raycv.evaluate import streams_for
from raycv.pruning import IMPORTANCES, prune_model
from raycv.registry import Registry
from raycv.runs import RunFolder, require_path, write_manifest
from raycv.sweep.space import apply_sample
from raycv.tasks import TASKS, Task, build_task, total

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 32


@dataclass
class Current:
    """The model as the steps so far have left it."""

    model: nn.Module
    checkpoint: Path  # its raycv checkpoint file (fp32), the next step's source
    config: Config  # the config it was trained with (model name, preprocessing)
    epochs: int = 0  # fine-tuning epochs spent on it in this compress run


@dataclass
class Compression:
    cfg: Config
    run: RunFolder
    class_names: list[str]
    streams: Streams
    task: Task
    measurer: Measurer
    current: Current
    local: bool
    rows: list[Row] = field(default_factory=list)
    histories: list[Path] = field(default_factory=list)  # fine-tuning runs, in order
    quantized: Path | None = None

    def task_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The task's training loss of ``model`` on ``batch`` (Taylor importance, QAT). A
        detector computes its loss only in training mode: the top module alone is flagged
        so, and BatchNorm below keeps the statistics it was trained with."""
        was_training = model.training
        model.training = True
        try:
            return total(self.task.loss(self.task.forward(model, batch), batch))
        finally:
            model.training = was_training


@dataclass(frozen=True)
class Step:
    wanted: Callable[[Config], bool]
    run: Callable[[Compression], None]


STEPS: Registry[Step] = Registry("compression step")


def run_compress(
    artifact: str | Path, cfg: Config, *, local: bool = False, at: Path | None = None
) -> RunFolder:
    """Compress ``artifact`` as ``cfg.compress`` says; ``cfg`` also gives the data, the
    fine-tuning recipe and the teacher. ``at`` fixes the run folder (a pipeline's stage)."""
    if not cfg.compress.requested:
        raise ConfigError(
            "nothing to compress: give --prune METHOD:RATIO, --quantize int8 or --student MODEL"
        )
    original = load_trained(artifact)
    cfg = resolve_teacher(_default_teacher(cfg, original))
    run = _run_folder(cfg, at)
    started = time.time()
    log.info("compressing %s into %s", original.checkpoint, run.path)
    streams = streams_for(original, cfg)  # starts Ray; the data must hold the model's classes
    write_manifest(run, cfg, "running", {}, kind="compress", parent=str(original.checkpoint))
    job = _start(cfg, run, original, streams, local)
    for name in ("student", "prune", "quantize"):
        if STEPS.get(name).wanted(cfg):
            STEPS.get(name).run(job)
    job.measurer.time_all()
    write_outputs(job, time.time() - started)
    return run


def _default_teacher(cfg: Config, original: Trained) -> Config:
    """``compress.distill``: the model compressed teaches its compressed variants. On scarce
    data its soft targets keep more of its accuracy through pruning than the labels alone
    (docs/benchmarks.md: 36.7 % against 30.0 %)."""
    if cfg.distill.teacher or not cfg.compress.distill or not TASKS.get(cfg.task).distills:
        return cfg
    raw = cfg.model_dump(mode="json")
    raw["distill"]["teacher"] = str(original.checkpoint)
    return validate(raw)


def compress_config(artifact: str | Path, overrides: list[str], settings: dict[str, Any]) -> Config:
    """The artifact's own config with ``overrides`` (``key=value`` text) and ``settings``
    (dotted key -> value, set as given: a path must not be parsed as YAML) applied."""
    raw = load_checkpoint(checkpoint_file(artifact))["config"]
    cfg = validate(apply_sample(with_overrides(raw, overrides), settings))
    require_path(cfg.run.storage, "raycv compress")
    return cfg


def resume_folder(cfg: Config, resume: str | bool) -> Path:
    """The compress run to continue: the newest of the experiment, or the one named."""
    name = None if resume is True else resume
    return RunFolder.find(cfg.run.storage, cfg.experiment, "compress", name).path


def _run_folder(cfg: Config, at: Path | None) -> RunFolder:
    if at is None:
        run = RunFolder.create(cfg.run.storage, cfg.experiment, "compress")
    else:
        at.mkdir(parents=True, exist_ok=True)
        run = RunFolder(at)
    run.config.write_text(dump_config(cfg))
    return run


def _start(cfg: Config, run: RunFolder, original: Trained, streams: Streams, local: bool):
    task = build_task(cfg, original.class_names)
    measurer = Measurer(
        streams.val,
        task,
        cfg.model.image_size,
        cfg.compress.latency,
        cfg.train.batch_size,
        run.path,
        cfg.augment,
    )
    current = Current(original.model, original.checkpoint, original.config)
    job = Compression(cfg, run, original.class_names, streams, task, measurer, current, local)
    job.rows.append(measurer.row("original", "original", original.model, original.checkpoint))
    return job


# --------------------------------------------------------------------------- the steps


def _student(job: Compression) -> None:
    c = job.cfg.compress
    teacher = job.cfg.distill.teacher or str(job.current.checkpoint)
    raw = _recipe(job, epochs=c.epochs, source=None, teacher=teacher)
    raw["model"] |= {"name": c.student, "weights": None}
    folder = _train(job, "student", validate(raw))
    _advance(job, folder, c.epochs)
    job.rows.append(_measure(job, f"student {c.student}, distilled {_epochs(c.epochs)}", "student"))


def _prune(job: Compression) -> None:
    c = job.cfg.compress
    for step in range(1, c.steps + 1):
        done = f"{step}/{c.steps}" if c.steps > 1 else "one-shot"
        label = f"{c.prune.method} {c.prune.ratio:.0%} ({done})"
        pruned = _pruned_checkpoint(job, step)
        job.current = Current(
            load_trained(pruned).model, pruned, job.current.config, job.current.epochs
        )
        job.rows.append(_measure(job, f"{label}, before fine-tuning", "prune"))
        raw = _recipe(job, epochs=c.epochs, source=str(pruned), teacher=job.cfg.distill.teacher)
        raw["prune"] = {"method": c.prune.method, "ratio": 0.0}  # l1 keeps its zeros (attach)
        folder = _train(job, f"prune-{step}", validate(raw))
        _advance(job, folder, c.epochs)
        tuned = f"{label}, fine-tuned {_epochs(job.current.epochs)}"
        job.rows.append(_measure(job, tuned, "prune"))


def _quantize(job: Compression) -> None:
    """Post-training int8, then (``compress.qat_epochs``) quantization-aware fine-tuning of
    the same fp32 model: one row each, so the table shows what the extra epochs buy."""
    from raycv.quantization import quantize, quantize_aware

    c, size = job.cfg.compress, job.cfg.model.image_size
    images = [batch["image"] for batch in _training_batches(job)]
    label = f"{c.quantize} post-training ({sum(map(len, images))} calibration images)"
    _save_quantized(job, quantize(job.current.model, images, size, c.quantize), label, "")
    if c.qat_epochs:
        lr = 0.1 * (c.lr or job.cfg.optimizer.lr)  # a nudge: the weights are trained already
        graph = quantize_aware(
            job.current.model,
            lambda: _augmented_batches(job),
            job.task_loss,
            size,
            c.qat_epochs,
            lr,
            c.quantize,
        )
        label = f"{c.quantize} quantization-aware, {_epochs(c.qat_epochs)}"
        _save_quantized(job, graph, label, "-qat", c.qat_epochs)


def _save_quantized(job: Compression, graph, label: str, suffix: str, epochs: int = 0) -> None:
    from raycv.quantization import load_quantized, save_quantized

    size = job.cfg.model.image_size
    path = _mkdir(job.run.path / "variants") / f"{job.cfg.compress.quantize}{suffix}.pt2"
    save_quantized(graph, torch.zeros(2, 3, size, size), path)
    reloaded = load_quantized(path)  # measured as deployed: from the saved file
    costs = costs_of(job.current.model, size)  # int8 weights are constants, not parameters
    total = job.current.epochs + epochs
    row = job.measurer.row(label, "quantize", reloaded, path, costs, total, path.stat().st_size)
    job.rows.append(row)
    job.quantized = path


STEPS.add("student", Step(lambda cfg: cfg.compress.student is not None, _student))
STEPS.add("prune", Step(lambda cfg: cfg.compress.prune.ratio > 0, _prune))
STEPS.add("quantize", Step(lambda cfg: cfg.compress.quantize is not None, _quantize))


# ------------------------------------------------------------------------------ helpers


def _recipe(job: Compression, *, epochs: int, source: str | None, teacher: str | None) -> dict:
    """The fine-tuning config: the current model's recipe and the given data, every layer
    at one learning rate (pruning disturbed all of them), for ``epochs`` epochs."""
    c = job.cfg.compress
    raw = job.current.config.model_dump(mode="json")
    given = job.cfg.model_dump(mode="json")
    for section in ("data", "scaling", "run", "checkpoint"):
        raw[section] = given[section]  # the data and cluster of this job, not of the artifact's
    raw["experiment"] = job.cfg.experiment
    raw["finetune"] = {"source": source}
    raw["distill"] = {**given["distill"], "teacher": teacher}
    raw["prune"] = {"ratio": 0.0}
    raw["train"]["epochs"] = epochs
    raw["optimizer"]["lr"] = c.lr or job.cfg.optimizer.lr
    for section in ("compress", "pipeline", "tune"):
        raw.pop(section, None)
    return raw


def _train(job: Compression, name: str, cfg: Config) -> Path:
    """A fine-tuning run in ``steps/<name>``; a finished one is reused as it is."""
    from raycv.train import run_train

    folder = job.run.path / "steps" / name
    if (read_manifest(folder) or {}).get("status") != "finished":
        stage = "finetune" if cfg.finetune.source else "train"
        run_train(cfg, local=job.local, stage=stage, at=folder)
    job.histories.append(folder)
    return folder


def _advance(job: Compression, folder: Path, epochs: int) -> None:
    trained = load_trained(folder)
    job.current = Current(
        trained.model, checkpoint_file(folder), trained.config, job.current.epochs + epochs
    )


def _measure(job: Compression, variant: str, method: str) -> Row:
    cur = job.current
    return job.measurer.row(variant, method, cur.model, cur.checkpoint, epochs=cur.epochs)


def _pruned_checkpoint(job: Compression, step: int) -> Path:
    """The current model pruned by this step's share, saved as a raycv checkpoint; written
    once, so a resumed run fine-tunes exactly the channels it chose before."""
    folder = _mkdir(job.run.path / "variants" / f"pruned-{step}")
    path = folder / checkpoint.CHECKPOINT_FILE
    if path.is_file():
        return path
    c = job.cfg.compress
    # Each step keeps the same share of what is left, so that the steps end at the ratio.
    share = 1 - (1 - c.prune.ratio) ** (1 / c.steps)
    step_cfg = PruneConfig(**{**c.prune.model_dump(), "ratio": share})
    model = copy.deepcopy(job.current.model)
    needs_data = IMPORTANCES.get(step_cfg.importance).needs_gradients
    batches = [_summed(job, b) for b in _training_batches(job)] if needs_data else ()
    cfg = job.current.config
    prune_model(model, cfg.model.name, step_cfg, cfg.model.image_size, batches)
    saved = {
        "model": model.state_dict(),
        "class_names": job.class_names,
        "config": _with_prune_off(cfg),
        "epoch": 0,
        "metrics": {},
    }
    checkpoint.save(folder, saved)
    return path


def _with_prune_off(cfg: Config) -> dict[str, Any]:
    # The saved shapes are the pruning; loading must not prune again.
    raw = cfg.model_dump(mode="json")
    raw["prune"]["ratio"] = 0.0
    return raw


def _augmented_batches(job: Compression):
    """One epoch of the training stream, augmented as for training."""
    for b in job.streams.train.iter_batches(
        batch_size=job.cfg.train.batch_size, batch_format="numpy", drop_last=True
    ):
        # where the workers augment, the stream holds the working-size images
        yield tensors(job.streams.augment(b) if job.cfg.augments_on_worker else b, job.cfg.augment)


def _training_batches(job: Compression) -> list[dict[str, torch.Tensor]]:
    """``compress.calibration_images`` training images drawn at random and stratified by
    class (a class-sorted folder's first images would all be one class), prepared as for
    evaluation."""
    n = job.cfg.compress.calibration_images
    stream = job.streams.train_sample(n, job.cfg.seed)
    return [
        tensors(b, job.cfg.augment)
        for b in stream.iter_batches(batch_size=CALIBRATION_BATCH, batch_format="numpy")
    ]


def _summed(job: Compression, batch: dict[str, torch.Tensor]):
    """``batch``'s task loss summed over its images, as a function of the model (Taylor)."""
    return lambda model: job.task_loss(model, batch) * len(batch["image"])


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
