"""Shared fixtures: a real local Ray per test module, a small valid config, and a small
really trained model saved as a checkpoint."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import yaml

if TYPE_CHECKING:
    from torch import nn

    from raycv.config import Config

# Train's worker group can take minutes to start on a shared 2-core machine.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with slow tests first, each module's tests in their own order: scripts/test.sh
    hands whole modules to two pytest-xdist processes, and a long module picked up last
    would leave one process idle at the end."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)


@contextlib.contextmanager
def _own_ray_env(dashboard_port: int | None = None, **extra: str) -> Iterator[str]:
    """This process's environment set up for a Ray of its own, restored after; Ray's
    processes inherit it when they start. Yields a short temp dir (session paths hold unix
    sockets, 107 characters at most), removed after. With ``dashboard_port``, Ray's
    processes are told the State API's URL there: two Rays on one machine (pytest-xdist)
    otherwise break Train's placement-group cleanup (see ``raycv.session.start_local``)."""
    from raycv.session import environment

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {"RAY_TMPDIR": temp_dir, **extra}
    if dashboard_port is not None:
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    try:
        with environment(env):
            yield temp_dir
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def own_ray_env():
    """``with own_ray_env(dashboard_port=None, **variables) as temp_dir:`` this process's
    environment for a Ray (or ``Cluster``) of its own."""
    return _own_ray_env


@pytest.fixture(scope="module")
def ray_local():
    """Start a local Ray (4 logical CPUs, dashboard on) for one test module, then stop it,
    as raycv itself starts one."""
    import ray

    from raycv.session import quiet_data_progress, start_local

    if ray.is_initialized():  # a test left one behind; start from a clean cluster
        ray.shutdown()
    with _own_ray_env() as temp_dir:
        start_local(4, "127.0.0.1", _temp_dir=temp_dir)
        quiet_data_progress()
        try:
            yield ray
        finally:
            ray.shutdown()


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


def _briefly_trained(cfg: Config, optimizer: Callable, steps: int = 4) -> nn.Module:
    """A seeded model of ``cfg`` after ``steps`` batches of 16 rendered shapes, optimised by
    ``optimizer(parameters)``: real BatchNorm statistics and predictions that vary."""
    import torch
    import torch.nn.functional as F

    from raycv.data import shapes
    from raycv.data.augment import build_preset, normalize
    from raycv.models import create_model

    torch.manual_seed(0)
    s = cfg.data.shapes
    classes = shapes.class_names(s.num_classes, s.classes)
    model = create_model(cfg.model.name, len(classes), None, cfg.model.image_size)
    samples = [
        shapes.render(
            i,
            image_size=s.image_size,
            num_classes=s.num_classes,
            difficulty=s.difficulty,
            seed=s.seed,
            classes=s.classes,
        )
        for i in range(16 * steps)
    ]
    preset = build_preset(cfg.augment.eval_preset, cfg.augment, cfg.model.image_size)
    pixels = preset({"image": np.stack([x["image"] for x in samples])})["image"]
    images = normalize(torch.from_numpy(pixels), cfg.augment)
    labels = torch.tensor([x["label"] for x in samples])
    opt = optimizer(model.parameters())
    model.train()
    for batch, target in zip(images.split(16), labels.split(16)):
        opt.zero_grad()
        F.cross_entropy(model(batch), target).backward()
        opt.step()
    return model.eval()


def _save_checkpoint(folder: Path, cfg: Config, model: nn.Module, metrics: dict) -> Path:
    """``model`` as a raycv checkpoint file in ``folder`` (made if missing), with the classes
    of ``cfg``'s shapes, ``cfg`` itself and ``metrics``."""
    from raycv import checkpoint
    from raycv.data import shapes

    folder.mkdir(parents=True, exist_ok=True)
    s = cfg.data.shapes
    state = {
        "model": model.state_dict(),
        "class_names": shapes.class_names(s.num_classes, s.classes),
        "config": cfg.model_dump(mode="json"),
        "metrics": metrics,
        "epoch": metrics["epoch"],
    }
    return checkpoint.save(folder, state)


@pytest.fixture(scope="session")
def briefly_trained():
    """``briefly_trained(cfg, optimizer, steps=4)``: a small really trained model (the
    function itself, so module-scoped fixtures can call it)."""
    return _briefly_trained


@pytest.fixture(scope="session")
def save_checkpoint():
    """``save_checkpoint(folder, cfg, model, metrics)``: the checkpoint file written."""
    return _save_checkpoint


@contextlib.contextmanager
def _ray_env() -> Iterator[dict[str, str]]:
    """The environment for a raycv process that starts its own Ray: a short temp dir of
    its own (session paths hold unix sockets, 107 characters at most), removed after."""
    path = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        yield {**os.environ, "RAY_TMPDIR": path}
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _kill_when(command: list[str], env: dict, log: Path, ready: Callable, timeout: float = 420):
    """Run ``command`` in a process group of its own (output to the file ``log``: nobody
    would drain a pipe), and SIGKILL the whole group once ``ready()`` returns something
    true, which is returned. The group is killed also when the wait fails."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = ready()
            if found:
                return found
            if proc.poll() is not None:
                pytest.fail(f"{command[3:5]} exited early:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        pytest.fail(f"{command[3:5]} not ready within {timeout} s:\n{log.read_text()[-3000:]}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def ray_env():
    """``with ray_env() as env:`` an environment for a raycv process with its own Ray."""
    return _ray_env


# Lines Ray, Tune and the ONNX exporter print on their own, none for a raycv user to act on
# (each seen in a terminal before raycv hid it); a quiet run prints none of them.
RAY_NOISE = (
    "Token authentication is enabled",
    "Progress bars disabled",
    "Started a local Ray instance",
    ".cc:",  # any line of Ray's C++ core (logging.cc, core_worker.cc, ...)
    "PreemptionWatcher",
    "Failed to query Ray Train Controller actor state",
    "PYTHON worker processes have been started",
    "DeprecationWarning",
    "execution finished",
    "Configuration for experiment",
    "View detailed results here",
    "No unused functions to remove",
)


@pytest.fixture(scope="session")
def ray_noise() -> Callable[[str], list[str]]:
    """``ray_noise(output)``: the lines of a command's output that are Ray's own notices."""
    return lambda text: [line for line in text.splitlines() if any(n in line for n in RAY_NOISE)]


@pytest.fixture(scope="session")
def kill_when():
    """``kill_when(command, env, log, ready, timeout=420)``: run a raycv command in a
    process of its own and kill it, whole, once ``ready()`` is true (fault injection)."""
    return _kill_when
