"""The train stage: one Ray Train run of the shared loop, from a validated config to a
finished run folder (config, metrics, checkpoints, curves, manifest)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray.train
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raycv import checkpoint, trackers
from raycv import storage as remote
from raycv.checkpoint import EPOCH_DIR, checkpoint_epochs
from raycv.config import Config, ConfigError, dump_config, load_saved
from raycv.controller import RecordReports, train_func
from raycv.data.pipeline import build_streams
from raycv.distill import check_teacher_classes, resolve_teacher
from raycv.doctor import require_fit
from raycv.errors import DataError, NonFiniteLossError, RunFailedError
from raycv.finetune.sources import apply_source
from raycv.loop import RunInfo, recorder
from raycv.progress import mode as progress_mode
from raycv.resume import LOCATORS, TRAINING, resumed_config
from raycv.runs import RunFolder, read_metrics, require_path, write_manifest
from raycv.session import ensure_ray

log = logging.getLogger(__name__)


def prepare_run(
    cfg: Config,
    stage: str,
    resume: str | bool | None,
    at: Path | None = None,
    keys: Sequence[str] = (),
) -> tuple[Config, RunFolder]:
    """A new run folder, or the one being resumed, with its saved config and what the user
    set now at ``keys`` where ``--resume`` may change it (raycv/resume.py; refused
    otherwise). ``at`` fixes the folder (a pipeline's stage): started there before means
    resumed. Secrets redacted in the saved config come from ``cfg``."""
    if at is not None and (at / "config.yaml").is_file():
        return load_saved(at / "config.yaml", cfg), RunFolder(at)
    if at is not None:
        at.mkdir(parents=True, exist_ok=True)
        run = RunFolder(at)
        run.config.write_text(dump_config(cfg))
        return cfg, run
    if resume:
        run = RunFolder.find(
            cfg.run.storage, cfg.experiment, stage, None if resume is True else resume
        )
        may_change = TRAINING if stage in ("train", "finetune") else LOCATORS  # sweeps
        saved = load_saved(run.config, cfg)
        resumed = resumed_config(saved, cfg, keys, may_change, str(run.path))
        if resumed != saved:  # what the run now goes on with, for its next resume too
            run.config.write_text(dump_config(resumed))
        return resumed, run
    run = RunFolder.create(cfg.run.storage, cfg.experiment, stage)
    run.config.write_text(dump_config(cfg))
    return cfg, run


def run_train(
    cfg: Config,
    *,
    local: bool = False,
    resume: str | bool | None = None,
    stage: str = "train",
    at: Path | None = None,
    keys: Sequence[str] = (),
) -> RunFolder:
    """A train run, or (``stage="finetune"``) a transfer-learning run from
    ``finetune.source``: the same loop, with the source's weights and the strategy.
    ``at``: the run folder (a pipeline's stage), resumed if it was started before.
    ``keys``: the config keys the user set on the command line (what --resume may take)."""
    if stage == "finetune" and not cfg.finetune.source:
        raise ConfigError("raycv finetune needs --from SOURCE (or finetune.source in the config)")
    if local:  # the in-process loop writes checkpoints into the local folder
        require_path(cfg.run.storage, "--local", ", or drop --local")
    cfg = apply_source(cfg)  # before Ray starts: a bad source fails here, in one line
    cfg = resolve_teacher(cfg)
    cfg, run = prepare_run(cfg, stage, resume, at, keys)
    started = time.time()
    log.info("run folder: %s", run.where)
    if run.uri:
        log.info("local mirror: %s", run.path)
    ensure_ray(cfg)
    skipped = fit(cfg, run, local=local, kind=stage)
    return finish(run, cfg, started, skipped, kind=stage)


def fit(
    cfg: Config,
    run: RunFolder,
    *,
    local: bool = False,
    callbacks: Sequence[ray.train.UserCallback] = (),
    progress: bool = True,
    kind: str = "train",
) -> list[str]:
    """Fit one TorchTrainer whose files land in ``run``; returns the unreadable files skipped.

    Raises RunFailedError (one line, with the fix) when the workers fail for good."""
    if not local:
        require_fit(cfg.scaling)  # before decoding: Ray Train would wait for them forever
    streams = build_streams(cfg)
    check_teacher_classes(cfg, streams.class_names)
    check_resumed_classes(run, streams.class_names)
    shows = progress_mode(progress)
    info = RunInfo(
        str(run.path), streams.class_names, streams.num_train, local, streams.num_val, shows
    )
    if progress:
        log.info(
            "data: %d train / %d val images, %d classes, %d unreadable files skipped",
            streams.num_train,
            streams.num_val,
            len(streams.class_names),
            len(streams.skipped),
        )
    extra = {"skipped_files": streams.skipped}
    write_manifest(run, cfg, "running", extra, kind, parent=cfg.finetune.source)
    started = trackers.start(cfg, run, kind)  # MLflow, W&B: their run made or found again
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "run": asdict(info),
            "epoch_clock": streams.clock,
        },
        scaling_config=scaling_config(cfg, local),
        run_config=RunConfig(
            name="checkpoints",  # Ray's files land in <run folder>/checkpoints
            storage_path=run.where,  # for a run on object storage, straight to the store
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=FailureConfig(max_failures=max_failures(cfg)),
            callbacks=[RecordReports(recorder(cfg, run, trackers=started), progress), *callbacks],
            logging_config=LoggingConfig(log_level="WARNING"),  # our progress lines instead
            # Train's workers send print() through a logger that writes each line twice, once
            # with a blank line after it: a progress bar's state must reach the driver once.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
        datasets=streams.for_training(cfg),
    )
    try:
        with _ctrl_c_interrupts():
            trainer.fit()
    except KeyboardInterrupt:
        # Finished epochs are kept: eval, export and --from take the run, --resume goes on.
        stopped = {**extra, "paths": _paths(run, None)}
        write_manifest(run, cfg, "interrupted", stopped, kind, parent=cfg.finetune.source)
        _finish_trackers(run, cfg, "KILLED", stopped["paths"])
        raise
    # Local mode runs the loop in this process, so the loop's own error arrives unwrapped.
    except (ray.train.TrainingFailedError, NonFiniteLossError) as e:
        reason = describe_failure(e)
        # The paths make the best epoch so far usable: eval, export and --from take the run.
        failed = {**extra, "error": reason, "paths": _paths(run, None)}
        write_manifest(run, cfg, "failed", failed, kind, parent=cfg.finetune.source)
        _finish_trackers(run, cfg, "FAILED", failed["paths"])
        raise RunFailedError(f"training failed: {reason}; {failure_hint(reason, run)}") from e
    return streams.skipped


@contextlib.contextmanager
def _ctrl_c_interrupts():
    """Ctrl-C during ``fit`` as a KeyboardInterrupt, as everywhere else in raycv. Ray Train's
    own SIGINT handler aborts the run's controller and then calls ``sys.exit(0)`` (the
    process still exits 1, unexplained), and it stays installed after ``fit``: here its
    SystemExit becomes the interrupt, and the handler from before comes back."""
    before = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit as e:  # only Ray's handler exits from inside fit
        raise KeyboardInterrupt from e
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, before)


def check_resumed_classes(run: RunFolder, class_names: list[str]) -> None:
    """A run that resumes continues checkpoints with one output per class: the data must
    still hold the same classes in the same order (a class folder added or renamed since
    would otherwise fail inside every worker with a shape mismatch)."""
    saved = checkpoint_epochs(run.checkpoints)
    if saved:
        known = list(checkpoint.load_latest_good(saved)["class_names"])
    elif (run.best / checkpoint.CHECKPOINT_FILE).is_file():
        # A run on object storage: its checkpoints stay on the store, best/ came down.
        known = list(checkpoint.load(run.best)["class_names"])
    else:
        return
    if known != class_names:
        raise DataError(
            f"{run.path} was trained on the classes {known}, the data now has {class_names}; "
            "restore the data's class folders to resume, or start a new run"
        )


def failure_hint(reason: str, run: RunFolder) -> str:
    """What to do after a failed run: what is kept, and how to go on."""
    if reason.startswith(NonFiniteLossError.__name__):
        # --resume would continue the diverged weights with the saved learning rate.
        kept = (
            f"the best epoch so far is in {run.best}" if run.best.is_dir() else "no epoch finished"
        )
        return f"{kept}; start a new run with a lower optimizer.lr"
    return f"finished epochs are kept in {run.where} (fix the cause, then add --resume)"


def describe_failure(error: Exception) -> str:
    """The first line of the first worker's error, not Ray's multi-page wrapper."""
    failures = getattr(error, "worker_failures", None) or {}
    cause = next(iter(failures.values()), None) or error.__cause__ or error
    cause = getattr(cause, "cause", None) or cause
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


def max_failures(cfg: Config) -> int:
    """run.max_failures, or by default 0, and 3 for an elastic run: Ray Train grows or
    shrinks the worker group by restarting it, which counts against the limit."""
    if cfg.run.max_failures is not None:
        return cfg.run.max_failures
    return 3 if cfg.scaling.elastic else 0


def scaling_config(cfg: Config, local: bool) -> ScalingConfig:
    s = cfg.scaling
    if local:
        return ScalingConfig(num_workers=0)
    resources = {"CPU": s.cpus_per_worker} | ({"GPU": s.gpus_per_worker} if s.use_gpu else {})
    return ScalingConfig(
        num_workers=s.num_workers,
        use_gpu=s.use_gpu,
        resources_per_worker=resources,
        placement_strategy=s.placement_strategy,
    )


def finish(
    run: RunFolder,
    cfg: Config,
    started: float,
    skipped: list[str],
    *,
    kind: str = "train",
    summary: bool = True,
) -> RunFolder:
    """Curves, the manifest with final and best metrics, and the summary table."""
    from raycv import plots  # matplotlib (0.4 s): not on the way to the first step

    history = read_metrics(run.metrics)
    curves = plots.training_curves(history, run.plots / "curves.png") if history else None
    best = recorder(cfg, run).best(history)
    paths = _paths(run, curves)
    _finish_trackers(run, cfg, "FINISHED", paths, best)
    write_manifest(
        run,
        cfg,
        status="finished",
        extra={
            "metrics": {"final": history[-1] if history else {}, "best": best or {}},
            "elapsed_s": round(time.time() - started, 1),
            "skipped_files": skipped,
            "paths": paths,
        },
        kind=kind,
        parent=cfg.finetune.source,
    )
    if summary:
        log.info("\n%s", summary_table(history, best, skipped, cfg.checkpoint.metric))
    return run


def _finish_trackers(
    run: RunFolder, cfg: Config, status: str, paths: dict, best: dict | None = None
) -> None:
    """MLflow, W&B: the plots, where the best checkpoint is, the status."""
    at = paths["best_checkpoint"]
    where = (remote.join(run.uri, at) if run.uri else str(run.path / at)) if at else None
    outcome = trackers.Outcome(status, cfg.checkpoint.metric, best, where)
    trackers.finish(cfg, run, outcome)


def _paths(run: RunFolder, curves) -> dict[str, str | None]:
    best_dir = run.best if (run.best / "checkpoint.pt").is_file() else None
    return {
        "config": run.config.name,
        "metrics": run.metrics.name,
        "tensorboard": run.tensorboard.name if run.tensorboard.is_dir() else None,
        "latest_checkpoint": _latest_checkpoint(run),
        "best_checkpoint": str(best_dir.relative_to(run.path)) if best_dir else None,
        "curves": str(curves.relative_to(run.path)) if curves else None,
    }


def _latest_checkpoint(run: RunFolder) -> str | None:
    """``checkpoints/epoch_NNNN`` of the newest saved epoch (on the store for a URI run)."""
    if run.uri is None:
        saved = checkpoint_epochs(run.checkpoints)
        return str(saved[max(saved)].relative_to(run.path)) if saved else None
    names = remote.folders(remote.join(run.uri, "checkpoints"))
    epochs = {int(m.group(1)): m.group(0) for m in map(EPOCH_DIR.match, names) if m}
    return f"checkpoints/{epochs[max(epochs)]}" if epochs else None


def first_batches(history: list[dict[str, Any]]) -> str:
    """How long each epoch waited for its first batch: the first epoch of this run (Ray
    Data's start-up, a cache being filled) apart from the range of the others."""
    waits = [(h["epoch"], h["first_batch_s"]) for h in history if h.get("first_batch_s")]
    if not waits:
        return "-"
    (epoch, first), rest = waits[0], [s for _, s in waits[1:]]
    head = f"{first:.1f} s (epoch {epoch})"
    if not rest:
        return head
    spread = sorted({f"{min(rest):.1f}", f"{max(rest):.1f}"}, key=float)
    return f"{head}, later epochs {'-'.join(spread)} s"


def summary_table(
    history: list[dict[str, Any]], best: dict | None, skipped: list[str], metric: str
) -> str:
    """The run in a few lines; ``metric`` ranks checkpoints (the task's primary by default)."""
    if not history:
        return "no epoch finished"
    last = history[-1]
    rows = [
        ("epochs", f"{last['epoch']}"),
        (f"final {metric}", f"{last.get(metric, float('nan')):.4f}"),
        (
            f"best {metric}",
            f"{best[metric]:.4f} (epoch {best['epoch']})" if best and metric in best else "-",
        ),
        ("final train loss", f"{last.get('train_loss', float('nan')):.4f}"),
        ("throughput", f"{last.get('images_per_s', 0):.0f} images/s"),
        ("data wait", f"{last.get('data_wait', 0):.0%} of step time"),
        ("first batch", first_batches(history)),
        ("unreadable files skipped", str(len(skipped))),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
