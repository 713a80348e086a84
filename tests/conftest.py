"""Shared fixtures: a real local Ray per test module and a small valid config."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

# Train's worker group can take minutes to start on a shared 2-core machine.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")


@pytest.fixture(scope="module")
def ray_local():
    """Start a local Ray (4 logical CPUs, dashboard on) for one test module, then stop it.

    Ray gets its own short temp dir: session paths hold unix sockets (107-char limit),
    and nothing of the run should land in the shared /tmp/ray.
    """
    import ray

    from raycv.session import quiet_data_progress

    if ray.is_initialized():  # a test left one behind; start from a clean cluster
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir
    # The dashboard stays on (the default): Train's placement-group cleanup needs it.
    ray.init(
        num_cpus=4,
        dashboard_host="127.0.0.1",
        _temp_dir=temp_dir,
    )
    quiet_data_progress()
    try:
        yield ray
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def shapes_cfg() -> dict:
    """A small valid config mapping: built-in shapes, ResNet-18 at 32 px, one worker."""
    return {
        "experiment": "unit",
        "data": {
            "source": "shapes",
            "shapes": {"num_images": 40, "image_size": 32, "num_classes": 4},
            "val_fraction": 0.25,
        },
        "model": {"name": "resnet18", "image_size": 32},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "train": {"epochs": 1, "batch_size": 8},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
    }


REPO = Path(__file__).resolve().parents[1]


def smoke_config(storage: Path, **sections: dict) -> dict:
    """configs/smoke.yaml with its run folders under ``storage`` and ``sections`` merged in."""
    raw = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    raw["run"] = {"storage": str(storage)}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return raw


@pytest.fixture(scope="session")
def smoke_at():
    """``smoke_config`` itself, for module-scoped fixtures that pick their own folder."""
    return smoke_config


@pytest.fixture
def smoke(tmp_path):
    """Build a smoke config mapping whose run folders land in this test's tmp_path."""
    return lambda **sections: smoke_config(tmp_path, **sections)
