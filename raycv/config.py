"""The one typed config tree: loaded from YAML, overridden with dotted ``key=value``
arguments, validated before Ray starts, and written back as resolved YAML."""

from __future__ import annotations

import copy
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from raycv.redact import REDACTED, MissingSecretError, is_secret, redact, unredact
from raycv.storage import credentials_in, is_uri

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A config problem, described in one line that names the key and the fix."""


class Section(BaseModel):
    # Unknown keys are errors: a typo must never be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ShapesConfig(Section):
    num_images: int = Field(2000, ge=10, description="images generated (train + val)")
    image_size: int = Field(64, ge=16, le=1024, description="side of each generated image")
    num_classes: int = Field(6, ge=2, le=12, description="shape classes used (the first N)")
    classes: list[str] | None = Field(
        None, description="shape classes by name, in label order (instead of num_classes)"
    )
    difficulty: Literal["easy", "medium", "hard"] = "easy"
    seed: int = 0

    @model_validator(mode="after")
    def _classes(self) -> ShapesConfig:
        if self.classes is not None:
            from raycv.data.shapes import class_names

            class_names(self.num_classes, self.classes)  # raises naming the valid shapes
        return self


class FolderConfig(Section):
    root: str | None = Field(None, description="ImageFolder root: local path or pyarrow URI")
    train_split: str = "train"
    val_split: str = "val"
    train_images: Literal["whole", "centre_crop"] = Field(
        "whole",
        description="training images cached whole, so random crops reach every side of a "
        "non-square photo, or centre-cropped to a square once (validation always is)",
    )


class MaskFolderConfig(Section):
    """Images and segmentation masks paired by file stem; the layout is found by itself
    (data/mask_layouts.py); the keys below override what it finds."""

    root: str | None = Field(None, description="folder of images and masks: local path or URI")
    images: str | None = Field(None, description="sub-folder of the images (default: found)")
    masks: str | None = Field(None, description="sub-folder of the masks (default: found)")
    mask_suffix: str | None = Field(
        None, description="what a mask's stem adds to its image's, e.g. _mask (default: found)"
    )
    train_split: str = "train"
    val_split: str = "val"
    classes: list[str] | None = Field(
        None,
        description="class names in pixel-value order, background first "
        "(default: classes.txt in the root)",
    )
    palette: list[tuple[int, int, int]] | None = Field(
        None,
        description="colour-coded RGB masks: the RGB colour of each class, in class order",
    )


class BoxFolderConfig(Section):
    """Detection annotations in one of the common formats (data/box_formats.py); the
    layouts each format's exports use are found by themselves."""

    root: str | None = Field(None, description="dataset root: local path or pyarrow URI")
    train_split: str = "train"
    val_split: str = Field(
        "val", description="validation split (absent: data.val_fraction of the training images)"
    )
    classes: list[str] | None = Field(
        None,
        description="class names, in id order (default: the annotations' own: COCO "
        "categories, VOC names sorted, YOLO data.yaml)",
    )


class DataConfig(Section):
    source: str = Field("shapes", description="data source (see raycv.data.sources.SOURCES)")
    shapes: ShapesConfig = ShapesConfig()
    folder: FolderConfig = FolderConfig()
    mask_folder: MaskFolderConfig = MaskFolderConfig()
    coco: BoxFolderConfig = Field(BoxFolderConfig(), description="detection: COCO json")
    voc: BoxFolderConfig = Field(BoxFolderConfig(), description="detection: Pascal VOC xml")
    yolo: BoxFolderConfig = Field(BoxFolderConfig(), description="detection: YOLO txt")
    ignore_index: int = Field(
        255,
        ge=0,
        le=255,
        description="segmentation: mask value left out of the loss and metrics",
    )
    max_boxes: int = Field(
        100,
        ge=1,
        description="detection: boxes kept per image (Ray Data carries them padded to this many)",
    )
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="share carved out for validation when there is no val split"
    )
    split_seed: int = 0
    working_size: int | None = Field(
        None, ge=8, description="side images are decoded and cached at (default: 1.15 x image_size)"
    )
    bad_images: Literal["skip", "fail"] = Field(
        "skip", description="skip and count unreadable files, or stop on the first one"
    )


