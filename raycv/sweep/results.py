"""What a finished (or interrupted) sweep leaves behind: the trial table as CSV and
parquet, ``best.yaml``, plots, ``summary.md`` and the manifest."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from raycv import plots
from raycv.config import Config, dump_config, validate
from raycv.runs import RunFolder, best_of, read_metrics, write_manifest
from raycv.sweep.objective import Objective, make_objective, pareto_front
from raycv.sweep.space import apply_sample, flatten, flatten_to_nested
from raycv.sweep.table import fmt
from raycv.sweep.trial import attempts, trial_folder

log = logging.getLogger(__name__)

COSTS = ("params", "nonzero_params", "macs", "latency_ms")


def write_results(run: RunFolder, cfg: Config, results, started: float) -> RunFolder:
    objective = make_objective(cfg.tune.objective)
    results = list(results)
    histories = [read_metrics(trial_folder(run.path, Path(r.path).name).metrics) for r in results]
    rows = [trial_row(run, cfg, r, h, objective) for r, h in zip(results, histories)]
    _mark_front(rows, objective)
    best = objective.best(rows)
    table = pd.DataFrame(rows)
    table.to_csv(run.path / "trials.csv", index=False)
    table.to_parquet(run.path / "trials.parquet", index=False)
    if best:
        trial = validate(apply_sample(cfg.model_dump(mode="json"), _sample(best, cfg)))
        (run.path / "best.yaml").write_text(dump_config(trial))
    paths = _plots(run, cfg, rows, histories)
    unfinished = [r for r in rows if r["status"] == "unfinished"]
    status = "interrupted" if unfinished else "finished"
    (run.path / "summary.md").write_text(summary(cfg, rows, best, paths, status))
    write_manifest(
        run,
        cfg,
        status=status,
        kind="tune",
        extra={
            "metrics": {"best": best or {}},
            "best_trial": best["trial_id"] if best else None,
            "trials": {s: sum(r["status"] == s for r in rows) for s in _statuses(rows)},
            "trial_epochs": sum(r["epochs"] for r in rows),
            "elapsed_s": round(time.time() - started, 1),
            "paths": {
                "best_config": "best.yaml" if best else None,
                "trials": "trials.csv",
                "summary": "summary.md",
                **{k: str(v.relative_to(run.path)) for k, v in paths.items()},
            },
        },
    )
    log.info("\n%s", console_summary(cfg, rows, best, status))
    if status == "interrupted":
        log.info("the sweep was interrupted: run the same command with --resume to continue")
    return run


def trial_row(
    run: RunFolder, cfg: Config, result, history: list[dict[str, Any]], objective: Objective
) -> dict[str, Any]:
    """One trial: its sampled values, its best epoch's metrics, its costs, what it spent."""
    trial_id = Path(result.path).name
    metric = cfg.tune.objective.metric
    best = best_of(history, metric, cfg.tune.objective.mode) or {}
    last = history[-1] if history else {}
    seconds = (result.metrics or {}).get("time_total_s", 0.0)
    row: dict[str, Any] = {
        "trial_id": trial_id,
        "status": _status(result, last, cfg),
        **flatten(result.config or {}),
        "epochs": len(history),
        "best_epoch": best.get("epoch"),
        metric: best.get(metric),
        f"final_{metric}": last.get(metric),
        **{k: last.get(k) for k in COSTS},
        "time_s": round(seconds, 1),
        "worker_cpu_s": round(seconds * _workers(cfg, last) * cfg.scaling.cpus_per_worker, 1),
        "attempts": attempts(trial_folder(run.path, trial_id)),
        "failure": _reason(result.error) if result.error else None,
    }
    return row | objective.extra(row)


def _workers(cfg: Config, last: dict[str, Any]) -> int:
    """The workers of the trial's last epoch (an elastic trial may have run with fewer)."""
    return len(last.get("worker_nodes") or []) or cfg.scaling.max_workers


def _status(result, last: dict[str, Any], cfg: Config) -> str:
    if result.error:
        return "failed"
    if last.get("epoch") == cfg.train.epochs:
        return "finished"
    # Tune ends a trial early only through the scheduler; a sweep cut short (Ctrl-C,
    # a killed driver) leaves its running trials without a final result.
    return "stopped early" if (result.metrics or {}).get("done") is not None else "unfinished"


