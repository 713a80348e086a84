"""The callback a trial's Train controller runs, in a module that imports little (as
``raycv.controller``, whose docstring says why): ``raycv.sweep.trial`` imports the whole
training stage."""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from raycv.sweep.objective import Objective


class ReportToTune(TuneReportCallback):
    """Tune's report callback, with the objective's derived values added to rank 0's
    metrics (e.g. the penalised score of a constrained sweep)."""

    def __init__(self, objective: Objective) -> None:
        super().__init__()
        self.objective = objective

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        first = metrics[0] | self.objective.extra(metrics[0])
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)
