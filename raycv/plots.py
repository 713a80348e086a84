"""Pictures people would rather look at than read: curves, confusion matrices, grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator


def training_curves(history: list[dict[str, Any]], out: Path) -> Path:
    epochs = [m["epoch"] for m in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        ax_loss.plot(epochs, [m.get(key) for m in history], marker="o", label=label)
    for key, label in (
        ("train_acc", "train top-1"),
        ("val_acc", "val top-1"),
        ("val_acc5", "val top-5"),
        ("train_miou", "train mIoU"),
        ("val_miou", "val mIoU"),
        ("val_pixel_acc", "val pixel accuracy"),
        ("val_map", "val mAP@[.5:.95]"),
        ("val_map50", "val mAP@.5"),
    ):
        if any(key in m for m in history):
            ax_acc.plot(epochs, [m.get(key) for m in history], marker="o", label=label)
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.set(title="quality", xlabel="epoch", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, out)


def confusion_matrix(matrix: np.ndarray, class_names: list[str], out: Path) -> Path:
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    for i in range(n):
        for j in range(n):
            color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", color=color, fontsize=8)
    return _save(fig, out)


def image_grid(
    images: np.ndarray,
    titles: list[str],
    out: Path,
    columns: int = 8,
    legend: dict[str, tuple[int, ...]] | None = None,
) -> Path:
    """``images``: uint8 (N, H, W, 3); ``legend``: name -> RGB of the colours drawn on them."""
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles):
        ax.imshow(img)
        ax.set_title(title, fontsize=8)
    return _save(fig, out, legend)


def confusion_shares(matrix: np.ndarray, class_names: list[str], out: Path, what: str) -> Path:
    """A confusion matrix of counts (rows: true classes) drawn row-normalised: each cell is
    the share of the true class's ``what`` (e.g. pixels) predicted as the column's class, so
    rare classes read as well as common ones; each row's total is in its label."""
    n = len(class_names)
    totals = matrix.sum(axis=1)
    shares = matrix / np.maximum(totals, 1)[:, None]
    fig, ax = plt.subplots(figsize=(2.0 + 0.7 * n, 0.8 + 0.6 * n))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), [f"{c} ({int(t):,})" for c, t in zip(class_names, totals)])
    ax.set(xlabel="predicted", ylabel=f"true ({what})", title=f"confusion matrix: share of {what}")
    for i in range(n):
        for j in range(n):
            color = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, f"{shares[i, j]:.2f}", ha="center", va="center", color=color, fontsize=8)
    return _save(fig, out)


def image_rows(
    rows: list[tuple[str, list[np.ndarray]]],
    headers: list[str],
    out: Path,
    legend: dict[str, tuple[int, ...]] | None = None,
) -> Path:
    """One row of uint8 (H, W, 3) images per ``(label, images)``, under column ``headers``
    (e.g. image, truth, prediction); ``legend``: name -> RGB of the colours drawn."""
    columns = len(headers)
    fig, axes = plt.subplots(
        len(rows), columns, figsize=(2.2 * columns, 2.2 * len(rows)), squeeze=False
    )
    for (label, images), row in zip(rows, axes):
        for ax, image in zip(row, images):
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(label, fontsize=8)
    for ax, header in zip(axes[0], headers):
        ax.set_title(header, fontsize=9)
    return _save(fig, out, legend)


