"""``raycv eval`` (a checkpoint on a dataset) and ``raycv data preview`` (augmented samples).
What each measures and draws is the task's (``Task.eval_report``, ``Task.preview``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from raycv import plots
from raycv.artifacts import Trained, load_trained
from raycv.config import AugmentConfig, Config, dump_config, from_dict
from raycv.data.augment import displayable, normalize
from raycv.data.pipeline import Streams, build_streams
from raycv.errors import DataError
from raycv.runs import RunFolder, write_json, write_manifest
from raycv.session import ensure_ray
from raycv.tasks import Task, build_task
from raycv.tasks.base import EvalReport

# report/evaluation.py reads classification's scores from here.
from raycv.tasks.classification import accuracy_report as accuracy_report

log = logging.getLogger(__name__)


def run_eval(checkpoint_path: str, overrides: list[str]) -> RunFolder:
    trained = load_trained(checkpoint_path)
    cfg = from_dict(trained.config.model_dump(mode="json"), overrides)
    streams = streams_for(trained, cfg)
    task = build_task(cfg, streams.class_names)
    report = task.eval_report()
    feed(report, task, trained.model, streams.val, cfg.train.batch_size, cfg.augment)
    run = RunFolder.create(cfg.run.storage, cfg.experiment, "eval")
    run.config.write_text(dump_config(cfg))
    result = report.write(run.path)
    write_json(run.path / "metrics.json", result.metrics)
    write_manifest(
        run,
        cfg,
        "finished",
        {"metrics": result.metrics, "paths": result.paths},
        kind="eval",
        parent=str(trained.checkpoint.resolve()),
    )
    log.info("%s", result.summary)
    return run


@torch.no_grad()
def feed(
    report: EvalReport,
    task: Task,
    model: torch.nn.Module,
    dataset,
    batch_size: int,
    augment: AugmentConfig,
) -> None:
    """``report`` every prepared batch of ``dataset`` with ``model``'s outputs for it
    (``augment``: the normalisation the model was trained with)."""
    model.eval()
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
        report.process(batch, task.forward(model, {"image": _model_input(batch, augment)}))


def _model_input(batch: dict[str, np.ndarray], augment: AugmentConfig) -> torch.Tensor:
    # Ray may hand over read-only views of its object store; torch wants writable arrays.
    return normalize(torch.from_numpy(np.require(batch["image"], requirements=["W"])), augment)


def streams_for(trained: Trained, cfg: Config) -> Streams:
    """Start or join Ray and build ``cfg``'s data, which must hold the classes the model
    knows in the same order: a label index means the same class to both."""
    ensure_ray(cfg)
    streams = build_streams(cfg)
    if streams.class_names != trained.class_names:
        raise DataError(
            f"the model knows classes {trained.class_names}, the data has "
            f"{streams.class_names}; point data.* at data with the same class folders"
        )
    return streams


@dataclass
class Predictions:
    """A model's outputs over a dataset, one row per image in the order the dataset yields them."""

    labels: np.ndarray  # int64 (N,)
    probs: np.ndarray  # float32 (N, C): softmax of the logits
    # row -> uint8 (H, W, 3) display copy, for the rows kept for showing (see ``predictions``)
    images: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def confidence(self) -> np.ndarray:
        """The probability of the predicted class."""
        return self.probs.max(axis=1)

    def confusion(self, num_classes: int) -> np.ndarray:
        """Counts of (true, predicted) pairs: rows are true classes."""
        matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(matrix, (self.labels, self.predicted), 1)
        return matrix


@dataclass(frozen=True)
class Mistake:
    index: int  # row in the dataset
    true: str
    predicted: str
    score: float  # probability given to the wrong class
    image: np.ndarray | None  # uint8 (H, W, 3) when ``predictions`` kept it


@torch.no_grad()
def predictions(
    model: torch.nn.Module,
    dataset,
    batch_size: int,
    augment: AugmentConfig,
    *,
    keep_mistakes: int = 0,
) -> Predictions:
    """Run ``model`` over a stream of ``{"image": uint8 (N, 3, H, W), "label"}`` batches
    (``build_streams(cfg).val``) in one pass, normalised as ``augment`` says.

    Display copies of the ``keep_mistakes`` most confident wrong predictions are kept; only
    those, so memory stays small on a large validation set."""
    model.eval()
    labels, probs = [], []
    shown: dict[int, tuple[float, np.ndarray]] = {}
    offset = 0
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
        p = torch.softmax(model(_model_input(batch, augment)).float(), dim=1).numpy()
        y = batch["label"].astype(np.int64)
        labels.append(y)
        probs.append(p)
        if keep_mistakes:
            _keep_confident_mistakes(shown, batch["image"], y, p, offset, keep_mistakes)
        offset += len(y)
    if not labels:
        return Predictions(np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32))
    return Predictions(
        np.concatenate(labels),
        np.concatenate(probs).astype(np.float32),
        {row: image for row, (_, image) in shown.items()},
    )


def _keep_confident_mistakes(
    shown: dict[int, tuple[float, np.ndarray]],
    images: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    offset: int,
    keep: int,
) -> None:
    """Update ``shown`` (row -> (score, display image)) to the ``keep`` most confident
    mistakes seen so far, copying only the images that make the cut."""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    candidates = {offset + int(i): float(probs[i, predicted[i]]) for i in wrong}
    ranked = sorted(
        [(score, row) for row, (score, _) in shown.items()]
        + [(score, row) for row, score in candidates.items()],
        key=lambda sr: (-sr[0], sr[1]),
    )[:keep]
    new = [row for _, row in ranked if row in candidates]
    pictures = displayable(images[[row - offset for row in new]]) if new else []
    winners = {row for _, row in ranked}
    for row in [r for r in shown if r not in winners]:
        del shown[row]
    for row, picture in zip(new, pictures):
        shown[row] = (candidates[row], picture)


def worst_mistakes(preds: Predictions, class_names: list[str], k: int) -> list[Mistake]:
    """The ``k`` wrong predictions given the highest probability, most confident first."""
    predicted, confidence = preds.predicted, preds.confidence
    wrong = np.flatnonzero(predicted != preds.labels)
    order = wrong[np.lexsort((wrong, -confidence[wrong]))][:k]
    return [
        Mistake(
            index=int(i),
            true=class_names[preds.labels[i]],
            predicted=class_names[predicted[i]],
            score=float(confidence[i]),
            image=preds.images.get(int(i)),
        )
        for i in order
    ]


def confusion(
    model: torch.nn.Module, dataset, num_classes: int, batch_size: int, augment: AugmentConfig
) -> np.ndarray:
    return predictions(model, dataset, batch_size, augment).confusion(num_classes)


def run_preview(cfg: Config, count: int) -> RunFolder:
    ensure_ray(cfg)
    streams = build_streams(cfg)
    # At random, every class in it where rows have one.
    sample = streams.train_sample(count, cfg.seed, augmented=True)
    batch = sample.take_batch(count, batch_format="numpy")
    shown = build_task(cfg, streams.class_names).preview(batch)
    run = RunFolder.create(cfg.run.storage, cfg.experiment, "preview")
    run.config.write_text(dump_config(cfg))
    plots.image_grid(shown.images, shown.titles, run.plots / "preview.png", legend=shown.legend)
    write_manifest(
        run, cfg, "finished", {"paths": {"preview": "plots/preview.png"}}, kind="preview"
    )
    return run