class AugmentConfig(Section):
    train_preset: str = "classic"
    eval_preset: str = "eval"
    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.5, ge=0, le=1)
    rotation: float = Field(30.0, ge=0, le=180, description="max rotation, degrees")
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = Field(0.2, ge=0)
    contrast: float = Field(0.2, ge=0)
    saturation: float = Field(0.2, ge=0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    mosaic: float = Field(
        0.0,
        ge=0,
        le=1,
        description="detection: share of training samples made of four images tiled 2 x 2, "
        "boxes moved with them (0: off)",
    )
    mosaic_off_epochs: int = Field(
        0, ge=0, description="the last epochs train without mosaic, on whole images"
    )
    where: Literal["auto", "data", "worker"] = Field(
        "auto",
        description="where the train preset runs: data = Ray Data tasks on the cluster's CPUs; "
        "worker = each training worker, on its own device, between reading a batch and its "
        "step (and the eval preset likewise); auto = worker when the workers have GPUs, else "
        "data (faster on CPU, docs/benchmarks.md)",
    )

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        for key in ("scale", "ratio"):
            low, high = getattr(self, key)
            if not 0 < low <= high:
                raise ValueError(f"{key} must be (low, high) with 0 < low <= high, got {low, high}")
        if self.scale[1] > 1:
            raise ValueError(f"scale must lie in (0, 1], got {self.scale}")
        return self


class ModelConfig(Section):
    name: str = Field("resnet18", description="registered model (see `raycv models`)")
    weights: str | None = Field(None, description="torchvision weights name, e.g. DEFAULT")
    image_size: int = Field(64, ge=8, description="training crop side")
    encoder: str | None = Field(
        None,
        description="segmentation-models-pytorch models (unet, pspnet, deeplabv3plus): the "
        "encoder, e.g. resnet18, resnet34, mobilenet_v2, efficientnet-b0; yolo_n, yolo_s: the "
        "backbone, resnet18/34/50 or mobilenet_v3_small/large (default resnet18)",
    )


class OptimizerConfig(Section):
    name: str = "sgd"
    lr: float = Field(0.1, gt=0, description="learning rate at base_batch_size")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0, description="not applied to norm and bias params")
    betas: tuple[float, float] = (0.9, 0.999)


class SchedulerConfig(Section):
    name: str = "cosine"
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up length")
    step_size: int = Field(30, ge=1, description="epochs between decays (step)")
    gamma: float = Field(0.1, gt=0, le=1, description="decay factor (step)")


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1, description="global batch size, split over workers")
    grad_accum_steps: int = Field(1, ge=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    dice_weight: float = Field(
        0.0, ge=0, description="segmentation: weight of a Dice term added to cross-entropy"
    )
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none", description="scale optimizer.lr by (global batch / base_batch_size)"
    )
    base_batch_size: int = Field(256, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    prefetch_batches: int = Field(2, ge=0)
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="an exponential moving average of the weights, updated after every step "
        "with this decay, is what validation scores and checkpoints keep (0: off; 0.99 to "
        "0.9999, the longer the run the higher)",
    )


class ScalingConfig(Section):
    num_workers: int | tuple[int, int] = Field(
        1,
        description="Ray Train workers, or [min, max] for elastic training: start with what "
        "fits, at least min, and grow or shrink with the cluster (--local runs in-process)",
    )
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0, description="used when use_gpu is true")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    @field_validator("num_workers", mode="before")
    @classmethod
    def _number_or_pair(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)) and len(value) != 2:
            raise ValueError(f"give a number or [min, max], not {len(value)} values")
        return value

    @model_validator(mode="after")
    def _worker_range(self) -> ScalingConfig:
        if not 1 <= self.min_workers <= self.max_workers:
            got = list(self.num_workers) if self.elastic else self.num_workers
            raise ValueError(
                f"num_workers must be at least 1, or [min, max] with 1 <= min <= max (got {got})"
            )
        return self

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if self.elastic else self.num_workers

    @property
    def max_cpus(self) -> float:
        """The CPUs the workers reserve at their most (an elastic run's largest group)."""
        return self.max_workers * self.cpus_per_worker


class CheckpointConfig(Section):
    keep: int = Field(2, ge=1, description="latest checkpoints kept (the best is kept too)")
    metric: str | None = Field(
        None,
        description="metric that picks the best checkpoint (default: the task's, val_acc "
        "for classification, val_miou for segmentation)",
    )
    mode: Literal["max", "min"] | None = Field(None, description="default: the metric's own")


