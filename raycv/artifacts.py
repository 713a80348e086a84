"""raycv artifacts on disk and the trained model inside each: one way in for ``finetune``,
``eval``, ``export``, ``predict`` and the report.

An artifact is a stage's run folder (``manifest.json`` says its kind), a checkpoint folder
(``checkpoints/epoch_NNNN``, ``best/``) or a checkpoint file. A checkpoint file is one dict
with ``model`` (state dict), ``class_names`` and ``config``, read with ``weights_only=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from raycv import checkpoint
from raycv.config import Config, from_dict
from raycv.errors import DataError
from raycv.models import create_model
from raycv.pruning import fit_to_state_dict
from raycv.registry import Registry
from raycv.runs import inside

RAYCV_KEYS = frozenset({"model", "config", "class_names"})  # what every raycv checkpoint holds

# kind in manifest.json -> the checkpoint file inside a finished run folder of that kind
_CHECKPOINT_OF: Registry = Registry("artifact kind")


def _best_checkpoint(folder: Path, manifest: dict[str, Any]) -> Path:
    best = manifest.get("paths", {}).get("best_checkpoint")
    if not best:
        raise FileNotFoundError(
            f"{folder} has no finished checkpoint; train it first or pass checkpoints/epoch_*"
        )
    return inside(folder, best, "paths.best_checkpoint") / checkpoint.CHECKPOINT_FILE


for _kind in ("train", "finetune", "compress", "trial"):
    _CHECKPOINT_OF.add(_kind, _best_checkpoint)


@_CHECKPOINT_OF.register("tune")
def _best_trial(folder: Path, manifest: dict[str, Any]) -> Path:
    trial = manifest.get("best_trial")
    if not trial:
        raise FileNotFoundError(f"sweep {folder} has no finished trial to take a model from")
    return checkpoint_file(inside(folder, f"trials/{trial}", "best_trial"))


@_CHECKPOINT_OF.register("pipeline")
def _final_model(folder: Path, manifest: dict[str, Any]) -> Path:
    final = manifest.get("final_model")
    if not final:
        raise FileNotFoundError(f"pipeline {folder} has not trained its final model yet")
    return checkpoint_file(inside(folder, final, "final_model"))


@_CHECKPOINT_OF.register("export")
def _exported(folder: Path, manifest: dict[str, Any]) -> Path:
    state_dict = manifest.get("paths", {}).get("state_dict")
    if not state_dict:
        raise FileNotFoundError(f"export {folder} did not finish ({manifest.get('error')})")
    return inside(folder, state_dict, "paths.state_dict")


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint file an artifact path means: a run folder of any stage means its
    best model (a sweep: its best trial's; a pipeline: its final model's)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if (p / checkpoint.CHECKPOINT_FILE).is_file():
        return p / checkpoint.CHECKPOINT_FILE
    manifest = read_manifest(p)
    if manifest is None:
        what = "does not exist" if not p.exists() else "is not a raycv run or checkpoint folder"
        raise FileNotFoundError(
            f"{p} {what}; pass a run folder, a checkpoints/epoch_* folder or a checkpoint file"
        )
    kind = manifest.get("kind")
    if kind not in _CHECKPOINT_OF:
        raise FileNotFoundError(
            f"{p} is a {kind} folder, which holds no model; pass one of: "
            f"{', '.join(_CHECKPOINT_OF)} run folders"
        )
    return _CHECKPOINT_OF.get(kind)(p, manifest)


@dataclass
class Trained:
    """A model rebuilt from a checkpoint: eval mode, on the CPU, pruned shapes restored."""

    model: nn.Module
    class_names: list[str]
    config: Config
    checkpoint: Path
    metrics: dict[str, Any]


def load_trained(path: str | Path) -> Trained:
    """The model of any artifact, rebuilt from its saved config and weights."""
    file = checkpoint_file(path)
    saved = load_checkpoint(file)
    cfg = from_dict(saved["config"])
    classes = list(saved["class_names"])
    model = create_model(
        cfg.model.name, len(classes), None, cfg.model.image_size, cfg.model.encoder
    )
    fit_to_state_dict(model, saved["model"])  # a pruned checkpoint has narrower layers
    return Trained(model.eval(), classes, cfg, file, dict(saved.get("metrics") or {}))


def load_checkpoint(file: str | Path) -> dict[str, Any]:
    """A checkpoint file raycv wrote: weights with the classes and config that rebuild the
    model. A plain state dict (torchvision's, or another tool's) has neither."""
    file = Path(file)
    saved = None if file.suffix.lower() == ".safetensors" else checkpoint.load(file)
    if not isinstance(saved, dict) or not saved.keys() >= RAYCV_KEYS:
        raise DataError(
            f"{file} is not a raycv checkpoint (it has no class names and config to rebuild "
            f"its model from); fine-tune from it with raycv finetune CONFIG --from {file}"
        )
    return saved
