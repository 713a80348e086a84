"""How a sweep picks and stops trials: searchers (Optuna TPE, random, grid) and trial
schedulers (ASHA early stopping, FIFO full budget), each a registry entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raycv.config import Config
from raycv.registry import Registry
from raycv.sweep.objective import Objective

RANGES = frozenset({"uniform", "loguniform", "randint"})


@dataclass(frozen=True)
class SearcherSpec:
    build: Callable[[Config, Objective, int], Any]  # a Ray Tune searcher, at most N at a time
    kinds: frozenset[str]  # the sampling kinds it can draw from
    grid: bool = False  # every choice becomes a grid axis


def _optuna(cfg: Config, objective: Objective, concurrent: int):
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = OptunaSearch(
        metric=objective.search_metric,
        mode=objective.search_mode,
        sampler=optuna.samplers.TPESampler(seed=cfg.tune.seed),
    )
    return ConcurrencyLimiter(searcher, max_concurrent=concurrent)


def _variants(cfg: Config, objective: Objective, concurrent: int):
    from ray.tune.search import BasicVariantGenerator

    # Tune's own max_concurrent_trials ignores this generator; it limits itself.
    return BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=concurrent)


SEARCHERS: Registry[SearcherSpec] = Registry("searcher")
SEARCHERS.add("optuna", SearcherSpec(_optuna, RANGES | {"choice"}))
SEARCHERS.add("random", SearcherSpec(_variants, RANGES | {"choice", "grid"}))
SEARCHERS.add("grid", SearcherSpec(_variants, frozenset({"choice", "grid"}), grid=True))


def _asha(cfg: Config, objective: Objective):
    from ray.tune.schedulers import ASHAScheduler

    s = cfg.tune.scheduler
    # Time is counted in epochs as the loop reports them, not in Tune iterations: a
    # trial resumed from a checkpoint continues at its epoch, not at 1.
    return ASHAScheduler(
        time_attr="epoch",
        metric=objective.scheduler_metric,
        mode=objective.cfg.mode,
        max_t=cfg.train.epochs,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


def _fifo(cfg: Config, objective: Objective):
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


TRIAL_SCHEDULERS: Registry[Callable[[Config, Objective], Any]] = Registry("trial scheduler")
TRIAL_SCHEDULERS.add("asha", _asha)
TRIAL_SCHEDULERS.add("fifo", _fifo)