class PruneConfig(Section):
    method: str = Field("channel", description="registered pruner (see raycv.pruning.PRUNERS)")
    ratio: float = Field(
        0.0, ge=0, lt=1, description="share of channels (channel) or weights removed; 0 = off"
    )
    importance: Literal["l1", "l2", "taylor"] = Field(
        "l1",
        description="ranks channels: l1/l2 weight norm, or taylor (|weight x gradient| on "
        "training images; raycv compress only)",
    )
    global_pruning: bool | None = Field(
        None,
        description="rank across all layers (true) or prune each layer by the ratio (false); "
        "default: per layer for channel, across layers for l1_unstructured",
    )
    round_to: int = Field(8, ge=1, description="kept channel counts are multiples of this")


class FinetuneConfig(Section):
    source: str | None = Field(
        None,
        description="pretrained weights: a torchvision weights name (ResNet50_Weights.IMAGENET1K_V2"
        " or DEFAULT), a raycv run folder or checkpoint, or a .pt/.pth/.safetensors state dict",
    )
    strategy: str = Field("full", description="full, linear_probe or gradual")
    freeze_epochs: int = Field(1, ge=1, description="gradual: epochs the backbone stays frozen")
    backbone_lr_factor: float = Field(
        1.0, gt=0, le=1, description="backbone learning rate = head learning rate x this"
    )
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="layer-wise decay: the k-th block below the head gets lr x decay^k "
        "(instead of backbone_lr_factor)",
    )
    freeze_bn: bool = Field(False, description="keep the backbone's BatchNorm statistics fixed")


class DistillConfig(Section):
    teacher: str | None = Field(
        None,
        description="knowledge distillation: a raycv artifact (run folder or checkpoint) whose "
        "softened outputs the model learns too, on the same classes; none = off",
    )
    temperature: float = Field(4.0, gt=0, description="softmax temperature of both outputs")
    weight: float = Field(
        0.5, ge=0, le=1, description="loss = (1 - weight) x hard-label loss + weight x soft loss"
    )


class LatencyConfig(Section):
    batch_sizes: list[int] = Field([1, 32], min_length=1, description="batches timed")
    threads: int = Field(1, ge=1, description="torch threads while timing")
    repeats: int = Field(20, ge=1, description="timed runs; the median is reported")
    warmup: int = Field(3, ge=1, description="untimed runs first (compilation included)")
    runtime: Literal["inductor", "eager"] = Field(
        "inductor",
        description="inductor: torch.compile with freezing, the only runtime with int8 kernels; "
        "eager: plain PyTorch (int8 then runs slower than fp32)",
    )


class CompressConfig(Section):
    prune: PruneConfig = Field(
        PruneConfig(), description="pruning method, ratio (0 = none), importance, rounding"
    )
    steps: int = Field(
        1, ge=1, description="iterative pruning: prune and fine-tune this many times to the ratio"
    )
    epochs: int = Field(2, ge=1, description="fine-tuning epochs after each pruning step")
    lr: float | None = Field(
        None, gt=0, description="fine-tuning learning rate (default: optimizer.lr)"
    )
    student: str | None = Field(
        None, description="train this smaller registered model first, distilled from the teacher"
    )
    quantize: str | None = Field(None, description="post-training quantization: int8, or none")
    qat_epochs: int = Field(
        0, ge=0, description="then quantization-aware fine-tuning for this many epochs (0: none)"
    )
    calibration_images: int = Field(
        256, ge=1, description="training images that set int8 activation ranges (and Taylor)"
    )
    distill: bool = Field(
        True,
        description="fine-tune each compressed model distilled from the model compressed "
        "(distill.teacher, when set, instead), for tasks with a distillation loss "
        "(classification, segmentation)",
    )
    max_drop: float = Field(
        1.0,
        ge=0,
        description="the guard: the final model is the most compressed variant at most this "
        "many points of the task's metric below the model compressed (else that model)",
    )
    latency: LatencyConfig = LatencyConfig()

    @property
    def requested(self) -> bool:
        return self.prune.ratio > 0 or self.quantize is not None or self.student is not None


PIPELINE_STAGES = ("pretrain", "tune", "finetune", "scratch", "compress", "export", "report")


