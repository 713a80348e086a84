"""The report's "Final model" section: its training accuracy and, when the caller evaluated
it again (``evaluate_final``), the confusion matrix, per-class accuracy and worst mistakes."""

from __future__ import annotations

import numpy as np

from raycv import plots
from raycv.report import markdown_text as md
from raycv.report.evaluation import Evaluation
from raycv.report.folder import PipelineFolder, relative
from raycv.report.format import DASH, fmt_pct


def _guarded(pipeline: PipelineFolder, final: str) -> str:
    """Why the compressed model is not the final one, when its guard refused it."""
    compress = pipeline.stages.get("compress")
    judged = ((compress.manifest or {}).get("guard") or {}) if compress else {}
    if final == "compress" or judged.get("kept") != 0:
        return ""
    return (
        f" The compress stage ran, but its guard kept this model: no compressed raycv "
        f"checkpoint stayed within {judged['max_drop']:g} points of it (`compress.max_drop`; "
        "see Compression)."
    )


def final_model(pipeline: PipelineFolder) -> str:
    heading = "## Final model"
    final = pipeline.manifest.get("final_model")
    if not final:
        return f"{heading}\n\nThe pipeline has not trained its final model yet."
    stage = pipeline.stages.get(final)
    trained = fmt_pct(stage.best.get(pipeline.metric) if stage else None)
    parts = [
        heading,
        f"The final model is the best checkpoint of {md.code(f'{final}/')}: best "
        f"{pipeline.metric_name} {trained} during training.{_guarded(pipeline, final)}",
    ]
    ev = pipeline.evaluation
    if ev is None:
        parts.append(
            "Not evaluated here: pass raycv.report.evaluate_final(pipeline) to write_report "
            "for the confusion matrix, per-class accuracy and the worst mistakes."
        )
        return "\n\n".join(parts)
    if ev.result is not None:
        return "\n\n".join(parts + _task_report(pipeline, ev))
    drawn = plots.confusion_matrix(ev.matrix, ev.class_names, pipeline.images_dir / "confusion.png")
    parts += [
        f"Evaluated again on its validation split: {fmt_pct(ev.accuracy)} of {ev.num_images} "
        f"images ({len(ev.class_names)} classes), checkpoint "
        f"{md.code(relative(ev.checkpoint, pipeline.path))}.",
        pipeline.figure("confusion", drawn, "confusion matrix: rows are true classes"),
        _per_class_table(ev),
        _mistakes(pipeline, ev),
    ]
    return "\n\n".join(parts)


def _per_class_table(ev: Evaluation) -> str:
    rows = []
    off_diagonal = ev.matrix - np.diag(np.diag(ev.matrix))
    for i, name in enumerate(ev.class_names):
        total, correct = int(ev.matrix[i].sum()), int(ev.matrix[i, i])
        worst = int(off_diagonal[i].argmax())
        confused = (
            f"{md.text(ev.class_names[worst])} ({off_diagonal[i, worst]})"
            if off_diagonal[i, worst]
            else DASH
        )
        acc = correct / total if total else None
        rows.append([md.text(name), str(total), str(correct), fmt_pct(acc), confused])
    header = ["Class", "Images", "Correct", "Accuracy", "Most taken for"]
    return "### Per-class accuracy\n\n" + md.table(header, rows, right={1, 2, 3})


def _mistakes(pipeline: PipelineFolder, ev: Evaluation) -> str:
    heading = "### Most confident mistakes"
    if not ev.mistakes:
        return f"{heading}\n\nNo image of the validation split is misclassified."
    parts = [heading]
    shown = [m for m in ev.mistakes if m.image is not None]
    if shown:
        drawn = plots.image_grid(
            np.stack([m.image for m in shown]),
            [f"{m.true} → {m.predicted} ({m.score:.2f})" for m in shown],
            pipeline.images_dir / "mistakes.png",
            columns=min(8, len(shown)),
        )
        caption = f"the {len(shown)} most confident mistakes: true → predicted (score)"
        parts.append(pipeline.figure("mistakes", drawn, caption))
    rows = [
        [str(rank), md.text(m.true), md.text(m.predicted), f"{m.score:.3f}"]
        for rank, m in enumerate(ev.mistakes, start=1)
    ]
    parts.append(md.table(["Rank", "True", "Predicted", "Score"], rows, right={0, 3}))
    return "\n\n".join(parts)


def _task_report(pipeline: PipelineFolder, ev: Evaluation) -> list[str]:
    """The task's own eval report (``Task.eval_report``): its summary and its pictures."""
    result = ev.result
    parts = [
        f"Evaluated again on its validation split, checkpoint "
        f"{md.code(relative(ev.checkpoint, pipeline.path))}:",
        "```\n" + result.summary + "\n```",
    ]
    for key, rel in result.paths.items():
        picture = ev.folder / rel
        if picture.suffix == ".png" and picture.is_file():
            parts.append(pipeline.figure(f"final_{key}", picture, key.replace("_", " ")))
    return parts
