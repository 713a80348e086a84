"""A sweep whose driver is killed mid-way and resumed with --resume: finished trials are
not run again. Its trials use two Train workers each, and sample the pruning ratio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raycv.runs import read_metrics

RATIOS = [0.0, 0.5]  # one finished before the kill, one interrupted and continued


def _write_config(smoke_at, storage: Path) -> Path:
    raw = smoke_at(
        storage,
        data={"shapes": {"num_images": 400, "image_size": 32, "num_classes": 4}},
        train={"epochs": 2, "batch_size": 32},
        scaling={"num_workers": 2, "cpus_per_worker": 1},
    )
    raw["tune"] = {
        "searcher": "grid",
        "num_samples": 1,
        "scheduler": {"name": "fifo"},
        "max_concurrent_trials": 1,  # one trial at a time: the kill lands between trials
        "objective": {"kind": "pareto", "metric": "val_acc", "cost": "macs"},
        "space": {"prune.ratio": {"grid": RATIOS}},
    }
    path = storage / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_sweep_killed_and_resumed_does_not_rerun_finished_trials(
    smoke_at, tmp_path, ray_env, kill_when, ray_noise
):
    with ray_env() as env:
        resumed = _kill_and_resume(_write_config(smoke_at, tmp_path), tmp_path, env, kill_when)
    # Quiet by default: the trial table and summary, none of Tune's or Ray's own notices.
    printed = resumed.stdout + resumed.stderr
    assert not ray_noise(printed), "\n".join(ray_noise(printed))


def _kill_and_resume(config: Path, storage: Path, env: dict, kill_when):
    command = [sys.executable, "-m", "raycv", "tune", str(config)]

    # Kill once one trial has finished and the next has trained an epoch (by then Tune
    # has saved its experiment state, which it does every 10 s at most).
    def one_finished_and_one_started() -> list[Path] | None:
        trials = list(storage.glob("smoke/tune-*/trials/*/manifest.json"))
        return trials if _count(trials, "finished") >= 1 and _epochs(trials) >= 3 else None

    finished = kill_when(
        command, env, storage / "first.log", one_finished_and_one_started, timeout=600
    )
    done_before = {p.parent.name: p.read_text() for p in finished if _status(p) == "finished"}
    assert done_before
    # The interrupted trial's saved epochs: the resume continues after them.
    interrupted = {
        p.parent.name: read_metrics(p.parent / "metrics.jsonl")
        for p in finished
        if p.parent.name not in done_before
    }

    resumed = subprocess.run(
        [*command, "--resume"], env=env, capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    sweep_dir = Path(resumed.stdout.strip().splitlines()[-1])
    trials = pd.read_csv(sweep_dir / "trials.csv").set_index("prune.ratio")
    assert sorted(trials.index) == RATIOS and (trials.status == "finished").all()
    # Finished trials were not run again: their manifests are byte for byte the same.
    for trial_id, manifest in done_before.items():
        assert (sweep_dir / "trials" / trial_id / "manifest.json").read_text() == manifest
    # An interrupted trial lost at most the epoch it was in: its saved ones were kept.
    for trial_id, before in interrupted.items():
        after = read_metrics(sweep_dir / "trials" / trial_id / "metrics.jsonl")
        for old, new in zip(before, after):
            assert new["epoch_started_at"] == old["epoch_started_at"]
    # Every trial ran on two workers and trained exactly two epochs.
    for trial_id in trials.trial_id:
        history = read_metrics(sweep_dir / "trials" / trial_id / "metrics.jsonl")
        assert [m["epoch"] for m in history] == [1, 2]
        assert len(history[-1]["worker_nodes"]) == 2
    # The sampled pruning ratio is real: parameters and MACs fall as it rises.
    assert trials.macs.is_monotonic_decreasing and trials.params.is_monotonic_decreasing
    assert trials.loc[0.5, "macs"] < 0.6 * trials.loc[0.0, "macs"]
    # Pareto objective: the cheapest trial is always on the front; best is the front's top.
    assert trials.loc[0.5, "pareto"]
    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    front = trials[trials.pareto]
    assert manifest["metrics"]["best"]["val_acc"] == pytest.approx(front.val_acc.max())
    return resumed


def _status(manifest: Path) -> str | None:
    try:
        return json.loads(manifest.read_text())["status"]
    except (OSError, ValueError, KeyError):
        return None  # being written


def _count(manifests: list[Path], status: str) -> int:
    return sum(_status(p) == status for p in manifests)


def _epochs(manifests: list[Path]) -> int:
    return sum(len(read_metrics(p.parent / "metrics.jsonl")) for p in manifests)
