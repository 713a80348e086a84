"""What ``--resume`` may change. A resumed run goes on with the config saved in its folder;
a key given again on the command line with another value is either applied, when it changes
how long the run goes on, how it survives failures or where its files are, not what it
trains, or refused before Ray starts with one line naming each key and the fix. Never
accepted and then ignored."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Any

from raycv.config import Config, ConfigError, validate
from raycv.redact import REDACTED, is_secret, redact

log = logging.getLogger(__name__)

# The keys that found the run folder: every stage may take them.
LOCATORS = frozenset({"experiment", "run.storage"})
# A train or finetune run may also read its data from where it was moved (the classes are
# checked against the run's before training), go on for longer (the learning-rate schedule
# is drawn again for the new length, from the epoch it stopped at), survive more failures
# and keep more or fewer checkpoints, and log to other experiment trackers (an MLflow or W&B
# run that this run folder started goes on; one turned on now gets the earlier epochs too)
# or print its progress lines at another interval.
TRAINING = LOCATORS | {"data.folder.root", "train.epochs", "run.max_failures", "checkpoint.keep"}
TRAINING |= {"run.loggers", "run.mlflow.tracking_uri", "run.wandb.mode", "run.progress_every_s"}


def given_keys(overrides: Sequence[str]) -> list[str]:
    """The dotted keys of ``key=value`` overrides."""
    return [item.partition("=")[0] for item in overrides]


def resumed_config(
    saved: Config, given: Config, keys: Sequence[str], may_change: Collection[str], run: str
) -> Config:
    """``saved`` with the values ``given`` has at ``keys`` (what the user set now) where
    they differ and ``may_change`` allows them; raises ConfigError naming the others."""
    then, now = saved.model_dump(mode="json"), given.model_dump(mode="json")
    changed = {k: (_at(then, k), _at(now, k)) for k in dict.fromkeys(keys)}
    changed = {k: pair for k, pair in changed.items() if pair[0] != pair[1]}
    refused = [k for k in changed if k not in may_change]
    if refused:
        listed = ", ".join(f"{k} ({_shown(k, *changed[k])})" for k in refused)
        allowed = ", ".join(sorted(may_change)) or "nothing"
        raise ConfigError(
            f"--resume goes on with the config saved in {run} and cannot change {listed}; "
            f"it may change {allowed}. Drop those overrides to resume, or start a new run "
            f"from this one's weights with them: raycv finetune CONFIG --from {run} KEY=VALUE"
        )
    if "train.epochs" in changed and changed["train.epochs"][1] < changed["train.epochs"][0]:
        raise ConfigError(
            f"--resume can add epochs, not remove them: train.epochs="
            f"{changed['train.epochs'][1]} is fewer than the {changed['train.epochs'][0]} "
            f"{run} was started with; stop early with Ctrl-C instead, its best epoch is kept"
        )
    for key, (before, value) in changed.items():
        log.info("--resume: %s %s", key, _shown(key, before, value))
        _put(then, key, value)
    return validate(then)


def _at(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _put(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _shown(key: str, then: Any, now: Any) -> str:
    if is_secret(key):
        return f"saved {REDACTED}, given {REDACTED}"
    return f"saved {redact(then)!r}, given {redact(now)!r}"  # secrets inside a mapping too
