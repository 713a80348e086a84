"""``report.md`` as one HTML page that opens offline: Python-Markdown renders it, every image
is embedded as a base64 data URI, and the page carries its own CSS."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from urllib.parse import unquote
from xml.etree import ElementTree

import markdown
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #1f2328; line-height: 1.5; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #d0d7de; padding: .3em .7em; text-align: left;
         font-variant-numeric: tabular-nums; }
th { background: #f6f8fa; }
code { background: #f6f8fa; padding: .1em .3em; border-radius: 4px; font-size: 90%; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 90%; }
"""


class _EmbedImages(Treeprocessor):
    """Every image becomes a data URI of its file (paths are relative to ``folder``); an
    image alone in its paragraph becomes a figure, its alt text the caption below it."""

    def __init__(self, md: markdown.Markdown, folder: Path) -> None:
        super().__init__(md)
        self.folder = folder

    def run(self, root: ElementTree.Element) -> None:
        for img in root.iter("img"):
            data = (self.folder / unquote(img.get("src", ""))).read_bytes()
            img.set("src", "data:image/png;base64," + base64.b64encode(data).decode("ascii"))
        for p in root.iter("p"):
            alone = len(p) == 1 and p[0].tag == "img" and not (p.text or "").strip()
            if alone and not (p[0].tail or "").strip():
                p.tag = "figure"
                ElementTree.SubElement(p, "figcaption").text = p[0].get("alt")


class _EmbeddedImages(Extension):
    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def extendMarkdown(self, md: markdown.Markdown) -> None:
        # after "inline" (20), which makes the <img> elements; before "prettify" (10)
        md.treeprocessors.register(_EmbedImages(md, self.folder), "embed_images", 15)


def to_html(text: str, folder: Path, title: str) -> str:
    """The page for markdown ``text`` whose images lie under ``folder``."""
    body = markdown.markdown(text, extensions=["tables", _EmbeddedImages(folder)])
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"{body}\n</body>\n</html>\n"
    )
