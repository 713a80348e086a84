"""``write_report``: the sections' markdown into ``report.md``, the same as one HTML page into
``report.html``, next to the images under ``report/``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from raycv.artifacts import read_manifest
from raycv.report.evaluation import Evaluation
from raycv.report.folder import PipelineFolder
from raycv.report.html_page import to_html
from raycv.report.sections import SECTIONS

log = logging.getLogger(__name__)


def write_report(pipeline_dir: str | Path, evaluation: Evaluation | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``report/*.png`` into the pipeline folder;
    return their paths (``markdown``, ``html``, then one key per image)."""
    pipeline_dir = Path(pipeline_dir)
    if read_manifest(pipeline_dir) is None:
        raise FileNotFoundError(
            f"{pipeline_dir} has no manifest.json; pass a pipeline folder (raycv pipeline ...)"
        )
    folder = PipelineFolder(pipeline_dir, evaluation)
    folder.clear_images()
    text = "\n\n".join(section(folder) for section in SECTIONS) + "\n"
    title = f"raycv pipeline report: {folder.manifest.get('experiment', '')}"
    md_file, html_file = pipeline_dir / "report.md", pipeline_dir / "report.html"
    _write(md_file, text)
    _write(html_file, to_html(text, pipeline_dir, title))
    log.info("report: %s and %s", md_file, html_file)
    return {"markdown": md_file, "html": html_file, **folder.images}


def _write(path: Path, text: str) -> None:
    """Through a temporary file, so a reader never sees half a report."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
