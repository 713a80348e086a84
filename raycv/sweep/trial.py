"""One sweep trial: a Tune function that builds and fits a Ray Train run of the shared
loop (the Ray 2.60 pattern: a trainer cannot be handed to the Tuner itself)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ray import tune

from raycv.config import dump_config, validate
from raycv.runs import RunFolder, read_metrics
from raycv.session import quiet_data_progress
from raycv.sweep.objective import make_objective
from raycv.sweep.report import ReportToTune
from raycv.sweep.space import apply_sample
from raycv.train import finish, fit

ATTEMPTS_FILE = "attempts"


def _finished(run: RunFolder) -> bool:
    return run.manifest.is_file() and json.loads(run.manifest.read_text())["status"] == "finished"


def attempts(run: RunFolder) -> int:
    """How often this trial has started training (retries and resumes included)."""
    path = run.path / ATTEMPTS_FILE
    return int(path.read_text()) if path.is_file() else 0


def count_attempt(run: RunFolder) -> None:
    (run.path / ATTEMPTS_FILE).write_text(str(attempts(run) + 1))


def trial_folder(sweep_dir: str | Path, trial_id: str) -> RunFolder:
    return RunFolder(Path(sweep_dir) / "trials" / trial_id)


def run_trial(sample: dict[str, Any], *, base: dict[str, Any], sweep_dir: str) -> None:
    """Train ``base`` with ``sample`` merged in; the run folder is named by the trial id, so
    a trial restarted by a retry or a sweep resume continues its own checkpoints."""
    quiet_data_progress()  # a fresh process: Ray Data's progress bars would flood the driver
    cfg = validate(apply_sample(base, sample))
    run = trial_folder(sweep_dir, tune.get_context().get_trial_id())
    if _finished(run):
        # A sweep killed right after this trial ended may not have saved that fact: hand
        # Tune the recorded epochs again instead of starting workers for nothing.
        for metrics in read_metrics(run.metrics):
            tune.report(metrics | make_objective(cfg.tune.objective).extra(metrics))
        return
    run.path.mkdir(parents=True, exist_ok=True)
    if not run.config.is_file():
        run.config.write_text(dump_config(cfg))
    count_attempt(run)
    started = time.time()
    callbacks = [ReportToTune(make_objective(cfg.tune.objective))]
    skipped = fit(cfg, run, callbacks=callbacks, progress=False, kind="trial")
    finish(run, cfg, started, skipped, kind="trial", summary=False)