class PipelineConfig(Section):
    pretrain: dict[str, Any] | None = Field(
        None,
        description="dotted overrides of this config that make a source task to pretrain on; "
        "its model becomes finetune.source (none: use finetune.source as given)",
    )
    sweep: bool = Field(True, description="sweep tune.space on the target before fine-tuning")
    scratch: bool = Field(
        True, description="also train from scratch on the target with the same budget"
    )
    export: bool = Field(True, description="export TorchScript, ONNX and a model card")


class SpaceEntry(Section):
    """One searched key: exactly one of the sampling kinds."""

    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = Field(None, description="integers in [low, high)")

    @model_validator(mode="after")
    def _one_kind(self) -> SpaceEntry:
        given = [k for k, v in self if v is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of choice, grid, uniform, loguniform, randint (got {given})"
            )
        kind, value = given[0], getattr(self, given[0])
        if kind in ("choice", "grid") and not value:
            raise ValueError(f"{kind} needs at least one value")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind} needs low < high, got {list(value)}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform needs 0 < low, got {list(value)}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k, v in self if v is not None)

    @property
    def values(self) -> Any:
        return getattr(self, self.kind)


class TrialSchedulerConfig(Section):
    name: str = Field("asha", description="asha (early stopping) or fifo (full budget)")
    grace_period: int = Field(1, ge=1, description="asha: epochs every trial gets")
    reduction_factor: float = Field(3.0, gt=1, description="asha: keep 1/factor at each rung")


class ObjectiveConfig(Section):
    kind: str = Field("single", description="single, constraint or pareto")
    metric: str | None = Field(None, description="the quality metric (default: the task's)")
    mode: Literal["max", "min"] | None = Field(None, description="default: the metric's own")
    cost: Literal["macs", "latency_ms", "params"] = Field(
        "macs", description="constraint / second objective (always minimised)"
    )
    budget: float | None = Field(None, gt=0, description="constraint: cost must stay at or below")


class TuneConfig(Section):
    num_samples: int = Field(8, ge=1, description="trials (grid: repeats of the grid)")
    searcher: str = Field("optuna", description="optuna (TPE), random or grid")
    scheduler: TrialSchedulerConfig = TrialSchedulerConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="default: as many as the cluster's CPUs/GPUs fit"
    )
    max_retries: int = Field(1, ge=0, description="re-runs of a failed trial before it counts")
    seed: int = 0
    space: dict[str, SpaceEntry] = Field(
        default_factory=dict, description="dotted config key -> sampling, e.g. optimizer.lr"
    )

    @model_validator(mode="after")
    def _objective(self) -> TuneConfig:
        if self.objective.kind == "constraint" and self.objective.budget is None:
            raise ValueError(
                "objective.kind=constraint needs objective.budget (the largest allowed cost)"
            )
        return self


class MlflowConfig(Section):
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking server, database or file: store (default: "
        "MLFLOW_TRACKING_URI, else a file: store in <run.storage>/mlruns); no credentials "
        "here: MLflow reads them from the environment (MLFLOW_TRACKING_TOKEN, ...)",
    )
    experiment: str | None = Field(
        None, description="MLflow experiment the runs go to (default: the config's experiment)"
    )

    @model_validator(mode="after")
    def _store(self) -> MlflowConfig:
        uri = self.tracking_uri
        if not uri:  # unset: MLFLOW_TRACKING_URI, else the file: store under run.storage
            return self
        # A model validator: its error does not echo the value, which holds the credential.
        found = credentials_in(uri) if is_uri(uri) else None
        if found:
            raise ValueError(
                f"the tracking URI carries a credential ({found}): remove it and set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                "MLFLOW_TRACKING_TOKEN) in the environment"
            )
        from raycv.trackers import absolute_store

        absolute = absolute_store(uri)  # a run's processes start in other folders
        if absolute != uri:
            self.tracking_uri = absolute
        return self


class WandbConfig(Section):
    project: str | None = Field(
        None, description="W&B project (default: the config's experiment); team: WANDB_ENTITY"
    )
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto",
        description="auto: online when WANDB_API_KEY is set, else offline into the run "
        "folder's wandb/ (wandb sync uploads it later)",
    )


