"""``raycv predict``: a trained model's outputs for image files, in batches, with Ray Data.

Every non-hidden file under the given paths (folders are walked recursively) becomes one
row; files that are not readable images are reported, not fatal. The steps are those of
evaluation: ``raycv.data.images.decode`` to the working size (the whole image squeezed
into the square where the task scores whole frames), the eval preset, the model (an actor
pool, one GPU per actor when the cluster has GPUs), then the task's own per-file work.

The predict run folder holds ``predictions.parquet`` and ``predictions.csv``, one row per
file in the order the files were listed, with the columns ``path``, the task's own and
``error`` (``""`` for a good image, else why the file could not be read). In the CSV, list
cells are ``;``-joined (a box's four numbers space-separated). What the task writes
(``Task.prediction_writer``):

* classification (``TopKWriter``): ``class``, ``score``, ``top_classes``, ``top_scores``;
* segmentation (``MaskWriter``): ``masks/<name>.png`` (class ids at the file's own size)
  and ``overlays/<name>.jpg`` per file, and the columns ``mask``, ``overlay`` and
  ``area/<class>`` (each class's share of the image);
* detection (``BoxWriter``): ``overlays/<name>.jpg`` per file (its boxes drawn), and the
  columns ``overlay``, ``count``, ``boxes`` (in the file's own pixels), ``classes`` and
  ``scores``.

Local paths must be readable by every Ray node: on a multi-node cluster, keep the images
(and the checkpoint) on shared storage.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch

from raycv.artifacts import checkpoint_file, load_checkpoint, load_trained
from raycv.config import Config, dump_config, from_dict
from raycv.data.augment import normalize
from raycv.data.images import decode_batch
from raycv.data.pipeline import preset_of
from raycv.data.preset_step import PresetStep
from raycv.errors import DataError
from raycv.runs import RunFolder, write_manifest
from raycv.session import ensure_ray
from raycv.tasks import TASKS, build_task
from raycv.tasks.base import PredictionWriter

log = logging.getLogger(__name__)

CSV_FILE = "predictions.csv"
PARQUET_FILE = "predictions.parquet"
# Model actors: each holds a copy of the model (and, with GPUs, one GPU).
MAX_ACTORS = 4
MAX_CPU_ACTORS = 2  # on CPUs the decode tasks need cores too
_SHOWN_BAD = 3  # bad files named in the warning


def run_predict(
    artifact: str | Path,
    paths: list[str],
    *,
    top_k: int = 5,
    batch_size: int = 64,
    run: RunFolder | None = None,
) -> RunFolder:
    """Predict every file under ``paths`` with the model of ``artifact`` (any run folder,
    checkpoint folder or checkpoint file); returns the run folder. ``top_k``: classes kept
    per image, where the task ranks classes."""
    file = checkpoint_file(artifact).resolve()
    saved = load_checkpoint(file)  # the driver needs only the config and the class names
    cfg, class_names = from_dict(saved["config"]), list(saved["class_names"])
    del saved
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1 (got {top_k})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
    files = list_files(paths)

    ensure_ray(cfg)
    if run is None:
        run = RunFolder.create(cfg.run.storage, cfg.experiment, "predict")
    if not run.config.is_file():
        run.config.write_text(dump_config(cfg))
    write_manifest(run, cfg, "running", kind="predict", parent=str(file))
    writer = build_task(cfg, class_names).prediction_writer(files, run.path, top_k)
    try:
        outputs = _predictions(files, file, cfg, writer, batch_size)
        for batch in outputs.iter_batches(batch_format="numpy", batch_size=None):
            writer.collect(batch)  # the task's files are written as their batches come
        table = writer.table()
        pq.write_table(table, run.path / PARQUET_FILE)
        _csv(table).to_csv(run.path / CSV_FILE, index=False)
    except Exception as e:  # the run folder says why before the error reaches the caller
        error = {"error": f"{type(e).__name__}: {e}"}
        write_manifest(run, cfg, "failed", error, kind="predict", parent=str(file))
        raise
    bad = [p for p, e in zip(table["path"].to_pylist(), table["error"].to_pylist()) if e]
    if bad:
        log.warning(
            "%d of %d files are not readable images and have no prediction (their error is in "
            "the 'error' column), e.g. %s",
            len(bad),
            len(files),
            ", ".join(bad[:_SHOWN_BAD]),
        )
    write_manifest(
        run,
        cfg,
        "finished",
        {
            "counts": {"files": len(files), "predicted": len(files) - len(bad), "bad": len(bad)},
            **writer.settings,
            "inputs": [str(p) for p in paths],
            "paths": {
                "predictions_parquet": PARQUET_FILE,
                "predictions_csv": CSV_FILE,
                **writer.paths,
            },
        },
        kind="predict",
        parent=str(file),
    )
    log.info("predicted %d images (%d bad files) -> %s", len(files) - len(bad), len(bad), run.path)
    return run


def list_files(paths: list[str]) -> list[str]:
    """Absolute paths of the given files and of every non-hidden file under the given
    folders (recursively, hidden folders skipped), each once, in a stable order."""
    if not paths:
        raise DataError("no input paths; pass image files or folders that hold them")
    files: dict[str, None] = {}  # ordered and unique
    for given in paths:
        p = Path(given).expanduser()
        if not p.exists():
            raise FileNotFoundError(
                f"{given} does not exist; pass image files or folders that hold them"
            )
        if p.is_file():
            files[str(p.resolve())] = None
            continue
        for folder, subfolders, names in os.walk(p.resolve()):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            for name in sorted(names):
                if not name.startswith("."):
                    files[os.path.join(folder, name)] = None
    if not files:
        raise DataError(
            f"no files under {', '.join(map(str, paths))} (hidden files are skipped); "
            "pass folders that hold images"
        )
    return list(files)


def _predictions(
    files: list[str],
    checkpoint_path: Path,
    cfg: Config,
    writer: PredictionWriter,
    batch_size: int,
) -> ray.data.Dataset:
    """Read, decode, preprocess (tasks), run the model (an actor pool) and the task's
    per-file work (tasks) on every file."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    pool = min(gpus, MAX_ACTORS) if gpus else MAX_CPU_ACTORS
    actors = min(pool, math.ceil(len(files) / batch_size))  # no model copy left idle
    log.info(
        "predicting %d files with %s, %d model actor(s) on %s",
        len(files),
        cfg.model.name,
        actors,
        "GPU" if gpus else "CPU",
    )
    task = TASKS.get(cfg.task)
    whole, boxes = task.whole_frame, "boxes" in task.targets
    ds = ray.data.read_binary_files(files, include_paths=True)
    ds = ds.map_batches(_Decode(cfg.working_size, whole, boxes), batch_size=batch_size)
    ds = ds.map_batches(PresetStep.of(preset_of(cfg, train=False)), batch_size=batch_size)
    ds = ds.map_batches(
        _Predictor,
        fn_constructor_kwargs={
            "checkpoint_path": str(checkpoint_path),
            "writer": writer,
            "gpu": gpus > 0,
        },
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0,
    )
    return ds if writer.render is None else ds.map_batches(writer.render, batch_size=None)


