"""The per-worker training loop that every stage shares.

Ray Train runs ``train_func`` on each worker (or in-process with ``--local``):
build the model, wrap it for DDP, restore the last checkpoint, then for each epoch
train on this worker's shard of the Ray Data stream, validate, and report."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from raycv import checkpoint, model_stats, verbosity
from raycv.checkpoint import unwrap as model_of
from raycv.config import Config
from raycv.data.augment import normalize
from raycv.data.pipeline import preset_of
from raycv.distill import Teacher, load_teacher
from raycv.errors import NonFiniteLossError
from raycv.finetune.sources import load_source_weights
from raycv.finetune.strategies import FineTuning
from raycv.models import create_model
from raycv.optim import build_optimizer, build_scheduler, scaled_lr
from raycv.progress import EpochProgress, val_steps
from raycv.pruning import PRUNERS, prune_model
from raycv.runs import MetricsRecorder, RunFolder
from raycv.tasks import Task, build_task, total
from raycv.trackers import Tracker
from raycv.trackers import open_all as open_trackers

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class RunInfo:
    """What the driver learned before launching: sent to every worker with the config."""

    run_dir: str
    class_names: list[str]
    num_train: int
    local: bool = False
    num_val: int = 0
    progress: str = "off"  # progress.mode(): bar, lines or off, as the driver's terminal allows


@dataclass
class State:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    # ``train.ema_decay``: the averaged weights, what validation scores and "model" keeps
    ema: AveragedModel | None = None

    def step_done(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(model_of(self.model))

    def to_dict(self, epoch: int, cfg: Config, info: RunInfo, metrics: dict) -> dict[str, Any]:
        # With an average, "model" is the averaged weights (what eval, export and --from
        # load) and "trained" the optimizer's own, which a resumed run continues from.
        trained = {"trained": model_of(self.model).state_dict()} if self.ema else {}
        return {
            "model": model_of(self.ema.module if self.ema else self.model).state_dict(),
            **trained,
            "optimizer": self.optimizer.state_dict(),
            # The schedule itself is rebuilt from the config; its objects are not weights.
            "scheduler": {
                k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"
            },
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "class_names": info.class_names,
            "config": cfg.model_dump(mode="json"),
            "metrics": metrics,
        }

    def restore(self, saved: dict[str, Any]) -> None:
        model_of(self.model).load_state_dict(saved.get("trained", saved["model"]))
        if self.ema is not None:
            self.ema.module.load_state_dict(saved["model"])
            self.ema.n_averaged.fill_(1)  # average on from here: no copy at the next step
        self.optimizer.load_state_dict(saved["optimizer"])
        lambdas = [None] * len(self.scheduler.lr_lambdas)
        self.scheduler.load_state_dict({**saved["scheduler"], "lr_lambdas": lambdas})
        self.scaler.load_state_dict(saved["scaler"])


def steps_per_epoch(cfg: Config, num_train: int) -> int:
    """Optimizer steps per epoch: equal on every worker (DDP needs that) and the same for
    any number of workers, so that an elastic run that resizes keeps its schedule. Each
    worker's equal shard (num_train // world images) holds them: the local batch is
    batch_size // world."""
    return num_train // (cfg.train.batch_size * cfg.train.grad_accum_steps)