class RunConfig(Section):
    storage: str = Field(
        "runs",
        description="root of run folders: a local or shared path, or object storage "
        "(s3://bucket/prefix, gs://...; credentials from the environment)",
    )
    max_failures: int | None = Field(
        None,
        ge=-1,
        description="worker-failure restarts from the last checkpoint (-1: forever); "
        "default 0, or 3 with an elastic scaling.num_workers range (it resizes by restarting)",
    )
    progress_every_s: float = Field(
        30.0,
        gt=0,
        description="where output is not a terminal (a file, CI, job logs): a progress line "
        "this often within a long epoch (a terminal shows a bar instead)",
    )
    dashboard_host: str = Field(
        "127.0.0.1",
        description="address a local Ray's dashboard listens on; 0.0.0.0 opens it to the network",
    )
    loggers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        ["tensorboard"],
        description="experiment trackers each epoch's metrics go to (metrics.jsonl always): "
        "tensorboard (tb/), mlflow, wandb; mlflow and wandb are extras: pip install "
        "'raycv[mlflow]'",
    )
    mlflow: MlflowConfig = MlflowConfig()
    wandb: WandbConfig = WandbConfig()

    @field_validator("loggers")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        twice = sorted({name for name in value if value.count(name) > 1})
        if twice:
            raise ValueError(f"lists {', '.join(twice)} more than once")
        return value

    @model_validator(mode="after")
    def _no_credentials(self) -> RunConfig:
        # Every run folder keeps its config, and the URI is logged: no key may be in it.
        found = credentials_in(self.storage) if is_uri(self.storage) else None
        if found:
            raise ValueError(
                f"the storage URI carries a credential ({found}): remove it and set it "
                "in the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "GOOGLE_APPLICATION_CREDENTIALS) or use the machine's own role"
            )
        return self


class Config(Section):
    experiment: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    task: str = "classification"
    seed: int = 0
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    prune: PruneConfig = PruneConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    distill: DistillConfig = DistillConfig()
    compress: CompressConfig = CompressConfig()
    tune: TuneConfig = TuneConfig()
    pipeline: PipelineConfig = PipelineConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        _check_names(self)
        _fill_task_defaults(self)
        _check_workers(self)
        if self.train.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError("train.precision=fp16 needs scaling.use_gpu=true; use bf16 on CPU")
        if self.train.compile and not self.scaling.use_gpu:
            raise ValueError(
                "train.compile=true needs scaling.use_gpu=true (the loop compiles on CUDA only); "
                "drop train.compile on CPU"
            )
        from raycv.models import check_input_size, check_weights

        check_weights(self.model.name, self.model.weights, self.model.encoder)
        _check_pruning(self)
        check_input_size(self.model.name, self.model.image_size, self.model.weights)
        if self.data.source == "folder":
            _check_folder_root(self.data.folder.root, "data.folder.root", "an ImageFolder")
        if self.data.source == "mask_folder":
            _check_folder_root(
                self.data.mask_folder.root, "data.mask_folder.root", "a folder of images and masks"
            )
        if self.data.source in ("coco", "voc", "yolo"):
            source = self.data.source
            root = getattr(self.data, source).root
            _check_folder_root(root, f"data.{source}.root", f"a {source.upper()} dataset folder")
        _check_finetune(self)
        _check_mosaic(self)
        from raycv import trackers

        trackers.check(self)  # each of run.loggers installed (an extra), with a store
        return self

    @property
    def augments_on_worker(self) -> bool:
        """Whether the training workers run the train preset (``augment.where``)."""
        where = self.augment.where
        return where == "worker" or (where == "auto" and self.scaling.use_gpu)

    @property
    def working_size(self) -> int:
        return self.data.working_size or round(self.model.image_size * 1.15)


