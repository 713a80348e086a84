"""Checkpoint safety: each checkpoint's SHA-256 is recorded beside it and checked on load;
a corrupt latest checkpoint falls back to the one before; a crash during a write leaves the
previous checkpoint whole; checkpoints written before checksums still load."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from raycv import atomic, checkpoint
from raycv.cli import main
from raycv.errors import CorruptCheckpointError


def _state(epoch: int, size: int = 1000) -> dict:
    torch.manual_seed(epoch)
    return {"model": {"w": torch.randn(size)}, "epoch": epoch, "config": {"seed": epoch}}


def _epochs(root: Path, *epochs: int) -> dict[int, Path]:
    """Checkpoints of ``epochs`` as the loop leaves them: ``root/epoch_NNNN/``."""
    for epoch in epochs:
        folder = root / checkpoint.epoch_dir_name(epoch)
        folder.mkdir(parents=True)
        checkpoint.save(folder, _state(epoch))
    return checkpoint.checkpoint_epochs(root)


def _flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path, keep: float = 0.6) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


# ------------------------------------------------------------------ the checksum


def test_checksum_is_recorded_beside_the_file_in_sha256sum_format(tmp_path):
    path = checkpoint.save(tmp_path, _state(1))
    recorded = tmp_path / "checkpoint.pt.sha256"
    assert recorded.read_text() == f"{checkpoint.file_sha256(path)}  checkpoint.pt\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint.pt.sha256"]
    if shutil.which("sha256sum"):  # the standard tool agrees
        subprocess.run(["sha256sum", "--check", "--quiet", recorded.name], cwd=tmp_path, check=True)
    assert checkpoint.verify(path) is True
    assert torch.equal(checkpoint.load(tmp_path)["model"]["w"], _state(1)["model"]["w"])


def test_flipped_bytes_are_detected_before_unpickling(tmp_path):
    path = checkpoint.save(tmp_path, _state(1, size=250_000))
    _flip_byte(path)  # inside the tensor data
    # torch alone reads the damaged file without complaint, with a wrong weight in it
    damaged = torch.load(path, weights_only=True)["model"]["w"]
    assert not torch.equal(damaged, _state(1, size=250_000)["model"]["w"])
    with pytest.raises(CorruptCheckpointError) as info:
        checkpoint.load(tmp_path)
    message = str(info.value)
    assert str(path) in message and "SHA-256 does not match" in message
    assert "earlier checkpoints/epoch_*" in message and "\n" not in message


def test_truncated_checkpoint_is_detected(tmp_path):
    path = checkpoint.save(tmp_path, _state(1))
    _truncate(path)
    with pytest.raises(CorruptCheckpointError, match="truncated or changed on disk"):
        checkpoint.load(path)


def test_a_damaged_checksum_file_counts_as_corrupt(tmp_path):
    checkpoint.save(tmp_path, _state(1))
    (tmp_path / "checkpoint.pt.sha256").write_bytes(b"\xff\xfe not a digest")
    with pytest.raises(CorruptCheckpointError):
        checkpoint.load(tmp_path)


def test_checkpoint_copied_like_ray_copies_a_reported_folder_still_verifies(tmp_path):
    """The loop saves into a temp folder that Ray copies into the run's storage: the
    checksum is in that folder, so it travels with the file."""
    from ray.train import Checkpoint

    reported = tmp_path / "tmp_report"
    reported.mkdir()
    checkpoint.save(reported, _state(3))
    stored = Path(Checkpoint.from_directory(str(reported)).to_directory(str(tmp_path / "e3")))
    assert checkpoint.verify(stored / "checkpoint.pt") is True
    assert checkpoint.load(stored)["epoch"] == 3


# ------------------------------------------------------------------ backward compatibility


def test_checkpoint_without_a_checksum_still_loads_unverified(tmp_path):
    """Written before raycv recorded checksums: loaded as before."""
    path = checkpoint.save(tmp_path, _state(1))
    (tmp_path / "checkpoint.pt.sha256").unlink()
    assert checkpoint.verify(path) is False
    assert checkpoint.load(path)["epoch"] == 1


def test_truncated_checkpoint_without_a_checksum_is_still_reported_as_corrupt(tmp_path):
    path = checkpoint.save(tmp_path, _state(1))
    (tmp_path / "checkpoint.pt.sha256").unlink()
    _truncate(path)
    with pytest.raises(CorruptCheckpointError, match=r"cannot be read \(PytorchStreamReader"):
        checkpoint.load(path)


# ------------------------------------------------------------------ falling back


def test_corrupt_latest_falls_back_to_the_previous_epoch(tmp_path, caplog):
    saved = _epochs(tmp_path, 1, 2, 3)
    _flip_byte(saved[3] / "checkpoint.pt")
    with caplog.at_level(logging.WARNING, logger="raycv.checkpoint"):
        restored = checkpoint.load_latest_good(tmp_path)
    assert restored["epoch"] == 2
    assert torch.equal(restored["model"]["w"], _state(2)["model"]["w"])
    [warning] = caplog.records
    assert warning.getMessage().startswith("falling back to the checkpoint before this one")
    assert "epoch_0003" in warning.getMessage()
    # the same from checkpoint_epochs' mapping (local mode's resume)
    assert checkpoint.load_latest_good(saved)["epoch"] == 2


def test_fallback_from_rays_latest_never_picks_a_newer_folder(tmp_path):
    """Ray names its latest checkpoint folder; a newer folder there (an upload cut short)
    is not one Ray recorded. A missing file in Ray's folder falls back too."""
    saved = _epochs(tmp_path, 1, 2, 3, 4)
    _truncate(saved[3] / "checkpoint.pt")
    assert checkpoint.load_latest_good(saved[3])["epoch"] == 2
    (saved[2] / "checkpoint.pt").unlink()
    assert checkpoint.load_latest_good(saved[2])["epoch"] == 1
    assert checkpoint.load_latest_good(saved[4])["epoch"] == 4