def train_func(payload: dict[str, Any]) -> None:
    _quiet_report_lines()
    verbosity.configure(verbose_flag=False)  # RAYCV_LOG_LEVEL came with the env: progress lines
    cfg = Config.model_validate(payload["config"])
    info = RunInfo(**payload["run"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()

    # 1. Model (from pretrained weights and pruned, as configured).
    task = build_task(cfg, info.class_names)
    model = build_model(cfg, len(info.class_names))
    # What the model costs, measured once before training (rank 0 alone, so that the
    # latency is not timed while another worker competes for the same cores).
    stats = (
        model_stats.as_metrics(model_stats.measure(model, cfg.model.image_size))
        if rank == 0
        else {}
    )
    torch.manual_seed(cfg.seed + rank)  # after building: every rank must build the same model
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)

    # 2. The last checkpoint: Ray hands it back after a restart or resume.
    saved = _last_checkpoint(info)
    start_epoch = int(saved["epoch"]) if saved else 0

    # 3. Freeze what this epoch's fine-tune strategy freezes, then wrap in DDP (gloo on
    # CPU, NCCL on GPU): DDP syncs only the parameters that train when it is built.
    tuning = FineTuning(cfg)
    frozen = tuning.frozen(start_epoch + 1)
    tuning.set_trainable(model, frozen)
    model = ray.train.torch.prepare_model(model)
    state = _build_state(model, cfg, info, device, tuning.lr_scales(model_of(model)))
    PRUNERS.get(cfg.prune.method).attach(model_of(model), state.optimizer)
    if saved:
        state.restore(saved)
    model = _compiled(model, cfg, device)

    # 3. This worker's shard of each Ray Data stream.
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    teacher = load_teacher(cfg.distill, device)  # None unless distilling
    steps = steps_per_epoch(cfg, info.num_train)
    for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
        start_reading(payload["epoch_clock"], epoch, rank)
        if tuning.frozen(epoch) != frozen:  # gradual unfreezing: the backbone joins in
            frozen = tuning.frozen(epoch)
            tuning.set_trainable(model_of(model), frozen)
            state.model = ray.train.torch.prepare_model(model_of(model))
            model = _compiled(state.model, cfg, device)  # model_of took the compiled wrapper off
        tuning.train_mode(model_of(model), frozen)
        shown = _progress(info, cfg, rank, epoch, "train", steps)
        metrics = train_one_epoch(
            model, state, task, train_shard, cfg, device, steps, teacher, shown
        )
        scored = state.ema.module if state.ema else model  # what the checkpoint keeps
        shown = _progress(info, cfg, rank, epoch, "val", val_steps(info.num_val, cfg))
        metrics |= evaluate(scored, task, val_shard, cfg, device, shown)
        node = ray.get_runtime_context().get_node_id()
        metrics = {"epoch": epoch, **metrics, **stats, "node": node}
        # 4. Report from every worker; rank 0 alone attaches the checkpoint.
        _report(metrics, state.to_dict(epoch, cfg, info, metrics) if rank == 0 else None, cfg, info)


def _compiled(model: nn.Module, cfg: Config, device) -> nn.Module:
    """``train.compile``: the (DDP-wrapped) model compiled, on CUDA (the config refuses it
    without GPUs)."""
    return torch.compile(model) if cfg.train.compile and device.type == "cuda" else model


def _progress(info: RunInfo, cfg: Config, rank: int, epoch: int, phase: str, steps: int):
    """What this worker shows of a pass: rank 0 what the driver asked for, the others none."""
    how = info.progress if rank == 0 else "off"
    every_s = cfg.run.progress_every_s
    return EpochProgress(how, phase, f"{epoch}/{cfg.train.epochs}", steps, every_s)


def start_reading(clock, epoch: int, rank: int) -> None:
    """Name the epoch to the training stream (data/order.py) before any worker reads it:
    its order is drawn from the seed and this number, so a resumed run reads on in the
    order the uninterrupted run would have."""
    if rank == 0:
        ray.get(clock.set.remote(epoch))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no worker's first read may reach the stream before the clock moved


def _quiet_report_lines() -> None:
    """Ray Train logs every report with all its metrics at INFO, from a logger named by its
    file path that ``LoggingConfig`` does not reach; the controller prints our progress."""
    from ray.train.v2._internal.execution import context

    context.logger.setLevel(logging.WARNING)


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """The configured model, filled from ``finetune.source`` with fresh heads, then pruned
    at ``prune.ratio``. Seeded, so that every worker (and a resumed run) builds the same
    weights and therefore prunes the same channels."""
    torch.manual_seed(cfg.seed)
    model = create_model(
        cfg.model.name, num_classes, cfg.model.weights, cfg.model.image_size, cfg.model.encoder
    )
    if cfg.finetune.source:
        load_source_weights(model, cfg, num_classes)
    return prune_model(model, cfg.model.name, cfg.prune, cfg.model.image_size)


def _build_state(
    model: nn.Module, cfg: Config, info: RunInfo, device, lr_scales: dict[str, float]
) -> State:
    global_batch = cfg.train.batch_size * cfg.train.grad_accum_steps
    lr = scaled_lr(cfg.optimizer.lr, cfg.train.lr_scaling, global_batch, cfg.train.base_batch_size)
    optimizer = build_optimizer(model_of(model), cfg.optimizer, lr, lr_scales)
    steps = steps_per_epoch(cfg, info.num_train)
    scheduler = build_scheduler(optimizer, cfg.scheduler, steps, cfg.train.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    decay = cfg.train.ema_decay
    ema = None
    if decay:  # buffers too: BatchNorm's statistics averaged alike, as the weights they go with
        ema = AveragedModel(
            model_of(model), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True
        )
    return State(model, optimizer, scheduler, scaler, ema)


def _last_checkpoint(info: RunInfo) -> dict[str, Any] | None:
    """The checkpoint to continue from (None for a fresh run)."""
    found = ray.train.get_checkpoint()
    if found is not None:
        with found.as_directory() as d:
            return checkpoint.load_latest_good(d)  # a corrupt latest: the one before
    if info.local:  # local mode persists its own checkpoints; Ray does not hand them back
        saved = checkpoint.checkpoint_epochs(RunFolder(Path(info.run_dir)).checkpoints)
        if saved:
            return checkpoint.load_latest_good(saved)
    return None


def train_one_epoch(
    model,
    state: State,
    task: Task,
    shard,
    cfg: Config,
    device,
    steps: int,
    teacher: Teacher | None,
    progress: EpochProgress,
) -> dict:
    """One epoch of steps; the caller has put the model in training mode. With a
    ``teacher``, the loss that trains blends in its soft targets."""
    accum = cfg.train.grad_accum_steps
    batches = _timed(_batches(shard, cfg, device, train=True))
    meter = task.evaluator()
    parts = LossParts()
    waited, first_batch_s = 0.0, None
    started_at = time.time()  # wall clock: benchmarks measure start-up against it
    started = time.perf_counter()
    world = ray.train.get_context().get_world_size()
    step_images = accum * (cfg.train.batch_size // world) * world  # all workers together
    for step in range(steps):
        step_waited = 0.0
        for micro in range(accum):
            batch, seconds = next(batches)
            step_waited += seconds
            first_batch_s = step_waited if first_batch_s is None else first_batch_s
            sync = micro == accum - 1 or not isinstance(model, nn.parallel.DistributedDataParallel)
            with contextlib.nullcontext() if sync else model.no_sync():
                outputs, losses = _forward(model, task, batch, cfg, device, teacher)
                loss = total(losses)
                _check_finite(loss, step, cfg)
                state.scaler.scale(loss / accum).backward()
            meter.process(batch, outputs, losses)
            parts.add(losses)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.optimizer.zero_grad(set_to_none=True)
        state.scheduler.step()
        state.step_done()
        waited += step_waited
        progress.step(step_images, step_waited, loss)
    for _ in batches:  # drain the equal-split tail so the next epoch starts clean
        pass
    progress.close()
    elapsed = time.perf_counter() - started
    meter.sync(device)
    return {
        **meter.evaluate("train"),
        **parts.means("train", device),
        "lr": state.optimizer.param_groups[0]["lr"],
        "images_per_s": steps * step_images / elapsed,
        "data_wait": waited / elapsed,
        "epoch_s": elapsed,
        "epoch_started_at": started_at,
        "first_batch_s": first_batch_s,
    }


def _check_finite(loss: torch.Tensor, step: int, cfg: Config) -> None:
    # fp16 overflows are the GradScaler's business; anything else non-finite is divergence.
    if cfg.train.precision != "fp16" and not torch.isfinite(loss.detach()):
        raise NonFiniteLossError(
            f"the loss became {loss.item()} at step {step + 1}: training diverged; start a new "
            f"run with a lower optimizer.lr (now {cfg.optimizer.lr:g}); --resume would keep it"
        )


@torch.no_grad()
def evaluate(model, task: Task, shard, cfg: Config, device, progress: EpochProgress) -> dict:
    """The validation metrics, with the pass's seconds (``val_s``) and, of those, what
    combining and scoring the workers' states took (``val_metric_s``: COCO mAP's share)."""
    started = time.perf_counter()
    model.eval()
    _share_buffers(model)
    meter = task.evaluator()
    world = ray.train.get_context().get_world_size()
    for batch, waited in _timed(_batches(shard, cfg, device, train=False)):
        outputs, losses = _forward(model, task, batch, cfg, device)
        meter.process(batch, outputs, losses)
        # A detector in eval mode returns boxes and no losses: its bar shows no loss.
        progress.step(len(batch["image"]) * world, waited, total(losses) if losses else None)
    progress.close()
    scoring = time.perf_counter()
    meter.sync(device)
    metrics = meter.evaluate("val")
    done = time.perf_counter()
    return {**metrics, "val_s": done - started, "val_metric_s": done - scoring}


def _share_buffers(model) -> None:
    """Every worker validates with rank 0's BatchNorm statistics, those its checkpoint
    keeps. DDP copies them from rank 0 before each training step only, so each worker's
    last step left its own: the shards would be scored by slightly different models, and
    the recorded metric would not be the saved model's."""
    if dist.is_available() and dist.is_initialized():
        for buffer in model_of(model).buffers():
            dist.broadcast(buffer, src=0)


def _forward(model, task: Task, batch, cfg: Config, device, teacher: Teacher | None = None):
    """(raw outputs, named loss parts); with a ``teacher``, its soft targets blend in.
    The stream's uint8 images become the model's normalised floats here, on ``device``."""
    batch = {**batch, "image": normalize(batch["image"], cfg.augment, cfg.train.channels_last)}
    amp = AMP_DTYPES.get(cfg.train.precision)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        outputs = task.forward(model, batch)
        losses = task.loss(outputs, batch)
        if teacher is not None:
            losses = teacher.blend(task, losses, outputs, batch)
    return outputs, losses


class LossParts:
    """Each named loss part's mean over an epoch, when there is more than one part (the
    total is the task evaluator's ``*_loss``)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().item()
        self.count += 1

    def means(self, prefix: str, device) -> dict[str, float]:
        if len(self.sums) < 2:
            return {}
        sums = torch.tensor([*self.sums.values(), self.count], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            sums = sums.to(device)
            dist.all_reduce(sums)
        *values, count = sums.cpu().tolist()
        return {f"{prefix}_loss/{k}": v / max(count, 1) for k, v in zip(self.sums, values)}


def _batches(shard, cfg: Config, device, train: bool):
    """The shard's batches on ``device``; with ``augment.where=worker`` they are augmented
    or prepared here, on the device, and the time counts as waiting for data."""
    world = ray.train.get_context().get_world_size()
    batches = shard.iter_torch_batches(
        batch_size=cfg.train.batch_size // world,
        prefetch_batches=cfg.train.prefetch_batches,
        drop_last=train,  # a 1-image tail batch breaks BatchNorm in training mode
        device=device,
    )
    if cfg.augments_on_worker:
        preset = preset_of(cfg, train=train)
        return (preset.apply(batch) for batch in batches)
    return iter(batches)


def _timed(batches):
    """Each batch with the seconds spent waiting for it."""
    while True:
        started = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            return
        yield batch, time.perf_counter() - started


def _report(metrics: dict, saved: dict | None, cfg: Config, info: RunInfo) -> None:
    name = checkpoint.epoch_dir_name(metrics["epoch"])
    if info.local:
        # Ray's local mode keeps checkpoints in memory only: write them into the run folder.
        run = RunFolder(Path(info.run_dir))
        folder = _mkdir(run.checkpoints / name)
        checkpoint.save(folder, saved)
        recorder(cfg, run, prune=True).record([metrics], str(folder))
        ray.train.report(metrics)
        return
    if saved is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save(d, saved)
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name
        )


def recorder(
    cfg: Config, run: RunFolder, prune: bool = False, trackers: list[Tracker] | None = None
) -> MetricsRecorder:
    """The run's recorder; ``trackers``: those the driver started (default: the config's,
    with the run ids its folder keeps: --local records in the driver's own process)."""
    c = cfg.checkpoint
    trackers = open_trackers(cfg, run) if trackers is None else trackers
    return MetricsRecorder(run, cfg.train.epochs, c.keep, c.metric, c.mode, prune, trackers)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
