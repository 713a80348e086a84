"""``raycv predict``: a trained model's classes for image files, in batches, with Ray Data.

Every non-hidden file under the given paths (folders are walked recursively) becomes one
row; files that are not readable images are reported, not fatal. The steps are those of
evaluation: ``raycv.data.images.decode`` to the working size, the eval preset, the model
(an actor pool, one GPU per actor when the cluster has GPUs).

The predict run folder holds ``predictions.parquet`` and ``predictions.csv``, one row per
file in the order the files were listed, with the columns:

* ``path``: the file.
* ``class``: the top-1 class name; ``""`` for a bad file.
* ``score``: its softmax probability; NaN for a bad file (an empty cell in the CSV).
* ``top_classes`` / ``top_scores``: the ``top_k`` best classes and their probabilities,
  best first. Lists (``list<string>``, ``list<double>``) in Parquet, ``;``-joined strings
  in the CSV; empty for a bad file.
* ``error``: ``""`` for a good image, else why the file could not be read.

Local paths must be readable by every Ray node: on a multi-node cluster, keep the images
(and the checkpoint) on shared storage.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch

from raycv.artifacts import checkpoint_file, load_checkpoint, load_trained
from raycv.config import Config, dump_config, from_dict
from raycv.data.augment import build_preset
from raycv.data.images import decode_batch
from raycv.errors import DataError
from raycv.runs import RunFolder, write_manifest
from raycv.session import ensure_ray

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
    """Predict the class of every file under ``paths`` with the model of ``artifact`` (any
    run folder, checkpoint folder or checkpoint file); returns the run folder."""
    file = checkpoint_file(artifact).resolve()
    saved = load_checkpoint(file)  # the driver needs only the config and the class names
    cfg, class_names = from_dict(saved["config"]), list(saved["class_names"])
    del saved
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1 (got {top_k})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
    top_k = min(top_k, len(class_names))
    files = list_files(paths)

    ensure_ray(cfg)
    if run is None:
        run = RunFolder.create(cfg.run.storage, cfg.experiment, "predict")
    if not run.config.is_file():
        run.config.write_text(dump_config(cfg))
    write_manifest(run, cfg, "running", kind="predict", parent=str(file))
    try:
        table = _table(_predictions(files, file, cfg, top_k, batch_size), files, class_names)
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
            "top_k": top_k,
            "inputs": [str(p) for p in paths],
            "paths": {"predictions_parquet": PARQUET_FILE, "predictions_csv": CSV_FILE},
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
    files: list[str], checkpoint_path: Path, cfg: Config, top_k: int, batch_size: int
) -> ray.data.Dataset:
    """Read, decode, preprocess (tasks) and classify (an actor pool) every file."""
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
    ds = ray.data.read_binary_files(files, include_paths=True)
    ds = ds.map_batches(_Decode(cfg.working_size), batch_size=batch_size)
    ds = ds.map_batches(
        build_preset(cfg.augment.eval_preset, cfg.augment, cfg.model.image_size),
        batch_size=batch_size,
    )
    return ds.map_batches(
        _Predictor,
        fn_constructor_kwargs={
            "checkpoint_path": str(checkpoint_path),
            "top_k": top_k,
            "gpu": gpus > 0,
        },
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0,
    )


@dataclass(frozen=True)
class _Decode:
    """Ray Data batch function: file bytes -> images at the working size; bad files flagged."""

    size: int

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, _, errors = decode_batch(batch["bytes"], batch["path"], self.size)
        return {"image": images, "path": batch["path"], "error": errors}


class _Predictor:
    """Ray Data actor: preprocessed images -> top-k class indices and probabilities.

    Loads the model itself from the checkpoint file, so each actor reads the weights once
    instead of receiving a pickled model with every task."""

    def __init__(self, checkpoint_path: str, top_k: int, gpu: bool) -> None:
        self.device = torch.device("cuda" if gpu else "cpu")
        self.model = load_trained(checkpoint_path).model.to(self.device)
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Ray may hand over read-only views of its object store; torch needs a writable array.
        images = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"]))
        with torch.inference_mode():
            probs = self.model(images.to(self.device)).float().softmax(dim=1)
            scores, indices = probs.topk(self.top_k, dim=1)
        bad = batch["error"] != ""
        scores, indices = scores.cpu().numpy(), indices.cpu().numpy()
        scores[bad], indices[bad] = np.nan, -1
        return {
            "path": batch["path"],
            "top_index": indices,
            "top_score": scores,
            "error": batch["error"],
        }


def _table(ds: ray.data.Dataset, files: list[str], class_names: list[str]) -> pa.Table:
    """The predictions, one row per file in listing order, with class names and lists."""
    rows: dict[str, dict[str, Any]] = {}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for path, indices, scores, error in zip(
            batch["path"], batch["top_index"], batch["top_score"], batch["error"]
        ):
            rows[str(path)] = {"indices": indices, "scores": scores, "error": str(error)}
    missing = [f for f in files if f not in rows]
    if missing:  # every file is read and flagged, so this means a path was rewritten
        raise RuntimeError(f"{len(missing)} files got no prediction, e.g. {missing[0]}")
    top_classes, top_scores, error = [], [], []
    for f in files:
        row = rows[f]
        good = not row["error"]
        top_classes.append([class_names[i] for i in row["indices"]] if good else [])
        top_scores.append([float(s) for s in row["scores"]] if good else [])
        error.append(row["error"])
    return pa.table(
        {
            "path": pa.array(files, pa.string()),
            "class": pa.array([c[0] if c else "" for c in top_classes], pa.string()),
            "score": pa.array([s[0] if s else math.nan for s in top_scores], pa.float64()),
            "top_classes": pa.array(top_classes, pa.list_(pa.string())),
            "top_scores": pa.array(top_scores, pa.list_(pa.float64())),
            "error": pa.array(error, pa.string()),
        }
    )


def _csv(table: pa.Table) -> pd.DataFrame:
    frame = table.to_pandas()
    frame["top_classes"] = [";".join(c) for c in frame["top_classes"]]
    frame["top_scores"] = [";".join(f"{s:.6g}" for s in scores) for scores in frame["top_scores"]]
    return frame
