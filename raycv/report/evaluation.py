"""The pipeline's final model evaluated again on its validation split: the confusion matrix
and the most confident mistakes the report shows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raycv.artifacts import load_trained, read_manifest
from raycv.evaluate import (
    Mistake,
    accuracy_report,
    feed,
    predictions,
    streams_for,
    worst_mistakes,
)
from raycv.tasks import build_task
from raycv.tasks.base import EvalResult

MISTAKES = 16  # worst mistakes shown


@dataclass
class Evaluation:
    """The final model on its validation split."""

    stage: str  # the pipeline stage whose model it is
    checkpoint: Path
    class_names: list[str]
    matrix: np.ndarray | None  # confusion matrix of images, rows are true classes
    mistakes: list[Mistake]
    result: EvalResult | None = None  # a task without per-image labels: its own eval report
    folder: Path | None = None  # where that report drew its pictures

    @property
    def num_images(self) -> int:
        return int(self.matrix.sum())

    @property
    def accuracy(self) -> float:
        return accuracy_report(self.matrix, self.class_names)["acc"]

    @property
    def per_class_acc(self) -> dict[str, float]:
        return accuracy_report(self.matrix, self.class_names)["per_class_acc"]


def evaluate_final(pipeline_dir: str | Path, mistakes: int = MISTAKES) -> Evaluation:
    """The pipeline's final model on the validation split of that model's own config (one
    pass over the data). Starts or joins Ray. Per-image labels give the confusion matrix
    and the worst mistakes; any other task's own eval report (``Task.eval_report``) is
    written under ``report/final_eval/`` and shown as it is."""
    pipeline_dir = Path(pipeline_dir)
    final = (read_manifest(pipeline_dir) or {}).get("final_model")
    if not final:
        raise FileNotFoundError(
            f"{pipeline_dir} names no final model yet (manifest.json final_model); "
            "run the pipeline's finetune stage first"
        )
    trained = load_trained(pipeline_dir / final)
    cfg = trained.config
    streams = streams_for(trained, cfg)
    task = build_task(cfg, streams.class_names)
    if "label" not in task.targets:
        report = task.eval_report()
        feed(report, task, trained.model, streams.val, cfg.train.batch_size, cfg.augment)
        folder = pipeline_dir / "report" / "final_eval"
        folder.mkdir(parents=True, exist_ok=True)
        result = report.write(folder)
        return Evaluation(final, trained.checkpoint, trained.class_names, None, [], result, folder)
    preds = predictions(
        trained.model,
        streams.val,
        cfg.train.batch_size,
        cfg.augment,
        keep_mistakes=mistakes,
    )
    return Evaluation(
        stage=final,
        checkpoint=trained.checkpoint,
        class_names=trained.class_names,
        matrix=preds.confusion(len(trained.class_names)),
        mistakes=worst_mistakes(preds, trained.class_names, mistakes),
    )
