"""The report's "Transfer learning vs training from scratch" section: the fine-tuned model
against the baseline trained from random weights on the same data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from raycv import plots
from raycv.report import markdown_text as md
from raycv.report.folder import PipelineFolder, Stage
from raycv.report.format import DASH, fmt_pct, fmt_points, missing


def transfer(pipeline: PipelineFolder) -> str:
    heading = "## Transfer learning vs training from scratch"
    finetune, scratch = pipeline.stages["finetune"], pipeline.stages["scratch"]
    if not finetune.ran:
        return f"{heading}\n\n{pipeline.not_run('finetune', 'No fine-tuned model')}"
    runs = {"finetune": finetune} | ({"scratch": scratch} if scratch.ran else {})
    parts = [
        heading,
        _runs_table(pipeline, runs),
        _comparison(finetune, scratch, pipeline.metric)
        if scratch.ran
        else pipeline.not_run("scratch", "No baseline trained from scratch"),
        _pretrain_note(pipeline),
    ]
    histories = {name: stage.history() for name, stage in runs.items()}
    if any(histories.values()):
        drawn = plots.transfer_vs_scratch(
            histories, pipeline.images_dir / "transfer_vs_scratch.png", pipeline.metric
        )
        caption = f"{pipeline.metric_name} per epoch"
        parts.append(pipeline.figure("transfer_vs_scratch", drawn, caption))
    return "\n\n".join(parts)


def _runs_table(pipeline: PipelineFolder, runs: dict[str, Stage]) -> str:
    rows = []
    for name, stage in runs.items():
        best = stage.best
        at_epoch = f" (epoch {best['epoch']})" if "epoch" in best else ""
        rows.append(
            [
                md.code(name),
                _starts_from(pipeline, name),
                str(stage.epochs() or DASH),
                fmt_pct(best.get(pipeline.metric)) + at_epoch,
                fmt_pct(stage.final.get(pipeline.metric)),
            ]
        )
    name = pipeline.metric_name
    header = ["Run", "Starts from", "Epochs", f"Best {name}", f"Final {name}"]
    return md.table(header, rows, right={2, 3, 4})


def _starts_from(pipeline: PipelineFolder, name: str) -> str:
    if name == "scratch":
        return "random initialisation"
    if pipeline.stages["pretrain"].ran:
        return f"the {md.code('pretrain/')} stage's model"
    cfg = pipeline.stages[name].config()
    source = (cfg.get("finetune") or {}).get("source") or (cfg.get("model") or {}).get("weights")
    return md.code(source) if source else "random initialisation (no pretrained source)"


def _comparison(finetune: Stage, scratch: Stage, metric: str) -> str:
    tuned, base = finetune.best.get(metric), scratch.best.get(metric)
    if missing(tuned) or missing(base):
        return f"One of the two runs has no {metric} to compare."
    diff = tuned - base
    epochs = (finetune.epochs(), scratch.epochs())
    budget = (
        f"both trained for {epochs[0]} epochs on the same data"
        if epochs[0] == epochs[1]
        else f"but fine-tuning ran {epochs[0]} epochs and scratch {epochs[1]}: "
        "not the same budget, compare the curves at equal epochs"
    )
    text = (
        f"Starting from pretrained weights {'helped' if diff > 0 else 'did not help'}: best "
        f"{metric} **{fmt_points(diff)}** over training from scratch ({fmt_pct(tuned)} against "
        f"{fmt_pct(base)}), {budget}."
    )
    last_tuned, last_base = finetune.final.get(metric), scratch.final.get(metric)
    if not missing(last_tuned) and not missing(last_base):
        text += (
            f" At the last epoch: {fmt_points(last_tuned - last_base)} "
            f"({fmt_pct(last_tuned)} against {fmt_pct(last_base)})."
        )
    return text


def _pretrain_note(pipeline: PipelineFolder) -> str:
    pretrain = pipeline.stages["pretrain"]
    if not pretrain.ran:
        return (
            f"No {md.code('pretrain')} stage ran (status: {md.text(pretrain.status)}): the "
            "fine-tuned model starts from the weights named in its config."
        )
    cfg = pretrain.config()
    metric = pretrain.metric(pipeline.metric)
    model = (cfg.get("model") or {}).get("name", pipeline.manifest.get("model", "the model"))
    epochs = (cfg.get("train") or {}).get("epochs")
    return (
        f"The pretrained weights come from the {md.code('pretrain/')} stage: "
        f"{md.text(model)} trained for {epochs or DASH} epochs on {md.text(_data(cfg))}, "
        f"best {md.text(metric)} {fmt_pct(pretrain.best.get(metric))}."
    )


def _data(cfg: dict[str, Any]) -> str:
    """What the config trains on, in words."""
    data = cfg.get("data") or {}
    source = data.get("source", "shapes")
    describe = _SOURCE_IN_WORDS.get(source)
    return describe(data) if describe else f"the {source} source"


def _shapes(data: dict[str, Any]) -> str:
    s = data.get("shapes") or {}
    classes = s.get("classes")
    kinds = (
        f"{len(classes)} classes ({', '.join(classes)})"
        if classes
        else f"{s.get('num_classes', DASH)} classes"
    )
    return (
        f"the built-in shapes: {kinds}, {s.get('num_images', DASH)} images at "
        f"{s.get('image_size', DASH)} px, {s.get('difficulty', 'easy')}"
    )


def _folder(data: dict[str, Any]) -> str:
    return f"the image folder {(data.get('folder') or {}).get('root')}"


_SOURCE_IN_WORDS: dict[str, Callable[[dict[str, Any]], str]] = {
    "shapes": _shapes,
    "folder": _folder,
}
