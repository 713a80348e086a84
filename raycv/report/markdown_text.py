"""Markdown pieces that GFM (GitHub, editors) and Python-Markdown (the HTML page) read alike.

Text the report did not write itself (class names, paths, trial ids, config values) goes
through ``text`` or ``code``, so a pipe cannot split a table cell and a ``*`` or ``[``
cannot start emphasis or a link."""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from urllib.parse import quote

_SYNTAX = re.compile(r"[\\`*\[\]>|]")
# An underscore inside a word (val_acc) never starts emphasis, so it stays readable.
_EDGE_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def text(value: object) -> str:
    escaped = _EDGE_UNDERSCORE.sub(r"\\_", _SYNTAX.sub(r"\\\g<0>", str(value)))
    # Python-Markdown has no "\<" escape; the entity reads the same in both.
    return escaped.replace("<", "&lt;").replace("\n", " ")


def code(value: object) -> str:
    content = str(value).replace("\n", " ")
    if "|" in content or "`" in content:
        # GFM ends a table cell at a pipe even inside a code span, and Python-Markdown does
        # not unescape "\|" there: a code element around escaped text reads alike in both.
        return f"<code>{text(content)}</code>"
    return f"`{content}`"


def link(label: object, href: str) -> str:
    return f"[{text(label)}]({quote(href, safe='/#.-_~')})"


def image(caption: str, href: str) -> str:
    return f"![{text(caption)}]({quote(href, safe='/.-_~')})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int] = ()) -> str:
    """``header`` is plain text, ``rows`` hold markdown cells; ``right``: the columns of
    numbers, right-aligned."""
    rule = ["---:" if i in right else "---" for i in range(len(header))]
    lines = [[text(h) for h in header], rule, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
