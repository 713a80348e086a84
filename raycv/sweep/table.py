"""The live trial table printed while a sweep runs."""

from __future__ import annotations

import logging
import time
from typing import Any

from ray import tune

from raycv.sweep.space import flatten

log = logging.getLogger(__name__)

STATUS = {"PENDING": "pending", "RUNNING": "running", "TERMINATED": "done", "ERROR": "failed"}


class TrialTable(tune.Callback):
    """Prints one row per trial (status, sampled values, epoch, metric, cost) at most every
    ``every_s`` seconds, and whenever a trial ends."""

    def __init__(self, keys: list[str], metric: str, cost: str, every_s: float = 30.0) -> None:
        self.keys, self.metric, self.cost, self.every_s = keys, metric, cost, every_s
        self._last = 0.0

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._print(trials)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._print(trials)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._print(trials)

    def _print(self, trials: list[Any]) -> None:
        self._last = time.monotonic()
        log.info("\n%s", render(trials, self.keys, self.metric, self.cost))


def render(trials: list[Any], keys: list[str], metric: str, cost: str) -> str:
    header = ["trial", "status", *keys, "epoch", metric, cost]
    rows = [header]
    for t in trials:
        sample, result = flatten(t.config), t.last_result or {}
        rows.append(
            [
                t.trial_id,
                STATUS.get(t.status, t.status.lower()),
                *(fmt(sample.get(k)) for k in keys),
                fmt(result.get("epoch")),
                fmt(result.get(metric)),
                fmt(result.get(cost)),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
    lines = [f"trials: {done}/{len(trials)} ended"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
