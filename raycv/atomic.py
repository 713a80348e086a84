"""Files replaced whole: a reader (or a run resumed after a crash or a power cut) finds the
old content or the new one, never a file cut off mid-write."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def replace_file(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, flush it to disk, then
    rename it over ``path``. The temporary file is removed if ``write`` fails."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        _fsync(tmp)  # without it, a power cut after the rename can leave an empty file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)  # makes the rename itself durable
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return replace_file(path, lambda tmp: tmp.write_text(text))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