def _reason(error: BaseException) -> str:
    """The line that says what went wrong, not Ray's wrapper around it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(("raycv.", "RunFailedError", "training failed")) or "Error:" in line:
            return line.removeprefix("raycv.errors.")
    return lines[-1] if lines else type(error).__name__


def _mark_front(rows: list[dict[str, Any]], objective: Objective) -> None:
    metric, cost = objective.cfg.metric, objective.cfg.cost
    scored = [r for r in rows if r.get(metric) is not None and r.get(cost) is not None]
    front = pareto_front([(r[metric], r[cost]) for r in scored], objective.cfg.mode == "max")
    for row in rows:
        row["pareto"] = False
    for row, on_front in zip(scored, front):
        row["pareto"] = on_front


def _sample(row: dict[str, Any], cfg: Config) -> dict[str, Any]:
    return flatten_to_nested({k: row[k] for k in cfg.tune.space})


def _statuses(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({r["status"] for r in rows})


def _plots(
    run: RunFolder, cfg: Config, rows: list[dict[str, Any]], histories: list[list[dict[str, Any]]]
) -> dict[str, Path]:
    metric, cost = cfg.tune.objective.metric, cfg.tune.objective.cost
    by_trial = {r["trial_id"]: h for r, h in zip(rows, histories)}
    out = {"curves": plots.sweep_curves(by_trial, metric, run.plots / "trial_curves.png")}
    ratio_key = "prune.ratio"
    ratios = [r.get(ratio_key, cfg.prune.ratio) for r in rows]
    out["prune_ratio"] = plots.metric_against(
        ratios,
        [r.get(metric) for r in rows],
        "pruning ratio",
        metric,
        run.plots / "prune_ratio.png",
    )
    out["pareto"] = plots.pareto(
        [r.get(cost) for r in rows],
        [r.get(metric) for r in rows],
        [r["pareto"] for r in rows],
        cost,
        metric,
        run.plots / "pareto.png",
    )
    return out


def _table(cfg: Config, rows: list[dict[str, Any]], limit: int | None = None) -> list[list[str]]:
    metric = cfg.tune.objective.metric
    keys = list(cfg.tune.space)
    ranked = sorted(
        rows,
        key=lambda r: (
            r.get(metric) is None,
            -(r.get(metric) or 0) if cfg.tune.objective.mode == "max" else (r.get(metric) or 0),
        ),
    )
    header = ["trial", "status", *keys, "epochs", metric, "MACs (M)", "params (M)", "latency ms"]
    body = [
        [
            r["trial_id"] + (" *" if r.get("pareto") else ""),
            r["status"],
            *(fmt(r.get(k)) for k in keys),
            str(r["epochs"]),
            fmt(r.get(metric)),
            fmt(r["macs"] / 1e6 if r.get("macs") else None),
            fmt(r["nonzero_params"] / 1e6 if r.get("nonzero_params") else None),
            fmt(r.get("latency_ms")),
        ]
        for r in ranked[:limit]
    ]
    return [header, *body]


def summary(cfg: Config, rows, best, paths: dict[str, Path], status: str) -> str:
    table = _table(cfg, rows)
    md = [
        f"# Sweep {cfg.experiment}: {status}",
        "",
        f"{len(rows)} trials, {cfg.tune.searcher} search, {cfg.tune.scheduler.name} scheduler, "
        f"objective {cfg.tune.objective.kind} on {cfg.tune.objective.metric}; "
        f"{sum(r['epochs'] for r in rows)} trial-epochs, "
        f"{sum(r['worker_cpu_s'] for r in rows) / 60:.1f} worker-CPU-minutes.",
        "",
    ]
    if best:
        md += [
            f"**Best trial {best['trial_id']}**: {_describe(best, cfg)}. Train it with "
            "`raycv train best.yaml`.",
            "",
        ]
    md += ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    md += ["| " + " | ".join(r) + " |" for r in table[1:]]
    md += ["", "`*`: on the Pareto front of accuracy against cost.", ""]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        md += (
            ["## Failed trials", ""] + [f"- {r['trial_id']}: {r['failure']}" for r in failed] + [""]
        )
    md += [f"![{name}]({p.relative_to(p.parents[1])})" for name, p in paths.items()]
    return "\n".join(md) + "\n"


def console_summary(cfg: Config, rows, best, status: str) -> str:
    table = _table(cfg, rows, limit=10)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [
        f"sweep {status}: "
        + ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in _statuses(rows))
    ]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in table]
    if best:
        lines.append(f"best: trial {best['trial_id']}, {_describe(best, cfg)}")
    return "\n".join(lines)


def _describe(row: dict[str, Any], cfg: Config) -> str:
    metric = cfg.tune.objective.metric
    values = ", ".join(f"{k}={fmt(row.get(k))}" for k in cfg.tune.space)
    return f"{metric} {fmt(row.get(metric))} with {values}"