def test_every_checkpoint_corrupt_is_an_error_and_none_is_none(tmp_path):
    saved = _epochs(tmp_path / "run", 1, 2)
    for folder in saved.values():
        _truncate(folder / "checkpoint.pt")
    with pytest.raises(CorruptCheckpointError, match="none of the 2 checkpoints"):
        checkpoint.load_latest_good(tmp_path / "run")
    assert checkpoint.load_latest_good(tmp_path / "empty") is None


def test_cli_reports_a_corrupt_checkpoint_in_one_line(tmp_path, capsys):
    path = checkpoint.save(tmp_path, _state(1))
    _flip_byte(path)
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: checkpoint {path} is corrupt") and "\n" not in err


# ------------------------------------------------------------------ crashes while writing

_WRITER = textwrap.dedent(
    """
    import sys, torch
    from raycv import checkpoint
    state = {"model": {"w": torch.ones(64 * 1024 * 1024)}, "epoch": 2}  # 256 MiB
    print("writing", flush=True)
    checkpoint.save(sys.argv[1], state)
    """
)


def _kill_mid_write(folder: Path) -> None:
    """Start a process that saves a 256 MiB checkpoint into ``folder`` and SIGKILL it once
    its temporary file holds some bytes but not all."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "writing\n"
    tmp = folder / "checkpoint.pt.tmp"
    deadline = time.monotonic() + 60
    while not (tmp.is_file() and tmp.stat().st_size > 1 << 20):
        assert proc.poll() is None, "the write finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert tmp.stat().st_size < 256 << 20  # it really died mid-write


def test_sigkill_during_a_write_over_a_checkpoint_leaves_the_old_one_whole(tmp_path):
    checkpoint.save(tmp_path, _state(1))
    _kill_mid_write(tmp_path)
    assert checkpoint.verify(tmp_path / "checkpoint.pt") is True  # the old pair, untouched
    assert checkpoint.load(tmp_path)["epoch"] == 1


def test_sigkill_during_a_new_epochs_write_resumes_from_the_previous_epoch(tmp_path):
    _epochs(tmp_path, 1)
    (tmp_path / "epoch_0002").mkdir()
    _kill_mid_write(tmp_path / "epoch_0002")
    assert list(checkpoint.checkpoint_epochs(tmp_path)) == [1]  # the cut file is not listed
    assert checkpoint.load_latest_good(tmp_path)["epoch"] == 1


class _FailsToPickle:
    def __reduce__(self):
        raise OSError("no space left on device")


def test_an_error_inside_the_write_keeps_the_old_checkpoint_and_no_temp_file(tmp_path):
    checkpoint.save(tmp_path, _state(1))
    with pytest.raises(OSError, match="no space left"):
        checkpoint.save(tmp_path, {**_state(2), "extra": _FailsToPickle()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint.pt.sha256"]
    assert checkpoint.verify(tmp_path / "checkpoint.pt") is True
    assert checkpoint.load(tmp_path)["epoch"] == 1


def test_atomic_text_write_keeps_the_old_content_when_the_write_fails(tmp_path):
    """How manifests and metrics.jsonl are written (raycv.runs)."""
    path = atomic.write_text(tmp_path / "manifest.json", '{"status": "running"}\n')

    def fail(tmp: Path) -> None:
        tmp.write_text('{"status": "fin')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.replace_file(path, fail)
    assert path.read_text() == '{"status": "running"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
