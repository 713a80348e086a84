"""What a sweep optimises: one metric, one metric under a cost budget, or the trade-off
between a metric and a cost (the Pareto front)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raycv.config import ObjectiveConfig
from raycv.registry import Registry
from raycv.runs import best_of

OBJECTIVES: Registry[type[Objective]] = Registry("objective")


@dataclass
class Objective:
    """Single metric: the searcher and the trial scheduler both follow ``cfg.metric``."""

    cfg: ObjectiveConfig

    @property
    def search_metric(self) -> str | list[str]:
        return self.cfg.metric

    @property
    def search_mode(self) -> str | list[str]:
        return self.cfg.mode

    @property
    def scheduler_metric(self) -> str:
        return self.cfg.metric

    def extra(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Derived values added to each report before Tune sees it."""
        return {}

    def candidates(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows the best trial may come from."""
        return [r for r in rows if r.get(self.cfg.metric) is not None]

    def best(self, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        return best_of(self.candidates(rows), self.cfg.metric, self.cfg.mode)


OBJECTIVES.add("single", Objective)


@OBJECTIVES.register("constraint")
class Constrained(Objective):
    """Best metric among trials whose cost stays within the budget. Trials over budget
    score one full unit (100 points of accuracy) worse, so that the searcher and ASHA
    rank every feasible trial above every infeasible one."""

    @property
    def search_metric(self) -> str:
        return "objective"

    @property
    def scheduler_metric(self) -> str:
        return "objective"

    def extra(self, metrics: dict[str, Any]) -> dict[str, Any]:
        value, cost = metrics.get(self.cfg.metric), metrics.get(self.cfg.cost)
        if value is None or cost is None:
            return {}
        feasible = cost <= self.cfg.budget
        penalty = 0.0 if feasible else (-1.0 if self.cfg.mode == "max" else 1.0)
        return {"feasible": feasible, "objective": value + penalty}

    def candidates(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in super().candidates(rows) if r.get(self.cfg.cost, 0) <= self.cfg.budget]


@OBJECTIVES.register("pareto")
class Pareto(Objective):
    """Metric against cost: the searcher (multi-objective TPE) sees both; ASHA, which
    ranks on one number, follows the metric. The best trial is the front's most accurate."""

    @property
    def search_metric(self) -> list[str]:
        return [self.cfg.metric, self.cfg.cost]

    @property
    def search_mode(self) -> list[str]:
        return [self.cfg.mode, "min"]

    def candidates(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in super().candidates(rows) if r.get("pareto")]


def pareto_front(points: list[tuple[float, float]], maximize: bool = True) -> list[bool]:
    """Which (quality, cost) points no other point beats on both counts (cost minimised).

    A direct O(n²) scan: sweeps have tens of trials, and this keeps ties explicit (equal
    points all stay on the front)."""
    sign = 1 if maximize else -1

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        better_or_equal = sign * a[0] >= sign * b[0] and a[1] <= b[1]
        return better_or_equal and (sign * a[0] > sign * b[0] or a[1] < b[1])

    return [not any(dominates(q, p) for q in points) for p in points]


def make_objective(cfg: ObjectiveConfig) -> Objective:
    return OBJECTIVES.get(cfg.kind)(cfg)
