"""Running a command for a wall-clock budget and reading its epochs as they land.

Shared by the benches that compare raycv with a plain loop at equal wall-clock
(``real_photos.py``, ``real_masks.py``, ``real_boxes.py``) and by ``det_shapes.py``:

* ``watch`` launches a command in its own process group, calls a poller every ``POLL_S``
  seconds, and stops the whole group (SIGINT, then SIGKILL after ``GRACE_S``) when the
  budget counted from the launch is spent;
* ``JsonLines`` reads a plain loop's epochs, one JSON line each in its stdout, stamped by
  its own clock; ``RaycvMetrics`` reads a raycv run folder's ``metrics.jsonl`` and stamps
  each epoch with the moment the bench first saw it (up to ``POLL_S`` of polling lag);
* ``summarise`` keeps the epochs within the budget, the best by a metric and the last;
  ``run`` calls each method in turn in its own log folder, ``measure`` wraps a whole bench
  (temporary folder, machine info, JSON file, header).

Imported by the scripts next to it (``python scripts/bench/<name>.py`` puts this folder first
on ``sys.path``); not part of the ``raycv`` package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import results
from train_throughput import START_TIMEOUT

log = logging.getLogger("bench")

POLL_S = 2.0  # how often the bench looks for a new epoch
GRACE_S = 30.0  # after SIGINT, before SIGKILL: Ray needs a while to stop its workers


# ---------------------------------------------------------------- options


def add_method_options(group: argparse._ArgumentGroup, methods: tuple[str, ...]) -> None:
    """--raycv-arg and --only, as every raycv-against-a-plain-loop bench takes them."""
    group.add_argument(
        "--raycv-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra dotted override for raycv train, after the bench's own (repeatable)",
    )
    group.add_argument(
        "--only",
        choices=methods,
        help="run one method alone (debugging; the goal is then not checked)",
    )


def check_raycv_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    bad = [a for a in args.raycv_arg if "=" not in a]
    if bad:
        p.error(f"--raycv-arg takes KEY=VALUE, e.g. optimizer.lr=3e-3 (got {bad[0]!r})")


# ---------------------------------------------------------------- reading epochs


class JsonLines:
    """A plain loop's epochs: the JSON lines in its stdout file, stamped by its own clock."""

    def __init__(self, stdout: Path) -> None:
        self.stdout, self.epochs = stdout, []

    def poll(self) -> None:
        text = self.stdout.read_text() if self.stdout.is_file() else ""
        # A line still being written has no newline yet: leave it for the next poll.
        self.epochs = [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


class RaycvMetrics:
    """raycv's epochs from the run folder under ``runs`` (``run.storage/<experiment>``; a
    fresh one holds one run), its metrics.jsonl rewritten whole by MetricsRecorder after
    every epoch; each epoch stamped with the time the bench first saw it. Each epoch keeps
    ``keys`` and every key starting with one of ``prefixes``."""

    def __init__(
        self, runs: Path, launched: float, keys: Iterable[str], prefixes: Iterable[str] = ()
    ) -> None:
        self.runs, self.launched, self.epochs = runs, launched, []
        self.keys, self.prefixes = tuple(keys), tuple(prefixes)

    @property
    def folder(self) -> Path | None:
        """The run folder, once raycv has made it."""
        found = sorted(p for p in self.runs.glob("*") if p.is_dir()) if self.runs.is_dir() else []
        return found[0] if found else None

    def poll(self) -> None:
        from raycv.runs import read_metrics

        now = time.time()
        found = sorted(self.runs.glob("*/metrics.jsonl"))
        if not found:
            return
        written = found[0].stat().st_mtime - self.launched
        for row in read_metrics(found[0])[len(self.epochs) :]:
            self.epochs.append(self._epoch(row, now - self.launched, written))

    def _epoch(self, row: dict[str, Any], seen: float, written: float) -> dict[str, Any]:
        started = row.get("epoch_started_at")
        kept = {k: row.get(k) for k in self.keys}
        if self.prefixes:
            kept |= {k: v for k, v in row.items() if k.startswith(self.prefixes)}
        return {
            **kept,
            "first_batch_s": row.get("first_batch_s"),
            "seconds": seen,
            "written_s": written,  # the file's mtime: how much of `seconds` was polling lag
            "epoch_started_s": None if started is None else started - self.launched,
        }


# ---------------------------------------------------------------- watching a command


def watch(
    cmd: list[str], launched: float, budget_s: float, poll: Callable[[], None], logs: Path
) -> dict[str, Any]:
    """Run ``cmd`` in its own process group, calling ``poll`` every POLL_S s, until it exits or
    ``budget_s`` after ``launched`` has passed; then stop the whole group."""
    env = {**os.environ, **{k: v for k, v in START_TIMEOUT.items() if k not in os.environ}}
    deadline = launched + budget_s
    with (logs / "stdout").open("w") as out, (logs / "stderr").open("w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        while proc.poll() is None and time.time() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):  # time to poll again
                proc.wait(timeout=max(0.0, min(POLL_S, deadline - time.time())))
            poll()
        stopped = proc.poll() is None
        stop_group(proc)
    poll()  # what the command wrote as it stopped; it lands after the budget and is not counted
    return {"returncode": proc.returncode, "stopped_at_budget": stopped}


def stop_group(proc: subprocess.Popen) -> None:
    """SIGINT (raycv saves and shuts Ray down), SIGKILL after GRACE_S, and SIGKILL for what is
    left of the group even after a clean exit: Ray's processes and DataLoader workers share it."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("still running %.0f s after SIGINT: SIGKILL", GRACE_S)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # every process of the group has exited
        os.killpg(pgid, sig)


def failed(watched: dict[str, Any], logs: Path) -> str | None:
    """The error of a command that exited non-zero on its own (not stopped by the bench)."""
    if watched["stopped_at_budget"] or watched["returncode"] == 0:
        return None
    tail = "\n".join((logs / "stderr").read_text().strip().splitlines()[-15:])
    return f"exit status {watched['returncode']}:\n{tail}"


def raycv_command(config: Path, overrides: list[str]) -> list[str]:
    """``raycv train config *overrides`` through the virtualenv's console script, else
    ``python -m raycv``; the overrides checked first."""
    from raycv.config import ConfigError, load_config

    try:  # a typo fails here in a second, not after a launch that the budget pays for
        load_config(config, overrides)
    except (ConfigError, OSError, ValueError) as e:
        raise SystemExit(f"error: {config} with {' '.join(overrides)}: {e}") from e
    script = Path(sys.executable).with_name("raycv")
    head = [str(script)] if script.is_file() else [sys.executable, "-m", "raycv"]
    return [*head, "train", str(config), *overrides]


# ---------------------------------------------------------------- results


def summarise(
    cmd: list[str],
    epochs: list[dict[str, Any]],
    watched: dict[str, Any],
    error: str | None,
    budget_s: float,
    metric: str = "val_acc",
) -> dict[str, Any]:
    """A method's epochs within the budget, its best by ``metric`` and its last."""
    counted = [e for e in epochs if e["seconds"] <= budget_s]
    scored = [e for e in counted if e.get(metric) is not None]
    best = max(scored, key=lambda e: e[metric], default=None)  # the earliest of ties
    first = epochs[0] if epochs else {}
    return {
        "command": cmd,
        **watched,
        "error": error,
        "epochs_within_budget": len(counted),
        "best": best,
        "last": counted[-1] if counted else None,
        "first_epoch_s": first.get("seconds"),
        "epoch1_started_s": first.get("epoch_started_s"),
        "epoch1_first_batch_s": first.get("first_batch_s"),
        "epochs": epochs,  # every one seen, including any that landed after the budget
    }


def score(value: float | None) -> str | None:
    """A metric as the tables show it (None: an empty cell)."""
    return None if value is None else f"{value:.3f}"


def beats_line(
    out: dict[str, dict[str, Any]], metric: str, claim: str, baseline: str, margin: float = 0.0
) -> str:
    """The goal line of a bench of raycv against a ``baseline`` method: met when raycv's
    best ``metric`` is at least the baseline's plus ``margin``."""
    if set(out) != {baseline, "raycv"}:
        return f"{claim}: not checked (--only {next(iter(out))})"
    raycv, base = (out[k]["best"][metric] if out[k]["best"] else None for k in ("raycv", baseline))
    met = raycv is not None and (base is None or raycv >= base + margin)
    shown = [score(v) or "no epoch" for v in (raycv, base)]
    verdict = "met" if met else "NOT met"
    return f"{claim}: {verdict} (raycv {shown[0]} vs {baseline} {shown[1]})"


def run(
    args: argparse.Namespace, tmp: Path, methods: dict[str, Callable]
) -> dict[str, dict[str, Any]]:
    """Each method (name -> function of args and its log folder) in turn; ``args.only``
    runs one."""
    out = {}
    for name, method in methods.items():
        if getattr(args, "only", None) in (None, name):
            log.info("%s: up to %.0f s from launch ...", name, args.budget_s)
            logs = tmp / name
            logs.mkdir()
            out[name] = method(args, logs)
            if out[name]["error"]:
                log.error("%s failed: %s", name, out[name]["error"])
    return out


def measure(
    args: argparse.Namespace,
    run: Callable,
    benchmark: str,
    goal: dict[str, float],
    title: str,
    private: tuple[str, ...],
) -> dict[str, dict[str, Any]]:
    """``run(args, tmp)`` in a temporary folder, its results written to ``args.out`` with
    the machine and the options (less the subprocess's ``private`` ones); prints the header."""
    results.setup_logging()
    info = results.machine()
    with tempfile.TemporaryDirectory(prefix="raycv-bench-") as tmp:
        out = run(args, Path(tmp))
    info["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    options = {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in private
    }
    data = {"benchmark": benchmark, "machine": info, "args": options, "goal": goal}
    results.write(args.out, data | {"methods": out})
    print(results.header(title, info))
    print()
    return out
