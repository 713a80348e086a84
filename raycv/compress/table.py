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
from raycv.compress import guard
from raycv.report import markdown_text as md
from raycv.report.format import DASH, fmt_count, fmt_pct, fmt_ratio, fmt_size, missing
from raycv.runs import link_or_copy, read_metrics, write_json, write_manifest
from raycv.tasks.base import metric_words

if TYPE_CHECKING:
    from raycv.compress.run import Compression

log = logging.getLogger(__name__)

TABLE = "compression"  # compression.csv / .json / .md in the run folder


def write_outputs(job: Compression, elapsed_s: float) -> None:
    rows = [r.as_dict() for r in job.rows]
    run = job.run
    verdict = guard.judge(rows, job.cfg.compress.max_drop, job.task.primary.mode)
    for row, judged, drop in zip(rows, verdict.verdicts, verdict.drops):
        row |= {"guard": judged, "drop_pts": drop}
    write_json(run.path / f"{TABLE}.json", rows)
    _write_csv(run.path / f"{TABLE}.csv", rows)
    text = markdown(rows, verdict.as_dict())
    (run.path / f"{TABLE}.md").write_text(f"# Compression\n\n{text}\n")
    out = run.plots / f"{TABLE}.png"
    plot = plots.compression_tradeoff(rows, out, verdict.max_drop, verdict.mode)
    curves = _history(job)
    kept = rows[verdict.kept]
    quantized = job.quantized is not None and rows[-1]["guard"] != guard.REFUSED
    write_manifest(
        run,
        job.cfg,
        "finished",
        {
            "metrics": {"final": _as_metrics(kept), "best": _as_metrics(kept)},
            "quantized": _as_metrics(rows[-1]) if quantized else None,
            "compression": rows,
            "guard": verdict.as_dict() | {"kept_variant": kept["variant"]},
            "elapsed_s": round(elapsed_s, 1),
            "paths": {
                "best_checkpoint": _kept_folder(job, verdict),
                "quantized": rows[-1]["file"] if quantized else None,
                "table": f"{TABLE}.md",
                "plot": str(plot.relative_to(run.path)),
                "curves": str(curves.relative_to(run.path)) if curves else None,
            },
        },
        kind="compress",
        parent=job.rows[0].file,
    )
    log.info("\n%s\n%s", console_table(rows), verdict.summary(rows))


def _kept_folder(job: Compression, verdict: guard.Guard) -> str:
    """The kept model's folder inside the run (what export and ``--from`` take): the
    original's checkpoint is linked into ``variants/original`` when the guard keeps it."""
    if not verdict.kept_original:
        return str(Path(job.rows[verdict.kept].file).parent)
    folder = job.run.path / "variants" / guard.ORIGINAL
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(job.rows[0].file)
    source = source if source.is_absolute() else job.run.path / source
    for name in (CHECKPOINT_FILE, f"{CHECKPOINT_FILE}.sha256"):
        (folder / name).unlink(missing_ok=True)
        if (source.parent / name).is_file():
            link_or_copy(str(source.parent / name), str(folder / name))
    return f"variants/{guard.ORIGINAL}"


def markdown(rows: list[dict[str, Any]], judged: dict[str, Any] | None = None) -> str:
    """The table the run folder and the pipeline report show, and the guard's verdict
    (``judged``: the manifest's ``guard``; absent from runs before the guard)."""
    header, body = _cells(rows)
    table = md.table(header, [[md.text(c) for c in row] for row in body], right=set(range(1, 11)))
    first = rows[0]
    notes = (
        f"Latency: median of repeated runs after warm-up on the CPU, "
        f"{first['threads']} thread(s), {first['runtime']} runtime, the variants taking turns "
        "(± half the interquartile range); speed-up against the original at the same batch "
        "size, marked ≈ where the two timings' quartiles overlap (not faster beyond the "
        "noise). Quality: the task's metric on the validation split "
        f"({first['metric']}). File: the saved model (fp32 raycv checkpoint, or the int8 .pt2 "
        "archive)."
    )
    return f"{table}\n\n{notes}" + (f"\n\n{_guard_text(rows, judged)}" if judged else "")


def _guard_text(rows: list[dict[str, Any]], judged: dict[str, Any]) -> str:
    limit = f"{judged['max_drop']:g} points of {md.code(judged['metric'])}"
    refused = [r for r in rows if r.get("guard") == guard.REFUSED]
    if judged["kept"] == 0:
        kept = (
            f"**The guard kept the original model**: no compressed raycv checkpoint is within "
            f"{limit} of it (`compress.max_drop`), so the final model is the one compression "
            "started from."
        )
    else:
        row = rows[judged["kept"]]
        kept = (
            f"**The guard kept {md.code(row['variant'])}** ({-row['drop_pts']:+.1f} pts), the "
            f"most compressed variant within {limit} of the original (`compress.max_drop`)."
        )
    if not refused:
        return kept
    each = ", ".join(
        f"{md.code(r['variant'])} ({-r['drop_pts']:+.1f} pts, "
        f"{r['drop_pts'] - judged['max_drop']:.1f} beyond the limit)"
        for r in refused
    )
    return f"{kept} Refused: {each}."


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
    judged = "guard" in base  # tables written before the guard have no verdicts
    header += [metric_words(base["metric"]), "vs original", *(["guard"] if judged else [])]
    body = []
    for r in rows:
        body.append(
            [
                r["variant"],
                fmt_count(r["params"]) + _nonzero(r),
                fmt_count(r["macs"]),
                fmt_size(r["file_bytes"]),
                *[_latency(r, b) for b in batches],
                *[_speed_up(base, r, b) for b in batches],
                fmt_pct(r["score"]),
                f"{100 * (r['score'] - base['score']):+.1f} pts",
                *([r["guard"]] if judged else []),
            ]
        )
    return header, body


def _latency(row: dict[str, Any], batch: str) -> str:
    """The median, and the quartiles' half-width where the timings were interleaved."""
    ms, spread = row["latency_ms"].get(batch), (row.get("latency_spread_ms") or {}).get(batch)
    if missing(ms):
        return DASH
    return f"{ms:.2f} ms" + (f" ±{(spread[1] - spread[0]) / 2:.2f}" if spread else "")


def _speed_up(base: dict[str, Any], row: dict[str, Any], batch: str) -> str:
    """The ratio of medians; "≈" where the two timings' quartiles overlap, so neither is
    faster beyond the noise."""
    ratio = fmt_ratio(base["latency_ms"][batch], row["latency_ms"].get(batch))
    ours, theirs = ((r.get("latency_spread_ms") or {}).get(batch) for r in (row, base))
    if row is base or not ours or not theirs or ratio == DASH:
        return ratio
    apart = ours[1] < theirs[0] or theirs[1] < ours[0]
    return ratio if apart else f"≈{ratio}"


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
