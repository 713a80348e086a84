"""``raycv eval`` (a checkpoint on a dataset) and ``raycv data preview`` (augmented samples)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from raycv import checkpoint, plots
from raycv.config import Config, dump_config, from_dict
from raycv.data.augment import denormalize
from raycv.data.pipeline import build_streams
from raycv.errors import DataError
from raycv.models import create_model
from raycv.pruning import fit_to_state_dict
from raycv.runs import RunFolder, write_json, write_manifest
from raycv.session import ensure_ray

log = logging.getLogger(__name__)


def resolve_checkpoint(path: str) -> Path:
    """A run folder means its best checkpoint; anything else is a checkpoint folder or file."""
    p = Path(path)
    manifest = p / "manifest.json"
    if manifest.is_file():
        best = json.loads(manifest.read_text()).get("paths", {}).get("best_checkpoint")
        if not best:
            raise FileNotFoundError(
                f"{p} has no finished checkpoint; train it first or pass checkpoints/epoch_*"
            )
        return p / best
    if not p.exists():
        raise FileNotFoundError(
            f"{p} does not exist; pass a run folder or a checkpoints/epoch_* folder"
        )
    return p


def run_eval(checkpoint_path: str, overrides: list[str]) -> RunFolder:
    source = resolve_checkpoint(checkpoint_path)
    saved = checkpoint.load(source)
    cfg = from_dict(saved["config"], overrides)
    ensure_ray(cfg)
    streams = build_streams(cfg)
    if streams.class_names != saved["class_names"]:
        raise DataError(
            f"the checkpoint knows {len(saved['class_names'])} classes, "
            f"the data has {len(streams.class_names)}; evaluate on data with the same class folders"
        )
    model = create_model(cfg.model.name, len(streams.class_names), None, cfg.model.image_size)
    fit_to_state_dict(model, saved["model"])  # a pruned checkpoint has narrower layers
    matrix = confusion(model, streams.val, len(streams.class_names), cfg.train.batch_size)
    run = RunFolder.create(cfg.run.storage, cfg.experiment, "eval")
    run.config.write_text(dump_config(cfg))
    metrics = accuracy_report(matrix, streams.class_names)
    plots.confusion_matrix(matrix, streams.class_names, run.plots / "confusion.png")
    write_json(run.path / "metrics.json", metrics)
    write_manifest(
        run,
        cfg,
        "finished",
        {"metrics": metrics, "paths": {"confusion": "plots/confusion.png"}},
        kind="eval",
        parent=str(source.resolve()),
    )
    width = max(map(len, streams.class_names))
    lines = [f"  {c.ljust(width)}  {a:.4f}" for c, a in metrics["per_class_acc"].items()]
    log.info("accuracy %.4f on %d images\n%s", metrics["acc"], matrix.sum(), "\n".join(lines))
    return run


@torch.no_grad()
def confusion(model: torch.nn.Module, dataset, num_classes: int, batch_size: int) -> np.ndarray:
    model.eval()
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for batch in dataset.iter_torch_batches(batch_size=batch_size):
        predicted = model(batch["image"]).argmax(dim=1).numpy()
        np.add.at(matrix, (batch["label"].numpy(), predicted), 1)
    return matrix


def accuracy_report(matrix: np.ndarray, class_names: list[str]) -> dict:
    per_class = matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)
    return {
        "acc": float(matrix.diagonal().sum() / max(matrix.sum(), 1)),
        "per_class_acc": {c: float(a) for c, a in zip(class_names, per_class)},
        "confusion_matrix": matrix.tolist(),
    }


def run_preview(cfg: Config, count: int) -> RunFolder:
    ensure_ray(cfg)
    streams = build_streams(cfg)
    batch = streams.train.take_batch(count, batch_format="numpy")
    images = denormalize(batch["image"], cfg.augment)
    titles = [streams.class_names[i] for i in batch["label"]]
    run = RunFolder.create(cfg.run.storage, cfg.experiment, "preview")
    run.config.write_text(dump_config(cfg))
    plots.image_grid(images, titles, run.plots / "preview.png")
    write_manifest(
        run, cfg, "finished", {"paths": {"preview": "plots/preview.png"}}, kind="preview"
    )
    return run
