"""The search space: YAML entries keyed by dotted config paths, turned into Ray Tune
domains, and checked against the config tree before Ray starts."""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from raycv.config import Config, ConfigError, SpaceEntry, validate
from raycv.registry import Registry
from raycv.sweep.strategy import SEARCHERS

# Keys a sweep cannot vary: its own settings, where runs are stored, and the epoch budget
# that the trial scheduler measures trials in.
FIXED = ("tune", "run", "experiment", "train.epochs")

SAMPLERS: Registry[Callable[[Any], Any]] = Registry("sampling kind")


def _tune():
    from ray import tune

    return tune


SAMPLERS.add("choice", lambda values: _tune().choice(values))
SAMPLERS.add("grid", lambda values: _tune().grid_search(values))
SAMPLERS.add("uniform", lambda bounds: _tune().uniform(*bounds))
SAMPLERS.add("loguniform", lambda bounds: _tune().loguniform(*bounds))
SAMPLERS.add("randint", lambda bounds: _tune().randint(*bounds))


def param_space(cfg: Config) -> dict[str, Any]:
    """The nested Tune param space; a grid searcher turns every choice into a grid axis."""
    grid = SEARCHERS.get(cfg.tune.searcher).grid
    space: dict[str, Any] = {}
    for key, entry in cfg.tune.space.items():
        _set(space, key, SAMPLERS.get("grid" if grid else entry.kind)(entry.values))
    return space


def check_space(cfg: Config) -> None:
    """Raise ConfigError (one line naming the key) unless every trial config can be valid."""
    space = cfg.tune.space
    if not space:
        raise ConfigError(
            "tune.space is empty; add the keys to search, e.g. "
            "tune.space: {optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}}"
        )
    if cfg.tune.scheduler.grace_period > cfg.train.epochs:
        raise ConfigError(
            f"tune.scheduler.grace_period={cfg.tune.scheduler.grace_period} exceeds "
            f"train.epochs={cfg.train.epochs}; lower it or train longer"
        )
    base = cfg.model_dump(mode="json")
    for key, entry in space.items():
        _check_key(key)
        _check_searcher(cfg.tune.searcher, key, entry)
        for value in _probe_values(entry):
            trial = apply_sample(base, flatten_to_nested({key: value}))
            try:
                validate(trial)
            except ConfigError as e:
                raise ConfigError(f"tune.space.{key}: the value {value!r} fails: {e}") from e


def _check_key(key: str) -> None:
    if key in FIXED or key.split(".")[0] in FIXED:
        raise ConfigError(
            f"tune.space.{key} cannot be searched (fixed for a sweep: {', '.join(FIXED)})"
        )
    model: type[BaseModel] = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the config"
            close = difflib.get_close_matches(part, list(fields), n=1)
            hint = f"; did you mean {'.'.join([*parts[:i], close[0]])}?" if close else ""
            raise ConfigError(f"tune.space.{key}: {where} has no key {part!r}{hint}")
        annotation = fields[part].annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if i < len(parts) - 1 and not is_section:
            raise ConfigError(f"tune.space.{key}: {'.'.join(parts[: i + 1])} is a value")
        if i == len(parts) - 1 and is_section:
            raise ConfigError(f"tune.space.{key} is a section; name one of its keys")
        model = annotation


def _check_searcher(searcher: str, key: str, entry: SpaceEntry) -> None:
    kinds = SEARCHERS.get(searcher).kinds
    if entry.kind not in kinds:
        raise ConfigError(
            f"tune.space.{key}: tune.searcher={searcher} cannot sample {entry.kind}; "
            f"use one of: {', '.join(sorted(kinds))}"
        )


def _probe_values(entry: SpaceEntry) -> list[Any]:
    """Values that stand for every sample: each listed value, or both ends of a range."""
    if entry.kind in ("choice", "grid"):
        return list(entry.values)
    low, high = entry.values
    return [low, high - 1] if entry.kind == "randint" else [low, high]


def apply_sample(base: dict[str, Any], sample: dict[str, Any]) -> dict[str, Any]:
    """``base`` (a config mapping) with a trial's nested sample merged in."""
    merged = copy.deepcopy(base)
    for key, value in flatten(sample).items():
        _set(merged, key, value)
    return merged


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optimizer": {"lr": 0.1}} -> {"optimizer.lr": 0.1}."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def flatten_to_nested(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        _set(nested, key, value)
    return nested


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value