def _legend(fig, colours: dict[str, tuple[int, ...]]) -> float:
    """Colour patches under the figure; the share of its height they take."""
    handles = [Patch(color=np.asarray(rgb) / 255, label=name) for name, rgb in colours.items()]
    columns = min(len(handles), 6)
    fig.legend(handles=handles, loc="lower center", ncols=columns, fontsize=8, frameon=False)
    inches = 0.25 * -(-len(handles) // columns) + 0.1  # a line per row of patches
    return min(inches / fig.get_figheight(), 0.5)


def sweep_curves(histories: dict[str, list[dict[str, Any]]], metric: str, out: Path) -> Path:
    """``metric`` per epoch, one line per trial: early-stopped trials end early."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for trial_id, history in histories.items():
        points = [(m["epoch"], m[metric]) for m in history if metric in m]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, alpha=0.8, label=trial_id)
    ax.set(title=f"{metric} of every trial", xlabel="epoch", ylabel=metric)
    ax.grid(alpha=0.3)
    if 0 < len(histories) <= 12:
        ax.legend(fontsize=7)
    return _save(fig, out)


def metric_against(xs: list, ys: list, xlabel: str, ylabel: str, out: Path) -> Path:
    """A scatter of one value against another, trials without a value left out."""
    points = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if points:
        ax.scatter(*zip(*points))
    ax.set(title=f"{ylabel} against {xlabel}", xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return _save(fig, out)


def precision_recall(curves: dict[str, np.ndarray], out: Path) -> Path:
    """Each class's precision against recall (COCO's 101 recall points), one line each."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    recall = np.linspace(0, 1, 101)
    for name, precision in curves.items():
        ax.plot(recall, precision, label=name)
    ax.set(
        title="precision against recall at IoU 0.5",
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    return _save(fig, out)


def pareto(costs: list, values: list, front: list[bool], cost: str, metric: str, out: Path) -> Path:
    """Every trial's cost and metric; the Pareto front drawn as a step line."""
    points = [(c, v, f) for c, v, f in zip(costs, values, front) if c is not None and v is not None]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if points:
        ax.scatter([p[0] for p in points], [p[1] for p in points], color="grey", label="trials")
        on = sorted((c, v) for c, v, f in points if f)
        if on:
            ax.step(*zip(*on), where="post", color="C3", marker="o", label="Pareto front")
    ax.set(title=f"{metric} against {cost}", xlabel=cost, ylabel=metric)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


def transfer_vs_scratch(
    histories: dict[str, list[dict[str, Any]]], out: Path, metric: str = "val_acc"
) -> Path:
    """``metric`` per epoch, one line per run: the fine-tuned run against the one trained
    from scratch (or any runs to compare)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, history in histories.items():
        points = [(m["epoch"], m[metric]) for m in history if m.get(metric) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=4, label=label)
    ax.set(title=f"{metric} per epoch", xlabel="epoch", ylabel=metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if "acc" in metric:
        ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


def compression_tradeoff(
    rows: list[dict[str, Any]], out: Path, max_drop: float | None = None, mode: str = "max"
) -> Path:
    """Left: each variant's quality (the task's metric) against its latency (the first
    batch size timed), the original marked, and the guard's line ``max_drop`` points worse
    than it (``mode``: which way is better); right: params, MACs, file size and latency
    relative to the original."""
    batch = next(iter(rows[0]["latency_ms"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, r in enumerate(rows):
        left.scatter(r["latency_ms"][batch], r["score"], color=f"C{i % 10}", s=40)
        left.annotate(
            f"{i}",
            (r["latency_ms"][batch], r["score"]),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=8,
        )
    metric = rows[0]["metric"]
    if max_drop is not None:
        line = rows[0]["score"] + (-1 if mode == "max" else 1) * max_drop / 100
        label = f"guard: {max_drop:g} pts worse than the original"
        left.axhline(line, color="C3", linestyle="--", linewidth=1, label=label)
        left.legend(fontsize=8)
    left.set(
        title=f"{metric} against latency (batch {batch})", xlabel="latency (ms)", ylabel=metric
    )
    left.grid(alpha=0.3)
    quantities = {"params": "params", "MACs": "macs", "file": "file_bytes"}
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        values = [r[key] / rows[0][key] for key in quantities.values()]
        values.append(r["latency_ms"][batch] / rows[0]["latency_ms"][batch])
        x = np.arange(len(values)) + (i - (len(rows) - 1) / 2) * width
        right.bar(x, values, width=width, color=f"C{i % 10}", label=f"{i}: {r['variant']}")
    right.set_xticks(np.arange(len(quantities) + 1), [*quantities, f"latency b{batch}"])
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set(title="relative to the original (0)", ylabel="ratio")
    right.grid(alpha=0.3, axis="y")
    fig.legend(loc="lower center", ncols=2, fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.subplots_adjust(bottom=0.12 + 0.04 * ((len(rows) + 1) // 2))
    return _save(fig, out)


def _save(fig, out: Path, legend: dict[str, tuple[int, ...]] | None = None) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, _legend(fig, legend) if legend else 0, 1, 1))
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