def _check_names(cfg: Config) -> None:
    # Imported here: the registries import torch, and config must load without it.
    from raycv.data.augment import AUGMENTATIONS
    from raycv.data.sources import SOURCES
    from raycv.finetune.strategies import STRATEGIES
    from raycv.models import MODELS
    from raycv.optim import OPTIMIZERS, SCHEDULERS
    from raycv.pruning import PRUNERS
    from raycv.sweep.objective import OBJECTIVES
    from raycv.sweep.strategy import SEARCHERS, TRIAL_SCHEDULERS
    from raycv.tasks import TASKS

    for key, value, registry in (
        ("task", cfg.task, TASKS),
        ("data.source", cfg.data.source, SOURCES),
        ("augment.train_preset", cfg.augment.train_preset, AUGMENTATIONS),
        ("augment.eval_preset", cfg.augment.eval_preset, AUGMENTATIONS),
        ("model.name", cfg.model.name, MODELS),
        ("optimizer.name", cfg.optimizer.name, OPTIMIZERS),
        ("scheduler.name", cfg.scheduler.name, SCHEDULERS),
        ("prune.method", cfg.prune.method, PRUNERS),
        ("finetune.strategy", cfg.finetune.strategy, STRATEGIES),
        ("compress.prune.method", cfg.compress.prune.method, PRUNERS),
        ("compress.student", cfg.compress.student, MODELS),
        ("tune.searcher", cfg.tune.searcher, SEARCHERS),
        ("tune.scheduler.name", cfg.tune.scheduler.name, TRIAL_SCHEDULERS),
        ("tune.objective.kind", cfg.tune.objective.kind, OBJECTIVES),
    ):
        if value is not None and value not in registry:
            raise ValueError(f"{key}={value!r} is unknown; choose one of: {', '.join(registry)}")


def _fill_task_defaults(cfg: Config) -> None:
    """The task's primary metric where none is set, and a model made for the task."""
    from raycv.models import MODELS
    from raycv.tasks import TASKS

    primary = TASKS.get(cfg.task).primary
    for section in (cfg.checkpoint, cfg.tune.objective):
        if section.metric is None:
            section.metric = primary.name
        if section.mode is None:
            section.mode = (
                primary.mode if section.metric == primary.name else _mode_of(section.metric)
            )
    task = TASKS.get(cfg.task)
    if "name" not in cfg.model.model_fields_set and MODELS.get(cfg.model.name).task != cfg.task:
        cfg.model.name = task.default_model
        cfg.model.model_fields_set.discard("name")  # still a default: a fine-tune source may set it
    spec = MODELS.get(cfg.model.name)
    if spec.task != cfg.task:
        fits = [n for n in MODELS if MODELS.get(n).task == cfg.task]
        raise ValueError(
            f"model.name={cfg.model.name} is a {spec.task} model, the task is {cfg.task}; "
            f"choose one of: {', '.join(fits)}"
        )
    _check_encoder(cfg, spec)
    from raycv.data.augment import AUGMENTATIONS

    if (
        TASKS.get(cfg.task).whole_frame
        and not AUGMENTATIONS.get(cfg.augment.eval_preset).shows_whole_frame
    ):
        raise ValueError(
            f"augment.eval_preset={cfg.augment.eval_preset} crops at random; {cfg.task} scores "
            "every pixel of the whole image: use augment.eval_preset=eval"
        )
    for key in ("train_preset", "eval_preset"):
        name = getattr(cfg.augment, key)
        lost = set(task.targets) - AUGMENTATIONS.get(name).carries
        if lost:
            movers = [p for p in AUGMENTATIONS.names() if lost <= AUGMENTATIONS.get(p).carries]
            raise ValueError(
                f"augment.{key}={name} does not move {', '.join(sorted(lost))} with the pixels, "
                f"which task={cfg.task} needs; choose one of: {', '.join(movers)}"
            )


def _mode_of(metric: str) -> str:
    """Losses and costs fall as models improve; everything else rises."""
    return "min" if metric.endswith("loss") or metric in ("macs", "latency_ms", "params") else "max"


def _check_encoder(cfg: Config, spec) -> None:
    encoder = cfg.model.encoder
    if encoder is None or encoder == spec.encoder:
        return  # the default needs no look-up (smp's names import timm and torchvision)
    if spec.encoders is None:
        raise ValueError(
            f"model.encoder is for unet, pspnet, deeplabv3plus and yolo_*, not {cfg.model.name}"
        )
    known = spec.encoders()
    if encoder not in known:
        close = difflib.get_close_matches(encoder, known, n=5)
        raise ValueError(
            f"model.encoder={encoder!r} is unknown; e.g. {', '.join(close or known[:8])}"
        )


