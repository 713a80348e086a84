"""``raycv pipeline``: the whole chain as one resumable command.

pretrain (a source task) → tune (the sweep, fine-tuning from the pretrained model) →
finetune (the best config, a fresh run) and scratch (the same budget, no pretrained
weights) → compress (pruned and fine-tuned again) → export → report.

Each stage writes its run folder inside the pipeline folder, with a manifest naming its
parent. A stage whose folder's manifest says "finished" is skipped on ``--resume``; an
unfinished one continues from its own checkpoints (a sweep from Tune's state)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raycv.artifacts import checkpoint_file, read_manifest
from raycv.config import (
    PIPELINE_STAGES,
    Config,
    ConfigError,
    dump_config,
    load_saved,
    restore_secrets,
    validate,
)
from raycv.redact import redact
from raycv.registry import Registry
from raycv.resume import LOCATORS, resumed_config
from raycv.runs import RunFolder, require_path, write_manifest
from raycv.session import ensure_ray, local_cpus
from raycv.sweep.space import apply_sample

log = logging.getLogger(__name__)

GIVEN_FILE = "given.yaml"  # the config as the user wrote it: "unset" keys stay unset


@dataclass
class Pipeline:
    run: RunFolder
    given: dict[str, Any]  # the user's mapping, overrides applied
    cfg: Config
    local: bool = False
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    earlier_s: float = 0.0  # time spent before a resume

    def folder(self, stage: str) -> Path:
        return self.run.path / stage

    def done(self, stage: str) -> bool:
        manifest = read_manifest(self.folder(stage))
        return bool(manifest) and manifest.get("status") == "finished"

    def target(self, **dotted: Any) -> Config:
        """The target task's config: what the user gave, ``dotted`` keys set on top."""
        return validate(apply_sample(self.given, dotted))

    def final_model(self) -> str | None:
        """The compress stage's model unless its guard kept the one it started from (the
        fine-tuned one), then the fine-tuned model, once trained."""
        compressed = read_manifest(self.folder("compress")) or {}
        if self.done("compress") and (compressed.get("guard") or {}).get("kept") != 0:
            return "compress"
        return "finetune" if self.done("finetune") else None

    def write_manifest(self, status: str) -> None:
        write_manifest(
            self.run,
            self.cfg,
            status,
            {
                "stages": self.stages,
                "final_model": self.final_model(),
                "elapsed_s": round(self.earlier_s + time.time() - self.started, 1),
            },
            kind="pipeline",
        )


@dataclass(frozen=True)
class Stage:
    enabled: Callable[[Config], bool]
    run: Callable[[Pipeline], Path]  # returns the stage's run folder


STAGES: Registry[Stage] = Registry("pipeline stage")


def pretrain_config(given: dict[str, Any], pretrain: dict[str, Any]) -> Config:
    """The source task: the user's config with ``pipeline.pretrain`` applied, trained from
    scratch (no fine-tune settings)."""
    raw = apply_sample(given, pretrain)
    raw["finetune"] = {}
    return validate(raw)


def _source(p: Pipeline) -> str | None:
    """What the target fine-tunes from: the pretrained model, else finetune.source."""
    if p.cfg.pipeline.pretrain is not None:
        return str(checkpoint_file(p.folder("pretrain")))
    return p.cfg.finetune.source


def _finetune_config(p: Pipeline) -> Config:
    """The sweep's best trial's config when there was a sweep, else the target's."""
    best = p.folder("tune") / "best.yaml"
    if p.cfg.pipeline.sweep and best.is_file():
        return load_saved(best, p.given)
    return p.target(**{"finetune.source": _source(p)})


def _train_stage(p: Pipeline, stage: str, cfg: Config, kind: str) -> Path:
    from raycv.train import run_train

    return run_train(cfg, local=p.local, stage=kind, at=p.folder(stage)).path


STAGES.add(
    "pretrain",
    Stage(
        lambda cfg: cfg.pipeline.pretrain is not None,
        lambda p: _train_stage(
            p, "pretrain", pretrain_config(p.given, p.cfg.pipeline.pretrain), "train"
        ),
    ),
)


def _tune(p: Pipeline) -> Path:
    from raycv.sweep.run import run_tune

    return run_tune(p.target(**{"finetune.source": _source(p)}), at=p.folder("tune")).path


STAGES.add("tune", Stage(lambda cfg: cfg.pipeline.sweep and bool(cfg.tune.space), _tune))
STAGES.add(
    "finetune",
    Stage(lambda cfg: True, lambda p: _train_stage(p, "finetune", _finetune_config(p), "finetune")),
)


def _scratch(p: Pipeline) -> Path:
    raw = _finetune_config(p).model_dump(mode="json")
    raw["finetune"] = {}  # defaults: no source, every layer trains at one rate
    return _train_stage(p, "scratch", validate(raw), "train")


STAGES.add("scratch", Stage(lambda cfg: cfg.pipeline.scratch, _scratch))


def _compress(p: Pipeline) -> Path:
    from raycv.compress.run import run_compress

    raw = _finetune_config(p).model_dump(mode="json")
    raw["compress"] = p.cfg.compress.model_dump(mode="json")
    raw["distill"] = p.cfg.distill.model_dump(mode="json")
    folder = p.folder("compress")
    return run_compress(p.folder("finetune"), validate(raw), local=p.local, at=folder).path


