"""Run folders: where each stage's config, manifest, metrics, checkpoints and plots live.

``runs/<experiment>/<stage>-<timestamp>/`` holds ``config.yaml``, ``manifest.json``,
``metrics.jsonl``, ``checkpoints/epoch_NNNN/``, ``tb/`` (TensorBoard) and ``plots/``."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raycv import __version__
from raycv.checkpoint import checkpoint_epochs

if TYPE_CHECKING:
    from raycv.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunFolder:
    path: Path

    @classmethod
    def create(cls, storage: str, experiment: str, stage: str) -> RunFolder:
        """A new folder with a name no earlier run used (Ray resumes a reused name)."""
        base = Path(storage).expanduser().resolve() / experiment
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(1000):
            path = base / (f"{stage}-{stamp}" + (f"-{n}" if n else ""))
            try:
                path.mkdir(parents=True)
                return cls(path)
            except FileExistsError:
                continue
        raise RuntimeError(f"could not find a free run name under {base}")

    @classmethod
    def find(cls, storage: str, experiment: str, stage: str, name: str | None) -> RunFolder:
        """The run to resume: ``name`` (a folder or a run name), else the newest ``stage`` run."""
        base = Path(storage).expanduser().resolve() / experiment
        if name:
            path = Path(name) if Path(name).is_dir() else base / name
            if not (path / "config.yaml").is_file():
                raise FileNotFoundError(f"--resume {name}: no run folder with a config.yaml there")
            return cls(path.resolve())
        runs = sorted(p for p in base.glob(f"{stage}-*") if (p / "config.yaml").is_file())
        if not runs:
            raise FileNotFoundError(f"--resume: no earlier {stage} run under {base}")
        return cls(runs[-1])

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.path / "manifest.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def best(self) -> Path:
        return self.path / "best"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def best_of(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The row with the highest (``mode="max"``) or lowest ``metric``; rows without it, or
    with None, are left out."""
    scored = [r for r in rows if r.get(metric) is not None]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r[metric])


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def code_version() -> str:
    """The package version plus the git commit (and '+dirty') when run from a checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "describe", "--always", "--dirty=+dirty"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__} ({sha})"


@dataclass
class MetricsRecorder:
    """Driver-side record of each epoch report: metrics.jsonl, TensorBoard, a progress line,
    and a copy of the best checkpoint by ``metric`` in ``best/``.

    Ray Train keeps the ``keep`` latest checkpoints itself (its resume refuses a run whose
    tracked checkpoints were deleted behind its back), so the best one is copied out rather
    than protected in place. In local mode Ray tracks nothing and ``prune`` keeps the
    ``keep`` latest here. It reads its state back from metrics.jsonl, so a resumed run
    continues the same history."""

    run: RunFolder
    epochs: int
    keep: int
    metric: str
    mode: str
    prune: bool = False

    def record(self, per_worker: list[dict[str, Any]], saved: str | None = None) -> None:
        """Append rank 0's metrics (shared by all after the all-reduce) and where each worker
        ran; ``saved`` is the folder of the checkpoint reported with them."""
        metrics = {k: v for k, v in per_worker[0].items() if k != "node"}
        metrics["worker_nodes"] = [m.get("node") for m in per_worker]
        history = [m for m in read_metrics(self.run.metrics) if m["epoch"] < metrics["epoch"]]
        history.append(metrics)
        tmp = self.run.metrics.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in history))
        tmp.replace(self.run.metrics)
        self._tensorboard(metrics)
        if saved and self.best(history) is metrics:
            _replace_tree(Path(saved), self.run.best)
        if self.prune:
            for path in list(checkpoint_epochs(self.run.checkpoints).values())[: -self.keep]:
                shutil.rmtree(path, ignore_errors=True)
        log.info(format_progress(metrics, self.epochs))

    def best(self, history: list[dict[str, Any]]) -> dict[str, Any] | None:
        return best_of(history, self.metric, self.mode)

    def _tensorboard(self, metrics: dict[str, Any]) -> None:
        from tensorboardX import SummaryWriter

        with SummaryWriter(str(self.run.tensorboard)) as writer:
            for key, value in metrics.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, metrics["epoch"])


def _replace_tree(source: Path, target: Path) -> None:
    """Copy ``source`` over ``target`` so that a crash leaves the old or the new copy whole."""
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    old = target.with_name(target.name + ".old")
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def format_progress(m: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {m['epoch']}/{epochs}"]
    for key, fmt in (
        ("train_loss", "loss {:.4f}"),
        ("train_acc", "train acc {:.3f}"),
        ("val_acc", "val acc {:.3f}"),
        ("val_acc5", "val top-5 {:.3f}"),
        ("lr", "lr {:.2e}"),
        ("images_per_s", "{:.0f} img/s"),
        ("data_wait", "data wait {:.0%}"),
    ):
        if key in m:
            parts.append(fmt.format(m[key]))
    return " | ".join(parts)


def write_manifest(
    run: RunFolder,
    cfg: Config,
    status: str,
    extra: dict | None = None,
    kind: str = "train",
    parent: str | None = None,
) -> None:
    """What a run folder is, what produced it (config, code version, parent), and ``extra``
    (metrics, paths, ...)."""
    write_json(
        run.manifest,
        {
            "kind": kind,
            "status": status,
            "parent": parent,
            "code_version": code_version(),
            "experiment": cfg.experiment,
            "model": cfg.model.name,
            **(extra or {}),
        },
    )