def _check_workers(cfg: Config) -> None:
    s, batch = cfg.scaling, cfg.train.batch_size
    if s.elastic and batch < s.max_workers:
        raise ValueError(
            f"train.batch_size={batch} is smaller than the most workers of scaling.num_workers="
            f"{list(s.num_workers)}: raise it to at least {s.max_workers}"
        )
    if not s.elastic and batch % s.num_workers:
        raise ValueError(
            f"train.batch_size must be a positive multiple of scaling.num_workers "
            f"(got {batch} for {s.num_workers} workers)"
        )
    from raycv.models import MODELS

    least = MODELS.get(cfg.model.name).min_batch
    if batch // s.max_workers < least:
        raise ValueError(
            f"train.batch_size={batch} gives {batch // s.max_workers} image(s) per worker; "
            f"{cfg.model.name} needs at least {least} (BatchNorm after global pooling): "
            f"raise it to {least * s.max_workers}"
        )
    if s.elastic and cfg.run.max_failures == 0:
        raise ValueError(
            "an elastic scaling.num_workers range needs run.max_failures > 0 (or -1): Ray "
            "Train resizes the workers by restarting them from the last checkpoint"
        )


def _check_pruning(cfg: Config) -> None:
    from raycv.pruning import check_prunable

    if cfg.prune.ratio > 0:
        check_prunable(cfg.model.name, cfg.prune.method)
        if cfg.prune.importance == "taylor":
            # Gradients differ per worker shard, so workers would prune different channels.
            raise ValueError(
                "prune.importance=taylor needs training images before training starts; "
                "prune with raycv compress --prune channel:RATIO compress.prune.importance=taylor"
            )
    c = cfg.compress
    if c.prune.ratio > 0:
        check_prunable(c.student or cfg.model.name, c.prune.method)
    _check_distillation(cfg)
    if c.quantize is not None:
        from raycv.models import MODELS
        from raycv.quantizers import QUANTIZERS

        name = c.student or cfg.model.name
        if name in MODELS and not MODELS.get(name).quantizable:
            raise ValueError(
                f"compress.quantize: {name} does not quantize to int8 yet (its evaluation "
                "ends in NMS, which int8 graphs cannot hold); leave compress.quantize unset"
            )

        if c.quantize not in QUANTIZERS:
            raise ValueError(
                f"compress.quantize={c.quantize!r} is unknown; choose one of: "
                f"{', '.join(QUANTIZERS)}"
            )


def _check_distillation(cfg: Config) -> None:
    from raycv.tasks import TASKS

    if cfg.task not in TASKS or TASKS.get(cfg.task).distills:
        return
    for key, value in (
        ("distill.teacher", cfg.distill.teacher),
        ("compress.student", cfg.compress.student),
    ):
        if value:
            raise ValueError(
                f"{key}: task={cfg.task} has no distillation loss yet; leave {key} unset "
                "(compress prunes and fine-tunes on the labels)"
            )


def _check_mosaic(cfg: Config) -> None:
    from raycv.tasks import TASKS

    if cfg.augment.mosaic and cfg.task in TASKS and "boxes" not in TASKS.get(cfg.task).targets:
        raise ValueError(
            f"augment.mosaic tiles images with their boxes, and task={cfg.task} has none; "
            "set augment.mosaic=0 (it is for task: detection)"
        )


def _check_finetune(cfg: Config) -> None:
    f = cfg.finetune
    if f.source and cfg.model.weights:
        raise ValueError(
            "set finetune.source or model.weights, not both (finetune.source also takes "
            "torchvision weights names)"
        )
    if f.strategy != "full" and not f.source and cfg.pipeline.pretrain is None:
        raise ValueError(
            f"finetune.strategy={f.strategy} freezes a pretrained backbone: set "
            "finetune.source (raycv finetune --from SOURCE) or pipeline.pretrain"
        )
    if f.strategy == "gradual" and f.freeze_epochs >= cfg.train.epochs:
        raise ValueError(
            f"finetune.freeze_epochs={f.freeze_epochs} leaves no epoch to unfreeze in; "
            f"use fewer than train.epochs={cfg.train.epochs}"
        )


def _check_folder_root(root: str | None, key: str, what: str) -> None:
    if not root:
        source = key.split(".")[1]
        raise ValueError(f"{key} is required when data.source={source}")
    if "://" not in root and not os.path.isdir(root):
        raise ValueError(f"{key}={root!r} is not a folder; point it at {what}")


