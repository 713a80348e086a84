"""Run folders: where each stage's config, manifest, metrics, checkpoints and plots live.

``runs/<experiment>/<stage>-<timestamp>/`` holds ``config.yaml``, ``manifest.json``,
``metrics.jsonl``, ``checkpoints/epoch_NNNN/``, ``tb/`` (TensorBoard), ``plots/`` and, with
MLflow or W&B on (``raycv.trackers``), ``trackers.json`` (their run ids) and ``wandb/``.
With ``run.storage`` on object storage the run lives at its URI and raycv writes through a
local mirror of it (``raycv.storage``)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raycv import __version__, atomic
from raycv import storage as remote
from raycv import trackers as tracking
from raycv.checkpoint import checkpoint_epochs, epoch_dir_name
from raycv.checkpoint import load as load_checkpoint
from raycv.config import ConfigError
from raycv.errors import CorruptCheckpointError
from raycv.redact import redact

if TYPE_CHECKING:
    from raycv.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunFolder:
    """A run's folder; for a run on object storage (``uri``), ``path`` is its local mirror."""

    path: Path
    uri: str | None = None

    @classmethod
    def create(cls, storage: str, experiment: str, stage: str) -> RunFolder:
        """A new folder with a name no earlier run used (Ray resumes a reused name)."""
        base = storage_root(storage) / check_name(experiment, "experiment")
        check_name(stage, "stage")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(1000):
            name = f"{stage}-{stamp}" + (f"-{n}" if n else "")
            uri = remote.join(storage, experiment, name) if remote.is_uri(storage) else None
            if uri and remote.exists(uri):
                continue
            try:
                (base / name).mkdir(parents=True)
                return cls(base / name, uri)
            except FileExistsError:
                continue
        raise RuntimeError(f"could not find a free run name under {base}")

    @classmethod
    def find(cls, storage: str, experiment: str, stage: str, name: str | None) -> RunFolder:
        """The run to resume: ``name`` (a folder or a run name), else the newest ``stage`` run."""
        if remote.is_uri(storage):
            return cls._download(storage, experiment, stage, name)
        base = storage_root(storage) / check_name(experiment, "experiment")
        if name:
            path = _named_run(base, name)
            if not (path / "config.yaml").is_file():
                raise FileNotFoundError(f"--resume {name}: no run folder with a config.yaml there")
            return cls(path.resolve())
        runs = sorted(p for p in base.glob(f"{stage}-*") if (p / "config.yaml").is_file())
        if not runs:
            raise FileNotFoundError(f"--resume: no earlier {stage} run under {base}")
        return cls(runs[-1])

    @classmethod
    def _download(cls, storage: str, experiment: str, stage: str, name: str | None) -> RunFolder:
        """``find`` on object storage: the run's files but its checkpoints are downloaded
        into its mirror (Ray Train restores checkpoints from the store itself)."""
        base = remote.join(storage, check_name(experiment, "experiment"))
        if name is None:
            runs = [r for r in remote.folders(base) if r.startswith(f"{stage}-")]
            name = next((r for r in reversed(runs) if _has_config(remote.join(base, r))), None)
            if name is None:
                raise FileNotFoundError(f"--resume: no earlier {stage} run under {base}")
        elif not _has_config(remote.join(base, check_name(name, "--resume"))):
            raise FileNotFoundError(f"--resume {name}: no run with a config.yaml under {base}")
        run = cls(storage_root(storage) / experiment / name, remote.join(base, name))
        remote.download(run.uri, run.path, skip=("checkpoints",))
        return run

    @property
    def where(self) -> str:
        return self.uri or str(self.path)

    def upload(self) -> None:
        """Copy raycv's own files to the run's URI (nothing to do for a local run). Ray Train
        writes the checkpoints there itself; best/ is copied there within the store."""
        if self.uri:
            remote.upload(self.path, self.uri, skip=("checkpoints", "best"))

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


def storage_root(storage: str) -> Path:
    """Where run folders are written: ``storage``, or the local mirror of a URI."""
    if "\0" in storage:
        raise ConfigError(f"run.storage={storage!r} holds a NUL character; give a plain path")
    if remote.is_uri(storage):
        return remote.mirror(storage)
    return Path(storage).expanduser().resolve()


