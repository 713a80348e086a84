"""The compress run's outputs: the table of variants (CSV, JSON, markdown), the trade-off
plot, the fine-tuning history as one continuous curve, and the manifest."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raycv import plots
from raycv.checkpoint import CHECKPOINT_FILE
from raycv.report import markdown_text as md
from raycv.report.format import DASH, fmt_count, fmt_pct, fmt_ratio, fmt_size, missing
from raycv.runs import read_metrics, write_json, write_manifest
from raycv.tasks.base import metric_words

if TYPE_CHECKING:
    from raycv.compress.run import Compression

log = logging.getLogger(__name__)

TABLE = "compression"  # compression.csv / .json / .md in the run folder


def write_outputs(job: Compression, elapsed_s: float) -> None:
    rows = [r.as_dict() for r in job.rows]
    run = job.run
    write_json(run.path / f"{TABLE}.json", rows)
    _write_csv(run.path / f"{TABLE}.csv", rows)
    text = markdown(rows)
    (run.path / f"{TABLE}.md").write_text(f"# Compression\n\n{text}\n")
    plot = plots.compression_tradeoff(rows, run.plots / f"{TABLE}.png")
    curves = _history(job)
    final = _final_fp32(rows)
    write_manifest(
        run,
        job.cfg,
        "finished",
        {
            "metrics": {"final": _as_metrics(final), "best": _as_metrics(final)},
            "quantized": _as_metrics(rows[-1]) if job.quantized else None,
            "compression": rows,
            "elapsed_s": round(elapsed_s, 1),
            "paths": {
                "best_checkpoint": str(Path(final["file"]).parent),
                "quantized": rows[-1]["file"] if job.quantized else None,
                "table": f"{TABLE}.md",
                "plot": str(plot.relative_to(run.path)),
                "curves": str(curves.relative_to(run.path)) if curves else None,
            },
        },
        kind="compress",
        parent=job.rows[0].file,
    )
    log.info("\n%s", console_table(rows))


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table the run folder and the pipeline report show."""
    header, body = _cells(rows)
    table = md.table(header, [[md.text(c) for c in row] for row in body], right=set(range(1, 11)))
    first = rows[0]
    return (
        f"{table}\n\nLatency: median of repeated runs after warm-up on the CPU, "
        f"{first['threads']} thread(s), {first['runtime']} runtime; speed-up against the "
        "original at the same batch size. Quality: the task's metric on the validation split "
        f"({first['metric']}). File: the "
        "saved model (fp32 raycv checkpoint, or the int8 .pt2 archive)."
    )


def console_table(rows: list[dict[str, Any]]) -> str:
    header, body = _cells(rows)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = [header, *body]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines)


def _cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    base = rows[0]
    batches = list(base["latency_ms"])
    header = ["variant", "params", "MACs", "file"]
    header += [f"latency b{b}" for b in batches] + [f"speed-up b{b}" for b in batches]
    header += [metric_words(base["metric"]), "vs original"]
    body = []
    for r in rows:
        lat = [r["latency_ms"].get(b) for b in batches]
        body.append(
            [
                r["variant"],
                fmt_count(r["params"]) + _nonzero(r),
                fmt_count(r["macs"]),
                fmt_size(r["file_bytes"]),
                *[DASH if missing(v) else f"{v:.2f} ms" for v in lat],
                *[fmt_ratio(base["latency_ms"][b], r["latency_ms"].get(b)) for b in batches],
                fmt_pct(r["score"]),
                f"{100 * (r['score'] - base['score']):+.1f} pts",
            ]
        )
    return header, body


def _nonzero(row: dict[str, Any]) -> str:
    sparse = row["nonzero_params"] < 0.99 * row["params"]
    return f" ({fmt_count(row['nonzero_params'])} nonzero)" if sparse else ""


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    flat = [
        {**{k: v for k, v in r.items() if k != "latency_ms"}, **_latency_columns(r)} for r in rows
    ]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)


def _latency_columns(row: dict[str, Any]) -> dict[str, float]:
    return {f"latency_ms_b{b}": ms for b, ms in row["latency_ms"].items()}


def _final_fp32(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The last model that is a raycv checkpoint: what export and fine-tuning take."""
    return [r for r in rows if r["file"].endswith(CHECKPOINT_FILE)][-1]


def _as_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """The keys every stage's manifest reports (the pipeline's stage table reads them)."""
    first = next(iter(row["latency_ms"].values()))
    return {
        row["metric"]: row["score"],
        "params": row["params"],
        "nonzero_params": row["nonzero_params"],
        "macs": row["macs"],
        "latency_ms": first,
        "latency_threads": row["threads"],
        "epoch": row["epochs"],
    }


def _history(job: Compression) -> Path | None:
    """Every fine-tuning run's epochs, numbered on from one run to the next."""
    history, offset = [], 0
    for folder in job.histories:
        for m in read_metrics(folder / "metrics.jsonl"):
            history.append({**m, "epoch": m["epoch"] + offset, "step": folder.name})
        offset = history[-1]["epoch"] if history else offset
    job.run.metrics.write_text("".join(json.dumps(m) + "\n" for m in history))
    return plots.training_curves(history, job.run.plots / "curves.png") if history else None
