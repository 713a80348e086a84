"""The report's "Compression" section: the fine-tuned model before and after the compress
stage (pruning, then fine-tuning again), side by side."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from raycv import checkpoint, model_stats, plots
from raycv.artifacts import load_trained
from raycv.report import markdown_text as md
from raycv.report.folder import PipelineFolder, Stage, is_sparse
from raycv.report.format import (
    DASH,
    fmt_count,
    fmt_ms,
    fmt_pct,
    fmt_points,
    fmt_ratio,
    fmt_size,
    missing,
)


def _points(after: float | None, before: float | None) -> str:
    return DASH if missing(after) or missing(before) else fmt_points(after - before)


@dataclass(frozen=True)
class _Quantity:
    label: str  # the table's row
    bar: str | None  # its bar in the figure, if it has one
    before: float | None
    after: float | None
    fmt: Callable[[float | None], str]
    change: Callable[[float | None, float | None], str] = fmt_ratio  # (after, before)


def compression(pipeline: PipelineFolder) -> str:
    before, after = pipeline.stages["finetune"], pipeline.stages["compress"]
    if not after.ran:
        return (
            f"## Compression\n\nNo compression stage ({md.code('compress')}: "
            f"{md.text(after.status)}): the final model is the fine-tuned one."
        )
    quantities = _quantities(pipeline, before, after)
    rows = [
        [q.label, q.fmt(q.before), q.fmt(q.after), q.change(q.after, q.before)] for q in quantities
    ]
    header = ["", "Before (finetune)", "After (compress)", "After / before"]
    parts = [
        "## Compression",
        _pruning(after),
        md.table(header, rows, right={1, 2, 3}),
        _bars(pipeline, quantities),
    ]
    return "\n\n".join(part for part in parts if part)


def _bars(pipeline: PipelineFolder, quantities: list[_Quantity]) -> str | None:
    shown = [
        q
        for q in quantities
        if q.bar and not missing(q.before) and q.before and not missing(q.after)
    ]
    if not shown:
        return None
    drawn = plots.compression_bars(
        {q.bar: q.before for q in shown},
        {q.bar: q.after for q in shown},
        pipeline.images_dir / "compression.png",
        labels=("finetune", "compress"),
    )
    return pipeline.figure(
        "compression", drawn, "the compressed model relative to the fine-tuned one"
    )


def _pruning(after: Stage) -> str | None:
    cfg = after.config()
    prune, epochs = cfg.get("prune") or {}, (cfg.get("train") or {}).get("epochs")
    if not prune.get("ratio"):
        return None
    return (
        f"The fine-tuned model was pruned ({md.code(prune.get('method', 'channel'))}, ratio "
        f"{prune['ratio']:g}), then fine-tuned again for {epochs or DASH} epochs."
    )


def _quantities(pipeline: PipelineFolder, before: Stage, after: Stage) -> list[_Quantity]:
    b, a = before.best, after.best
    latency = "Latency (batch 1, 1 thread, timed side by side)"
    quantities = [
        _Quantity("Parameters", "params", b.get("params"), a.get("params"), fmt_count),
        _Quantity("MACs (one image)", "MACs", b.get("macs"), a.get("macs"), fmt_count),
        _Quantity(latency, "latency", _latency_now(before), _latency_now(after), fmt_ms),
        _Quantity(
            "Weights (state dict)",
            "size",
            _weights_bytes(pipeline, before),
            _weights_bytes(pipeline, after, exported=True),
            fmt_size,
        ),
    ]
    if is_sparse(b) or is_sparse(a):
        nonzero = _Quantity(
            "Non-zero parameters", None, b.get("nonzero_params"), a.get("nonzero_params"), fmt_count
        )
        quantities.insert(1, nonzero)
    acc = (b.get("val_acc"), a.get("val_acc"))
    return [*quantities, _Quantity("Best val acc", "val acc", *acc, fmt_pct, _points)]


def _latency_now(stage: Stage) -> float | None:
    """The stage's best model timed here, one model right after the other: the latency each
    training run measured shared the cores with its own data tasks, too noisy to compare."""
    try:
        trained = load_trained(stage.folder)
    except FileNotFoundError:
        return None
    size = trained.config.model.image_size
    return model_stats.latency_ms(trained.model, size, batch=1, threads=1)


def _weights_bytes(pipeline: PipelineFolder, stage: Stage, exported: bool = False) -> float | None:
    """Bytes of the tensors in the stage's best checkpoint's state dict (its file also
    holds the optimizer state, so its size would overstate the model); for ``exported``,
    the export's state dict file when the checkpoint is not there."""
    rel = ((stage.manifest or {}).get("paths") or {}).get("best_checkpoint")
    file = stage.folder / rel / checkpoint.CHECKPOINT_FILE if rel else None
    if file is not None and file.is_file():
        state = checkpoint.load(file).get("model") or {}
        return float(sum(t.numel() * t.element_size() for t in state.values()))
    export = pipeline.stages["export"]
    if not (exported and export.ran):
        return None
    size_mb = ((export.manifest.get("metrics") or {}).get("size_mb") or {}).get("state_dict")
    return None if missing(size_mb) else size_mb * 1e6
