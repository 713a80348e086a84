"""The tune stage: check the search space, start (or restore) the Ray Tune sweep, and
write its results. Each trial is a Ray Train run (see ``trial.py``)."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import ray
from ray import tune

from raycv.config import Config
from raycv.distill import resolve_teacher
from raycv.doctor import require_fit
from raycv.finetune.sources import apply_source
from raycv.runs import RunFolder, require_path, write_manifest
from raycv.session import ensure_ray
from raycv.sweep.objective import make_objective
from raycv.sweep.results import write_results
from raycv.sweep.space import check_space, param_space
from raycv.sweep.strategy import SEARCHERS, TRIAL_SCHEDULERS
from raycv.sweep.table import TrialTable
from raycv.sweep.trial import run_trial
from raycv.train import prepare_run

log = logging.getLogger(__name__)

TUNE_DIR = "tune"  # Tune's own experiment state, inside the sweep's run folder
DATA_CPUS = 1  # left unreserved per trial, for its decoding and augmentation
TRIAL_CPU = 0.01  # the trial function's own reservation


def run_tune(
    cfg: Config,
    *,
    resume: str | bool | None = None,
    at: Path | None = None,
    keys: Sequence[str] = (),
) -> RunFolder:
    """The sweep; ``at`` fixes its folder (a pipeline's stage), resumed if started before;
    ``keys``: the config keys set on the command line (what --resume may take)."""
    require_path(cfg.run.storage, "raycv tune")  # trials write their folders on every node
    cfg = resolve_teacher(apply_source(cfg))  # a bad source or teacher fails here
    check_space(cfg)  # before Ray starts: every sampled config must be valid
    resume = resume or (at is not None and (at / "config.yaml").is_file())
    cfg, run = prepare_run(cfg, "tune", resume, at, keys)
    log.info("sweep folder: %s", run.path)
    ensure_ray(cfg, num_cpus=local_sweep_cpus(cfg))
    require_fit(cfg.scaling)  # a trial's workers must fit, or every trial would fail
    started = time.time()
    write_manifest(run, cfg, status="running", kind="tune")
    concurrent = concurrency(cfg)
    log.info(
        "%d trials, %d at a time, %s search, %s scheduler, each %d worker(s)",
        planned_trials(cfg),
        concurrent,
        cfg.tune.searcher,
        cfg.tune.scheduler.name,
        cfg.scaling.num_workers,
    )
    results = _tuner(cfg, run, concurrent, resume).fit()
    return write_results(run, cfg, results, started)


def _tuner(cfg: Config, run: RunFolder, concurrent: int, resume) -> tune.Tuner:
    objective = make_objective(cfg.tune.objective)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.model_dump(mode="json"), sweep_dir=str(run.path)),
        trial_bundles(),
    )
    path = str(run.path / TUNE_DIR)
    if resume and tune.Tuner.can_restore(path):
        log.info("resuming the sweep: finished trials are kept, unfinished ones continue")
        return tune.Tuner.restore(
            path, trainable=trainable, param_space=param_space(cfg), resume_unfinished=True
        )
    keys = list(cfg.tune.space)
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            search_alg=SEARCHERS.get(cfg.tune.searcher).build(cfg, objective, concurrent),
            scheduler=TRIAL_SCHEDULERS.get(cfg.tune.scheduler.name)(cfg, objective),
            num_samples=cfg.tune.num_samples,
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=str(run.path),
            failure_config=tune.FailureConfig(max_failures=cfg.tune.max_retries),
            callbacks=[TrialTable(keys, cfg.tune.objective.metric, cfg.tune.objective.cost)],
            verbose=0,  # the trial table above replaces Tune's own status output
        ),
    )


def planned_trials(cfg: Config) -> int:
    """num_samples, times the grid's size where values form a grid."""
    grid = SEARCHERS.get(cfg.tune.searcher).grid
    sizes = [len(e.values) for e in cfg.tune.space.values() if grid or e.kind == "grid"]
    return cfg.tune.num_samples * math.prod(sizes)


def trial_bundles() -> tune.PlacementGroupFactory:
    """The trial function's placement group: a token slice (Tune refuses an empty one).
    It only drives its Train run, whose workers reserve their CPUs in a group of their
    own; its Ray Data tasks run outside both on the CPUs left unreserved, which is what
    ``concurrency`` keeps free (one per trial)."""
    return tune.PlacementGroupFactory([{"CPU": TRIAL_CPU}])


def trial_resources(cfg: Config) -> dict[str, float]:
    s = cfg.scaling
    gpus = {"GPU": s.max_workers * s.gpus_per_worker} if s.use_gpu else {}
    return {"CPU": s.max_cpus, **gpus}


def concurrency(cfg: Config) -> int:
    """Trials at a time: as many as the cluster fits, each with its workers' resources and
    its data CPU (see ``trial_bundles``), unless the config says."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    have = ray.cluster_resources()
    fits = [
        math.floor(have.get(name, 0) / (need + (DATA_CPUS + TRIAL_CPU if name == "CPU" else 0)))
        for name, need in trial_resources(cfg).items()
        if need > 0
    ]
    return max(1, min(fits, default=1))


def local_sweep_cpus(cfg: Config) -> int:
    """Logical CPUs for a local Ray: one trial per core's worth of its workers' CPUs, each
    with its data CPU."""
    per_trial = trial_resources(cfg)["CPU"]
    trials = max(1, (os.cpu_count() or 1) // math.ceil(per_trial))
    if cfg.tune.max_concurrent_trials:
        trials = cfg.tune.max_concurrent_trials
    return math.ceil(trials * (per_trial + DATA_CPUS + TRIAL_CPU))
