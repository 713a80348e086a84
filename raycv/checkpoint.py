"""Self-contained checkpoints: model, optimizer, scheduler, scaler, epoch, class names and
the resolved config in one file, always loaded with ``weights_only=True``.

Each file is written whole (``raycv.atomic``) and its SHA-256 is recorded beside it in
``<file>.sha256`` (``sha256sum`` format), inside the same folder: Ray Train copies the
whole folder into the run's storage, so the checksum travels with the file. ``load``
checks it before unpickling anything; a file without one (written before raycv recorded
them) still loads, and a broken one is then caught by torch's reader where it can be."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raycv import atomic
from raycv.errors import CorruptCheckpointError
from raycv.redact import redact

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
CHECKSUM_SUFFIX = ".sha256"
EPOCH_DIR = re.compile(r"^epoch_(\d{4,})$")
_FIX = "use an earlier checkpoints/epoch_* folder or the run's best/ copy, or train again"


def epoch_dir_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def checksum_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def save(directory: str | os.PathLike, state: dict[str, Any], name: str = CHECKPOINT_FILE) -> Path:
    """Write ``state`` as ``directory/name`` and its checksum beside it; the config it
    carries is saved with its secrets redacted (``raycv.redact``)."""
    path = Path(directory) / name
    recorded = checksum_file(path)
    if "config" in state:
        state = {**state, "config": redact(state["config"])}

    def write(tmp: Path) -> None:
        torch.save(state, tmp)
        # The old checksum must never vouch for the new file. Removed only now, so that a
        # crash during the long write leaves the old pair whole; a crash in the short gap
        # before the new checksum leaves a whole file that loads unverified.
        recorded.unlink(missing_ok=True)

    atomic.replace_file(path, write)
    atomic.write_text(recorded, f"{file_sha256(path)}  {name}\n")
    return path


def verify(path: str | os.PathLike) -> bool:
    """True when ``path`` matches the checksum recorded beside it, False when none was
    recorded; CorruptCheckpointError when it does not match."""
    recorded = checksum_file(path)
    if not recorded.is_file():
        return False
    expected = recorded.read_text(errors="replace").split()[:1]
    if expected != [file_sha256(path)]:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt: its SHA-256 does not match {recorded.name} "
            f"(truncated or changed on disk since it was written); {_FIX}"
        )
    return True


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint file or folder after checking its checksum; refuses pickled code
    (weights_only=True)."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_FILE
    if not p.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {p}; pass a run folder's checkpoints/epoch_* folder"
        )
    verified = verify(p)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, EOFError) as e:
        # Without a checksum, torch's zip and pickle readers are the only check. Refused
        # pickled code (UnpicklingError) is not corruption and is raised as it is.
        if verified:
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CorruptCheckpointError(
            f"checkpoint {p} cannot be read ({reason}): it is truncated or damaged; {_FIX}"
        ) from e


def load_latest_good(where: str | os.PathLike | Mapping[int, Path]) -> dict[str, Any] | None:
    """The newest checkpoint under ``where`` that is whole, skipping (with a warning) the
    corrupt or missing ones after it. ``where`` is a folder of ``epoch_NNNN`` folders, one
    ``epoch_NNNN`` folder (it, else an earlier sibling: how Ray's latest checkpoint falls
    back), or ``checkpoint_epochs``'s mapping. None when there is no checkpoint at all."""
    candidates = _newest_first(where)
    for folder in candidates:
        try:
            return load(folder)
        except (CorruptCheckpointError, FileNotFoundError) as e:
            log.warning("falling back to the checkpoint before this one: %s", e)
    if candidates:
        raise CorruptCheckpointError(
            f"none of the {len(candidates)} checkpoints from {candidates[0]} back is whole "
            "(see the warnings above); start a new run instead of resuming this one"
        )
    return None


def _newest_first(where: str | os.PathLike | Mapping[int, Path]) -> list[Path]:
    if isinstance(where, Mapping):
        return [Path(where[epoch]) for epoch in sorted(where, reverse=True)]
    folder = Path(where)
    match = EPOCH_DIR.match(folder.name)
    if match is None and (folder / CHECKPOINT_FILE).is_file():
        return [folder]  # a lone checkpoint folder (e.g. best/, or Ray's download of one)
    if match is None:
        return _newest_first(checkpoint_epochs(folder))
    epoch = int(match.group(1))
    earlier = {e: p for e, p in checkpoint_epochs(folder.parent).items() if e < epoch}
    return [folder, *_newest_first(earlier)]


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