@dataclass(frozen=True)
class _Decode:
    """Ray Data batch function: file bytes -> images at the working size (centre-cropped,
    or ``whole`` images squeezed into the square); bad files flagged. ``boxes``: each image
    also gets its aspect ratio and no boxes, so that the eval preset treats it as evaluation
    does (a detector's photos are letterboxed, not squeezed)."""

    size: int
    whole: bool
    boxes: bool = False

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, aspects, errors = decode_batch(batch["bytes"], batch["path"], self.size, self.whole)
        out = {"image": images, "path": batch["path"], "error": errors}
        if self.boxes:
            n = len(images)
            none = {"boxes": np.zeros((n, 0, 4), np.float32), "labels": np.zeros((n, 0), np.int64)}
            out |= {"aspect": aspects, **none}
        return out


class _Predictor:
    """Ray Data actor: preprocessed images -> the task's columns (``writer.columns``).

    Loads the model itself from the checkpoint file, so each actor reads the weights once
    instead of receiving a pickled model with every task."""

    def __init__(self, checkpoint_path: str, writer: PredictionWriter, gpu: bool) -> None:
        self.device = torch.device("cuda" if gpu else "cpu")
        trained = load_trained(checkpoint_path)
        self.model = trained.model.to(self.device)
        self.task = build_task(trained.config, trained.class_names)
        self.augment = trained.config.augment
        self.writer = writer

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Ray may hand over read-only views of its object store; torch needs a writable array.
        images = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"]))
        with torch.inference_mode():
            image = normalize(images.to(self.device), self.augment)
            outputs = self.task.forward(self.model, {"image": image})
            columns = self.writer.columns(outputs, batch["error"] != "")
        return {"path": batch["path"], "error": batch["error"], **columns}


def _csv(table: pa.Table) -> pd.DataFrame:
    """The table as the CSV shows it: list cells ``;``-joined, numbers in them to 6
    significant digits."""
    frame = table.to_pandas()
    for column in table.schema:
        if pa.types.is_list(column.type):
            text = _cell_text(column.type.value_type)
            frame[column.name] = [";".join(map(text, cell)) for cell in frame[column.name]]
    return frame


def _cell_text(value_type: pa.DataType):
    """How one item of a list cell is written: numbers to 6 significant digits, and a list of
    numbers (a box) as its numbers separated by spaces."""
    number = "{:.6g}".format
    if pa.types.is_list(value_type):
        return lambda items: " ".join(map(number, items))
    return number if pa.types.is_floating(value_type) else str
