"""The report's sections in order, and the short ones: the header, the stages table, the
learning curves and the export. Each section reads the pipeline folder and returns its
markdown; images it shows land under ``report/``."""

from __future__ import annotations

import time
from collections.abc import Callable

from raycv import plots
from raycv.report import markdown_text as md
from raycv.report.compression import compression
from raycv.report.final_model import final_model
from raycv.report.folder import PipelineFolder, Stage, is_sparse, relative
from raycv.report.format import (
    DASH,
    fmt_count,
    fmt_duration,
    fmt_ms,
    fmt_pct,
    fmt_size,
    fmt_value,
    missing,
)
from raycv.report.sweep import sweep
from raycv.report.transfer import transfer

TRAINING_STAGES = ("pretrain", "finetune", "scratch", "compress")


def header(pipeline: PipelineFolder) -> str:
    m = pipeline.manifest
    elapsed = m.get("elapsed_s")
    if elapsed is None:
        elapsed = sum(s.elapsed_s or 0 for s in pipeline.stages.values()) or None
    final = m.get("final_model")
    facts = [
        f"Experiment: {md.code(m.get('experiment', DASH))}",
        f"Model: {md.code(m.get('model', DASH))}",
        f"Status: **{md.text(m.get('status', 'unknown'))}**",
        f"Total time: {fmt_duration(elapsed)}",
        f"Final model: {md.code(f'{final}/') if final else 'not trained yet'}",
        f"Code version: {md.code(m.get('code_version', DASH))}",
        f"Pipeline folder: {md.code(pipeline.path.resolve())}",
        f"Written: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
    ]
    title = f"# Pipeline report: {md.text(m.get('experiment', pipeline.path.name))}"
    return title + "\n\n" + "\n".join(f"- {fact}" for fact in facts)


def stages_table(pipeline: PipelineFolder) -> str:
    best = f"Best {pipeline.metric_name}"
    header = ["Stage", "Status", "Time", best, "Params", "MACs", "Latency", "Folder"]
    rows = [_stage_row(pipeline, stage) for stage in pipeline.stages.values()]
    return "\n\n".join(
        [
            "## Stages",
            md.table(header, rows, right={2, 3, 4, 5, 6}),
            f"{best}: the best epoch's {pipeline.metric} on the validation split (for the "
            "sweep: its best trial's). MACs: multiply-accumulates for one image. Latency: "
            "CPU, batch 1.",
        ]
    )


def _stage_row(pipeline: PipelineFolder, stage: Stage) -> list[str]:
    named = [md.text(stage.name), md.text(stage.status)]
    if not stage.ran:
        return [*named, *[DASH] * 5, _folder_link(pipeline, stage)]
    best = stage.best
    params = fmt_count(best.get("params"))
    if is_sparse(best):
        params += f" ({fmt_count(best['nonzero_params'])} nonzero)"
    return [
        *named,
        fmt_duration(stage.elapsed_s),
        _score(best, stage.metric(pipeline.metric), pipeline.metric),
        params,
        fmt_count(best.get("macs")),
        fmt_ms(best.get("latency_ms")),
        _folder_link(pipeline, stage),
    ]


def _score(best: dict, metric: str, column: str) -> str:
    """The stage's best score, named when it is not the column's metric."""
    value = fmt_pct(best.get(metric))
    return value if metric == column or value == DASH else f"{value} ({md.text(metric)})"


def _folder_link(pipeline: PipelineFolder, stage: Stage) -> str:
    if not stage.folder.is_dir():
        return DASH
    if not stage.folder.resolve().is_relative_to(pipeline.path.resolve()):
        return md.code(stage.folder)
    rel = relative(stage.folder, pipeline.path) + "/"
    return md.link(rel, rel)


def learning_curves(pipeline: PipelineFolder) -> str:
    parts = ["## Learning curves"]
    for name in TRAINING_STAGES:
        stage = pipeline.stages[name]
        image = stage.file("curves")
        if image is None and stage.ran and (history := stage.history()):
            image = plots.training_curves(history, pipeline.images_dir / f"curves_{name}.png")
        if image is not None:
            caption = f"{name}: loss and metrics per epoch"
            parts += [f"### {name}", pipeline.figure(f"curves_{name}", image, caption)]
    if len(parts) == 1:
        parts.append("No training stage has finished an epoch yet.")
    return "\n\n".join(parts)


def export(pipeline: PipelineFolder) -> str:
    stage = pipeline.stages["export"]
    if not stage.ran:
        return "## Export\n\n" + pipeline.not_run("export", "Nothing exported")
    metrics = stage.manifest.get("metrics") or {}
    kind_of = {rel: key for key, rel in (stage.manifest.get("paths") or {}).items() if rel}
    rows = []
    for path in sorted(f for f in stage.folder.rglob("*") if f.is_file()):
        kind = kind_of.get(relative(path, stage.folder))
        diff = metrics.get(f"{kind}_max_abs_diff")
        check = "the reference" if kind == "state_dict" else DASH
        rows.append(
            [
                md.link(relative(path, stage.folder), relative(path, pipeline.path)),
                fmt_size(path.stat().st_size),
                check if missing(diff) else f"{diff:.2e}",
            ]
        )
    parts = ["## Export", md.table(["File", "Size", "Max abs diff vs PyTorch"], rows, {1, 2})]
    shown = {f"{k}_max_abs_diff" for k in kind_of.values()}
    other = {k: v for k, v in metrics.items() if "diff" in k and k not in shown}
    if other:
        rows = [[md.code(k), md.text(fmt_value(v))] for k, v in other.items()]
        parts.append(md.table(["Check", "Value"], rows))
    card = stage.folder / "model_card.md"
    if card.is_file():
        parts.append(
            f"The model card: {md.link('export/model_card.md', relative(card, pipeline.path))}."
        )
    return "\n\n".join(parts)


SECTIONS: tuple[Callable[[PipelineFolder], str], ...] = (
    header,
    stages_table,
    transfer,
    learning_curves,
    sweep,
    final_model,
    compression,
    export,
)