# ---------------------------------------------------------------- loading and overrides


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read YAML, apply ``a.b=value`` overrides, validate; raise ConfigError on any problem."""
    return validate(load_given(path, overrides))


def load_given(path: str | os.PathLike | None, overrides: list[str] = ()) -> dict[str, Any]:
    """The mapping as the user wrote it (YAML plus overrides), not yet validated: keys it
    leaves out keep their "not set" status (a fine-tune source may fill them)."""
    return with_overrides(_read_yaml(path) if path else {}, overrides)


def from_dict(raw: dict[str, Any], overrides: list[str] = ()) -> Config:
    """Validate a config mapping (e.g. one saved in a checkpoint) after applying overrides."""
    return validate(with_overrides(raw, overrides))


def with_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for item in overrides:
        _apply_override(raw, item)
    return raw


# Keys that moved: (section, key) -> (section, key). Configs saved in run folders and
# checkpoints before the move still load; the old key's value goes where it lives now.
MOVED = {("pipeline", "distill"): ("compress", "distill")}


def validate(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(_moved_keys(raw))
    except ValidationError as e:
        raise ConfigError(_describe(e.errors()[0], raw)) from e


def _moved_keys(raw: dict[str, Any]) -> dict[str, Any]:
    found = [
        (old, new)
        for old, new in MOVED.items()
        if isinstance(raw.get(old[0]), dict) and old[1] in raw[old[0]]
    ]
    if not found:
        return raw
    raw = {section: dict(v) if isinstance(v, dict) else v for section, v in raw.items()}
    for (section, key), (to_section, to_key) in found:
        value = raw[section].pop(key)
        target = raw.setdefault(to_section, {})
        if isinstance(target, dict):
            target.setdefault(to_key, value)
    return raw


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {str(p)!r} not found; pass a YAML file such as configs/smoke.yaml"
        )
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        # A ReaderError (a control character) has no "problem" and a two-line text.
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{p} is not valid YAML{where}: {problem}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{p} must hold a mapping of config sections, got {type(raw).__name__}")
    return raw


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    shown = f"{key}={REDACTED}" if is_secret(key) else item  # a secret stays out of errors
    if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(
            f"override {shown!r} must look like section.key=value, e.g. train.epochs=3"
        )
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {shown!r}: value is not valid YAML") from e
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {shown!r}: {part} is a value, not a section")
        node = child
    node[leaf] = value


def _describe(err: dict[str, Any], raw: dict[str, Any]) -> str:
    if err["type"] in ("extra_forbidden", "invalid_key"):  # the key itself may be a number
        return _unknown_key([str(p) for p in err["loc"]])
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    key = ".".join(loc)
    msg = err["msg"].removeprefix("Value error, ")
    if not key:
        return msg
    if "input" in err and not isinstance(err["input"], dict) and not is_secret(key):
        return f"{key}: {msg} (got {err['input']!r})"
    return f"{key}: {msg}"


def _unknown_key(loc: list[str]) -> str:
    node: Any = Config
    for part in loc[:-1]:
        if isinstance(node, type) and issubclass(node, BaseModel):
            node = node.model_fields[part].annotation
        else:  # a mapping of sections (tune.space): ``part`` is one of its own keys
            node = typing.get_args(node)[-1]
    valid = list(node.model_fields)
    close = difflib.get_close_matches(loc[-1], valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{'.'.join(loc)} is not a config key; {hint}valid keys: {', '.join(valid)}"


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, secret-like values as ``***`` (``raycv.redact``): read it
    back with ``load_saved``."""
    return yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False)


def load_saved(path: str | os.PathLike, given: Config | dict[str, Any]) -> Config:
    """A config that raycv wrote (``dump_config``), its ``***`` values taken from ``given``,
    the config the user gives now: secrets are never read back from a run folder."""
    return validate(restore_secrets(load_given(path), given, path))


def restore_secrets(
    saved: dict[str, Any], given: Config | dict[str, Any], where: str | os.PathLike
) -> dict[str, Any]:
    """``saved`` with its redacted secrets filled from ``given`` at the same keys."""
    given = given.model_dump(mode="json") if isinstance(given, Config) else given
    try:
        return unredact(saved, given)
    except MissingSecretError as e:
        raise ConfigError(
            f"{e.key} was saved as {REDACTED} in {where}; give it again, in the config or "
            f"as {e.key}=VALUE, to go on with this run"
        ) from e
