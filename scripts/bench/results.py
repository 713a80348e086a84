"""What every benchmark here shares: the machine it ran on, a plain-text table, and the JSON file.

Imported by the scripts next to it (``python scripts/bench/<name>.py`` puts this folder first on
``sys.path``); not part of the ``raycv`` package.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("bench")


def machine() -> dict[str, Any]:
    """CPU model, cores, torch threads, load and library versions: the context of a result."""
    import ray
    import torch
    import torchvision

    import raycv
    from raycv.runs import code_version

    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "raycv": raycv.__version__,
        "code_version": code_version(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def header(title: str, info: dict[str, Any]) -> str:
    return (
        f"{title}\n"
        f"machine: {info['cpu_model']}, {info['cpu_count']} cores "
        f"({info['cpus_usable']} usable), torch threads {info['torch_threads']}, "
        f"load {info['load_average_1m']} at start\n"
        f"torch {info['torch']}, torchvision {info['torchvision']}, ray {info['ray']}, "
        f"raycv {info['code_version']}"
    )


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned first column, right-aligned numbers, a rule under the header."""
    cells = [[str(c) for c in columns], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def line(row: list[str]) -> str:
        first, *rest = row
        return "  ".join([first.ljust(widths[0])] + [v.rjust(w) for v, w in zip(rest, widths[1:])])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.0f}"
    return str(value)


def ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value and base else None


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def parser(script: str, doc: str, writes: str) -> argparse.ArgumentParser:
    """A benchmark's command line: the first paragraph of its docstring ``doc`` as the
    description, what it ``writes`` as JSON in the epilog, and ``--out`` already added."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=f"Writes a table to stdout and {writes} as JSON.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results") / f"{Path(script).stem}.json",
        help="JSON results file (default: %(default)s, relative to the current folder)",
    )
    return p


# Real photos beside the checkout (../shared/data, see its README): 6 clothing classes.
CLOTHING = Path(__file__).resolve().parents[3] / "shared" / "data" / "clothing6"


def add_photo_folder(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--root`` and ``--val-split``: a real ImageFolder, by default the clothing photos."""
    p.add_argument(
        "--root",
        type=Path,
        default=CLOTHING,
        help="ImageFolder root holding train/<class>/*.jpg and <val-split>/<class>/*.jpg "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--val-split",
        default="validation",
        help="the validation folder under --root (default: %(default)s)",
    )


def check_photo_folder(args: argparse.Namespace) -> None:
    """Resolve ``args.root`` and stop in one line unless both of its splits are there."""
    args.root = args.root.expanduser().resolve()
    for split in ("train", args.val_split):
        if not (args.root / split).is_dir():
            raise SystemExit(
                f"error: {args.root / split} is not a folder: pass --root ROOT holding "
                f"train/ and {args.val_split}/ (an ImageFolder of class folders each)"
            )


def setup_logging() -> None:
    """Progress on stderr as plain lines; the table alone goes to stdout."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    log.info("results written to %s", path)
