"""The pipeline folder as the report's sections read it: the manifest, what each stage left
on disk, and ``report/``, where the sections put the images they show."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raycv.artifacts import read_manifest
from raycv.report import markdown_text as md
from raycv.report.evaluation import Evaluation
from raycv.report.format import missing
from raycv.runs import read_metrics
from raycv.tasks.base import metric_words

STAGES = ("pretrain", "tune", "finetune", "scratch", "compress", "export")
IMAGES_DIR = "report"  # next to report.md, so the markdown stays readable when the folder moves


@dataclass
class Stage:
    name: str
    folder: Path
    status: str  # "not run" when the pipeline never started it
    elapsed_s: float | None
    manifest: dict[str, Any] | None  # the stage folder's own manifest.json

    @property
    def ran(self) -> bool:
        return self.manifest is not None

    @property
    def best(self) -> dict[str, Any]:
        return ((self.manifest or {}).get("metrics") or {}).get("best") or {}

    @property
    def final(self) -> dict[str, Any]:
        return ((self.manifest or {}).get("metrics") or {}).get("final") or {}

    def metric(self, default: str) -> str:
        """The metric this stage ranked by: a pretrained classifier's val_acc inside a
        segmentation pipeline, else the pipeline's ``default``."""
        return (self.manifest or {}).get("metric") or default

    def history(self) -> list[dict[str, Any]]:
        return read_metrics(self.folder / "metrics.jsonl")

    def config(self) -> dict[str, Any]:
        """The stage's config.yaml as written (not validated: a folder source need not
        exist on the machine that reads the report)."""
        path = self.folder / "config.yaml"
        return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}

    def file(self, key: str) -> Path | None:
        """The file the manifest's ``paths[key]`` names, when it is there."""
        rel = ((self.manifest or {}).get("paths") or {}).get(key)
        return self.folder / rel if rel and (self.folder / rel).exists() else None

    def epochs(self) -> int | None:
        history = self.history()
        return max(m["epoch"] for m in history) if history else self.final.get("epoch")


def is_sparse(metrics: dict[str, Any]) -> bool:
    """Whether pruning left many weights at zero: unstructured pruning does, while the
    BatchNorm biases that start at zero leave a gap of well under 1 %."""
    nonzero = metrics.get("nonzero_params")
    return not missing(nonzero) and nonzero < 0.99 * (metrics.get("params") or 0)


def read_stages(pipeline_dir: Path, manifest: dict[str, Any]) -> dict[str, Stage]:
    """Every known stage (and any other the manifest lists, but the report itself)."""
    entries = manifest.get("stages") or {}
    names = [*STAGES, *(n for n in entries if n not in STAGES and n != "report")]
    stages = {}
    for name in names:
        entry = entries.get(name) or {}
        folder = pipeline_dir / entry.get("path", name)
        own = read_manifest(folder)
        status = entry.get("status") or (own or {}).get("status") or "not run"
        elapsed = entry.get("elapsed_s", (own or {}).get("elapsed_s"))
        stages[name] = Stage(name, folder, status, elapsed, own)
    return stages


def relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when it lies inside it, else as given."""
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path)


@dataclass
class PipelineFolder:
    """What the sections read, and the images they show (``figure``)."""

    path: Path
    evaluation: Evaluation | None  # the final model, when the caller evaluated it
    manifest: dict[str, Any] = field(init=False)
    stages: dict[str, Stage] = field(init=False)
    images: dict[str, Path] = field(default_factory=dict)  # key -> image shown, in order

    def __post_init__(self) -> None:
        self.manifest = read_manifest(self.path) or {}
        self.stages = read_stages(self.path, self.manifest)

    @property
    def metric(self) -> str:
        """The metric that ranks models (val_acc, val_miou): the pipeline's own."""
        return self.manifest.get("metric") or "val_acc"  # folders written before it was kept

    @property
    def metric_name(self) -> str:
        """``metric`` in words for headings: "val acc", "val mIoU", "val mAP"."""
        return metric_words(self.metric)

    @property
    def images_dir(self) -> Path:
        return self.path / IMAGES_DIR

    def clear_images(self) -> None:
        """An empty ``report/``: a rewritten report keeps no image of an earlier one."""
        self.images_dir.mkdir(parents=True, exist_ok=True)
        for old in self.images_dir.glob("*.png"):
            old.unlink()

    def figure(self, key: str, image: Path, caption: str) -> str:
        """Show ``image`` (copied under report/ unless it was drawn there)."""
        target = self.images_dir / f"{key}.png"
        if image.resolve() != target.resolve():
            target.write_bytes(image.read_bytes())
        self.images[key] = target
        return md.image(caption, f"{IMAGES_DIR}/{target.name}")

    def not_run(self, name: str, what: str) -> str:
        return f"{what} ({md.code(name)} stage: {md.text(self.stages[name].status)})."