STAGES.add("compress", Stage(lambda cfg: cfg.compress.requested, _compress))


def _export(p: Pipeline) -> Path:
    from raycv.export import run_export

    folder = p.folder("export")
    folder.mkdir(exist_ok=True)
    return run_export(p.folder(p.final_model()), RunFolder(folder)).path


STAGES.add("export", Stage(lambda cfg: cfg.pipeline.export, _export))


def _report(p: Pipeline) -> Path:
    from raycv.report.evaluation import evaluate_final
    from raycv.report.write import write_report

    p.write_manifest("finished")  # the report reads the stage table and status from it
    write_report(p.run.path, evaluate_final(p.run.path))
    return p.run.path


STAGES.add("report", Stage(lambda cfg: True, _report))


# ------------------------------------------------------------------------ the driver


def check_pipeline(cfg: Config, given: dict[str, Any]) -> None:
    """Before Ray starts: run.storage must be a path (stages write into the pipeline's
    folder), the pretraining config must be valid, and there must be something to
    fine-tune from."""
    require_path(cfg.run.storage, "raycv pipeline")
    p = cfg.pipeline
    if p.pretrain is not None:
        try:
            pretrain_config(given, p.pretrain)
        except ConfigError as e:
            raise ConfigError(f"pipeline.pretrain: {e}") from e
    elif not cfg.finetune.source:
        raise ConfigError(
            "the pipeline needs something to fine-tune from: set pipeline.pretrain (a source "
            "task) or finetune.source (weights)"
        )


def start(
    given: dict[str, Any], cfg: Config, resume: str | bool | None, keys: Sequence[str] = ()
) -> Pipeline:
    """A new pipeline folder, or the one being resumed with its saved config. Keys set on
    the command line may differ from it only where they found the folder: each stage goes
    on with its own saved config, so any other would be accepted and then ignored."""
    if resume:
        run = RunFolder.find(
            cfg.run.storage, cfg.experiment, "pipeline", None if resume is True else resume
        )
        saved = run.path / GIVEN_FILE
        given = restore_secrets(yaml.safe_load(saved.read_text()), given, saved)
        resumed_config(validate(given), cfg, keys, LOCATORS, str(run.path))  # or refuses
        cfg = validate(given)
        manifest = read_manifest(run.path) or {}
        return Pipeline(
            run,
            given,
            cfg,
            stages=manifest.get("stages", {}),
            earlier_s=manifest.get("elapsed_s", 0.0),
        )
    run = RunFolder.create(cfg.run.storage, cfg.experiment, "pipeline")
    run.config.write_text(dump_config(cfg))
    (run.path / GIVEN_FILE).write_text(yaml.safe_dump(redact(given), sort_keys=False))
    return Pipeline(run, given, cfg)


def run_pipeline(
    given: dict[str, Any],
    cfg: Config,
    *,
    resume: str | bool | None = None,
    local: bool = False,
    until: str | None = None,
    keys: Sequence[str] = (),
) -> RunFolder:
    """Run (or resume) every enabled stage in order; ``until`` stops after that stage;
    ``keys``: the config keys set on the command line (what --resume may take)."""
    check_pipeline(cfg, given)
    p = start(given, cfg, resume, keys)
    p.local = local
    log.info("pipeline folder: %s", p.run.path)
    ensure_ray(p.cfg, num_cpus=_local_cpus(p.cfg))
    for name in PIPELINE_STAGES:
        stage = STAGES.get(name)
        if not stage.enabled(p.cfg):
            continue
        if name != "report" and p.done(name):
            log.info("stage %s: finished before, skipped", name)
            _record_finished_before(p, name)
        else:
            _run_stage(p, name, stage)
        if name == until:
            break
    finished = until is None or until == "report"
    p.write_manifest("finished" if finished else "stopped")
    if not finished:
        log.info("stopped after %s: run the same command with --resume to go on", until)
    return p.run


def _local_cpus(cfg: Config) -> int:
    """A local Ray sized for the larger of a training run and the sweep."""
    from raycv.sweep.run import local_sweep_cpus

    sweep = local_sweep_cpus(cfg) if STAGES.get("tune").enabled(cfg) else 0
    return max(local_cpus(cfg), sweep)


def _record_finished_before(p: Pipeline, name: str) -> None:
    """The stage's own manifest is the truth: a pipeline killed after a stage finished but
    before the pipeline's manifest said so still lists that stage as running there."""
    entry = p.stages.setdefault(name, {"path": name})
    entry["status"] = "finished"


def _run_stage(p: Pipeline, name: str, stage: Stage) -> None:
    log.info("== stage %s ==", name)
    t0 = time.time()
    p.stages[name] = {"path": name if name != "report" else ".", "status": "running"}
    p.write_manifest("running")
    try:
        stage.run(p)
    except BaseException as e:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        p.stages[name]["status"] = status
        p.write_manifest(status)
        raise
    p.stages[name] |= {"status": "finished", "elapsed_s": round(time.time() - t0, 1)}
    p.write_manifest("running")