def require_path(storage: str, what: str, alternative: str = "") -> None:
    """Refuse object storage for what writes run folders only through local paths."""
    if remote.is_uri(storage):
        raise ConfigError(
            f"{what} writes its run folder through local paths, not to {storage}: pass "
            f"run.storage=PATH (a shared file system on a cluster){alternative}"
        )


def _has_config(run_uri: str) -> bool:
    return remote.exists(remote.join(run_uri, "config.yaml"))


def is_plain_name(name: str) -> bool:
    """One folder name: never a path that leads elsewhere (``..``, ``/``, an absolute path)
    or one the file system cannot hold (NUL)."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def check_name(name: str, what: str) -> str:
    if not is_plain_name(name):
        raise ConfigError(
            f"{what}={name!r} is not a plain name: use one folder name, without '/', "
            "'\\', NUL or '..'"
        )
    return name


def inside(folder: Path, relative: str, what: str) -> Path:
    """``folder / relative`` for a path read from a manifest, which must stay in ``folder``."""
    parts = Path(relative).parts
    if not parts or Path(relative).is_absolute() or ".." in parts or "\0" in relative:
        raise ConfigError(
            f"{folder / 'manifest.json'} names {what}={relative!r}, which leads out of "
            "its folder: the manifest is damaged or was edited; use the run's own files"
        )
    return folder / relative


def _named_run(base: Path, name: str) -> Path:
    """``--resume RUN``: a folder the user names on the command line, else the name of a
    run under ``base``."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    if not is_plain_name(name):
        raise ConfigError(
            f"--resume {name!r}: no such folder, and not a run name (one folder name under "
            f"{base}, without '/', '\\', NUL or '..')"
        )
    return base / name


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def best_of(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The row with the highest (``mode="max"``) or lowest ``metric``; rows without it, or
    with None, are left out, and so are diverged ones (``_diverged``)."""
    scored = [r for r in rows if r.get(metric) is not None and not _diverged(r, metric)]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r[metric])


def _diverged(row: dict[str, Any], metric: str) -> bool:
    """A NaN or infinite metric or loss. An epoch whose last step blew the weights up still
    reports: its val loss is NaN while its accuracy (argmax of NaN logits) can look like a
    number, and that checkpoint must never become the best one. NaN also breaks max/min."""
    values = [row[metric], *(v for k, v in row.items() if k.endswith("_loss"))]
    return any(isinstance(v, float) and not math.isfinite(v) for v in values)


def write_json(path: Path, data: Any) -> None:
    atomic.write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


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
    """Driver-side record of each epoch report: metrics.jsonl, the experiment ``trackers``
    (``raycv.trackers``: TensorBoard, MLflow, W&B), a progress line, and a copy of the best
    checkpoint by ``metric`` in ``best/``.

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
    trackers: Sequence[tracking.Tracker] = ()

    def record(self, per_worker: list[dict[str, Any]], saved: str | None = None) -> None:
        """Append the epoch's row (``_row``); ``saved`` is the folder of the checkpoint
        reported with it."""
        metrics = _row(per_worker)
        history = [m for m in read_metrics(self.run.metrics) if m["epoch"] < metrics["epoch"]]
        new = [*self._unrecorded(history, metrics["epoch"]), metrics]
        history += new
        atomic.write_text(self.run.metrics, "".join(json.dumps(m) + "\n" for m in history))
        tracking.record(self.trackers, self.run, new, last=metrics["epoch"] >= self.epochs)
        top = self.best(history)
        if saved and top is metrics:
            self._keep_best(saved)
        elif top is not None and top.get("recovered") and top in new:
            self._keep_best(self._reported_as(top["epoch"]))  # best was the unrecorded epoch
        if self.prune:
            for path in list(checkpoint_epochs(self.run.checkpoints).values())[: -self.keep]:
                shutil.rmtree(path, ignore_errors=True)
        self.run.upload()
        log.info(format_progress(metrics, self.epochs))

    def best(self, history: list[dict[str, Any]]) -> dict[str, Any] | None:
        return best_of(history, self.metric, self.mode)

    def _unrecorded(self, history: list[dict[str, Any]], epoch: int) -> list[dict[str, Any]]:
        """Rows for the epochs between the history's last and ``epoch``: a driver killed
        after a worker saved a checkpoint but before this recorder wrote its row leaves
        such a gap, and the resumed run starts after that checkpoint. Each row comes from
        the checkpoint's own metrics, marked ``recovered``; one whose checkpoint is gone
        (``checkpoint.keep``) stays missing."""
        last = history[-1]["epoch"] if history else 0
        rows = [self._checkpointed(e) for e in range(last + 1, epoch)]
        return [row for row in rows if row is not None]

    def _checkpointed(self, epoch: int) -> dict[str, Any] | None:
        name = epoch_dir_name(epoch)
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.run.checkpoints / name
            try:
                if self.run.uri is not None:  # a run on object storage: fetch that one folder
                    folder = Path(tmp)
                    remote.download(self._saved_at(epoch), folder)
                saved = load_checkpoint(folder)
            except (FileNotFoundError, CorruptCheckpointError):  # gone, or never whole
                return None
        log.warning("epoch %d was saved but not recorded: its row comes from its checkpoint", epoch)
        return {**_row([saved["metrics"]]), "recovered": True}

    def _saved_at(self, epoch: int) -> str:
        """Where epoch ``epoch``'s checkpoint folder is: a path, or one in the store."""
        if self.run.uri is None:
            return str(self.run.checkpoints / epoch_dir_name(epoch))
        return remote.join(self.run.uri, "checkpoints", epoch_dir_name(epoch))

    def _reported_as(self, epoch: int) -> str:
        """Epoch ``epoch``'s checkpoint folder as Ray Train reports one: a path, or for a
        run on object storage the path in the store (``bucket/key``, no scheme or query)."""
        saved = self._saved_at(epoch)
        return saved if self.run.uri is None else remote.filesystem(saved)[1]

    def _keep_best(self, saved: str) -> None:
        """Copy the checkpoint folder ``saved`` (a path in the store for a URI run) to best/."""
        if self.run.uri is None:
            link = partial(shutil.copytree, saved, copy_function=link_or_copy)
            _replace_tree(link, self.run.best)
            return
        remote.replace_on_store(self.run.uri, saved, "best")  # nothing crosses the network
        best = remote.join(self.run.uri, "best")
        _replace_tree(lambda staging: remote.download(best, staging), self.run.best)


def _row(per_worker: list[dict[str, Any]]) -> dict[str, Any]:
    """A metrics.jsonl row: rank 0's metrics (shared by all after the all-reduce) and where
    each worker ran."""
    row = {k: v for k, v in per_worker[0].items() if k != "node"}
    return {**row, "worker_nodes": [m.get("node") for m in per_worker]}


def link_or_copy(source: str, target: str) -> None:
    """A hard link where the file system allows one: a saved checkpoint is never written to
    again, so best/ need not hold a second copy of it (one resnet18 checkpoint is 129 MB)."""
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)


def _replace_tree(fill: Callable[[Path], object], target: Path) -> None:
    """Replace ``target`` with the folder ``fill(staging)`` makes, so that a crash leaves the
    old or the new copy whole."""
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    fill(staging)
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
        ("train_miou", "train mIoU {:.3f}"),
        ("val_miou", "val mIoU {:.3f}"),
        ("val_map", "val mAP {:.3f}"),
        ("val_map50", "mAP@.5 {:.3f}"),
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
    (metrics, paths, ...); secret-like keys are redacted (``raycv.redact``). A run on object
    storage uploads its files with each manifest."""
    manifest = {
        "kind": kind,
        "status": status,
        "parent": parent,
        "code_version": code_version(),
        "experiment": cfg.experiment,
        "task": cfg.task,
        "model": cfg.model.name,
        "metric": cfg.checkpoint.metric,  # what "best" means in this folder
        **({"uri": run.uri} if run.uri else {}),
        **(extra or {}),
    }
    write_json(run.manifest, redact(manifest))
    run.upload()
