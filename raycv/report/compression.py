"""The report's "Compression" section: the compress stage's table of variants (the
fine-tuned model, then each pruning, distillation and quantization step), all measured
side by side by that stage, and its trade-off plot."""

from __future__ import annotations

from raycv.compress.table import markdown
from raycv.report import markdown_text as md
from raycv.report.folder import PipelineFolder, Stage


def compression(pipeline: PipelineFolder) -> str:
    stage = pipeline.stages["compress"]
    rows = (stage.manifest or {}).get("compression")
    if not stage.ran or not rows:
        return (
            f"## Compression\n\nNo compression table ({md.code('compress')}: "
            f"{md.text(stage.status)}): the final model is the fine-tuned one."
        )
    parts = ["## Compression", _steps(stage), markdown(rows, (stage.manifest or {}).get("guard"))]
    plot = stage.file("plot")
    if plot is not None:
        parts.append(pipeline.figure("compression", plot, "each variant against the original"))
    return "\n\n".join(parts)


def _steps(stage: Stage) -> str:
    c = stage.config().get("compress") or {}
    prune, done = c.get("prune") or {}, []
    if c.get("student"):
        done.append(f"a {md.code(c['student'])} student was distilled from it")
    if prune.get("ratio"):
        rounds = c.get("steps", 1)
        done.append(
            f"it was pruned ({md.code(prune.get('method', 'channel'))}, ratio "
            f"{prune['ratio']:g}, {md.code(prune.get('importance', 'l1'))} importance"
            f"{f', in {rounds} rounds' if rounds > 1 else ''}) and fine-tuned "
            f"{c.get('epochs')} epochs after each round"
        )
    if c.get("quantize"):
        done.append(f"quantized ({md.code(c['quantize'])}, post-training, calibrated)")
    teacher = (stage.config().get("distill") or {}).get("teacher")
    distilled = f" Fine-tuning was distilled from {md.code(teacher)}." if teacher else ""
    return f"The fine-tuned model is the first row; then {', then '.join(done)}.{distilled}"
