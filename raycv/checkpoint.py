"""Self-contained checkpoints: model, optimizer, scheduler, scaler, epoch, class names and
the resolved config in one file, always loaded with ``weights_only=True``."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_FILE = "checkpoint.pt"
EPOCH_DIR = re.compile(r"^epoch_(\d{4,})$")


def epoch_dir_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def save(directory: str | os.PathLike, state: dict[str, Any], name: str = CHECKPOINT_FILE) -> Path:
    path = Path(directory) / name
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a half file under the real name
    return path


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint file or folder; refuses pickled code (weights_only=True)."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_FILE
    if not p.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {p}; pass a run folder's checkpoints/epoch_* folder"
        )
    return torch.load(p, map_location="cpu", weights_only=True)


def checkpoint_epochs(checkpoints_dir: str | os.PathLike) -> dict[int, Path]:
    """Epoch -> folder of each complete checkpoint under ``checkpoints_dir``."""
    root = Path(checkpoints_dir)
    found = {}
    if root.is_dir():
        for child in root.iterdir():
            match = EPOCH_DIR.match(child.name)
            if match and (child / CHECKPOINT_FILE).is_file():
                found[int(match.group(1))] = child
    return dict(sorted(found.items()))
