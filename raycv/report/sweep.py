"""The report's "Sweep" section: what the tune stage tried, its best trial and the top of
its ranked trials."""

from __future__ import annotations

import csv
from typing import Any

from raycv.report import markdown_text as md
from raycv.report.folder import PipelineFolder, Stage, relative
from raycv.report.format import DASH, fmt_duration, fmt_metric, fmt_value, missing

FIGURES = (  # the tune stage's plot (paths key) -> its caption
    ("curves", "{metric} of every trial per epoch"),
    ("prune_ratio", "{metric} against the pruning ratio"),
    ("pareto", "{metric} against cost, with the Pareto front"),
)
TOP_TRIALS = 5


def sweep(pipeline: PipelineFolder) -> str:
    tune = pipeline.stages["tune"]
    if not tune.ran:
        return "## Sweep\n\n" + pipeline.not_run("tune", "No sweep")
    settings = tune.config().get("tune") or {}
    objective = settings.get("objective") or {}
    metric = objective.get("metric") or pipeline.metric
    space = list(settings.get("space") or {})
    parts = [
        "## Sweep",
        _overview(tune, settings, metric),
        _best_trial(tune, metric, space),
        _top_trials(tune, metric, objective.get("mode", "max"), space),
    ]
    summary = tune.file("summary")
    if summary:
        parts.append(
            f"The full ranked table: {md.link('tune/summary.md', relative(summary, pipeline.path))}"
        )
    for key, caption in FIGURES:
        if key == "prune_ratio" and space and "prune.ratio" not in space:
            continue  # drawn for every sweep, but a flat line when the ratio was fixed
        image = tune.file(key)
        if image and image.suffix == ".png":
            parts.append(pipeline.figure(f"tune_{key}", image, caption.format(metric=metric)))
    return "\n\n".join(part for part in parts if part)


def _overview(tune: Stage, settings: dict[str, Any], metric: str) -> str:
    counts = tune.manifest.get("trials") or {}
    by_status = ", ".join(f"{n} {status}" for status, n in counts.items())
    searcher, scheduler = settings.get("searcher"), (settings.get("scheduler") or {}).get("name")
    how = f" ({searcher} search, {scheduler} scheduler)" if searcher and scheduler else ""
    kind = (settings.get("objective") or {}).get("kind", "single")
    summary = (
        f"{sum(counts.values())} trials{how}: {by_status or 'none recorded'}; "
        f"{tune.manifest.get('trial_epochs', DASH)} trial-epochs in "
        f"{fmt_duration(tune.elapsed_s)}; objective: {kind} on "
    )
    return f"{md.text(summary)}{md.code(metric)}."


def _best_trial(tune: Stage, metric: str, space: list[str]) -> str:
    best = tune.best
    if not best:
        return "No trial finished, so there is no best trial."
    trial = tune.manifest.get("best_trial") or best.get("trial_id")
    at_epoch = f" at epoch {best['best_epoch']}" if best.get("best_epoch") else ""
    keys = space or [k for k in best if "." in k]
    values = [[md.code(k), md.text(fmt_value(best.get(k)))] for k in keys]
    return (
        f"Best trial {md.code(trial)}: {md.text(metric)} {fmt_metric(metric, best.get(metric))}"
        f"{at_epoch}, with these sampled values:\n\n{md.table(['Key', 'Value'], values)}"
    )


def _top_trials(tune: Stage, metric: str, mode: str, space: list[str]) -> str | None:
    path = tune.file("trials")
    if path is None or path.suffix != ".csv":
        return None
    with path.open(newline="") as f:
        # Trial ids stay text: "5e732_00000" would read as the float 5e732 = inf.
        rows = [
            {k: v if k == "trial_id" else _csv_value(v) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]
    scored = [r for r in rows if isinstance(r.get(metric), (int, float)) and not missing(r[metric])]
    top = sorted(scored, key=lambda r: r[metric], reverse=mode == "max")[:TOP_TRIALS]
    if not top:
        return None
    header = ["Trial", "Status", *space, "Epochs", metric]
    body = [
        [
            md.code(r.get("trial_id")),
            md.text(r.get("status", DASH)),
            *(md.text(fmt_value(r.get(k))) for k in space),
            fmt_value(r.get("epochs")),
            fmt_metric(metric, r.get(metric)),
        ]
        for r in top
    ]
    intro = f"The {len(top)} best of {len(rows)} trials by {md.text(metric)}:"
    return f"{intro}\n\n{md.table(header, body, right=range(2, len(header)))}"


def _csv_value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text or None
