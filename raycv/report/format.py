"""Numbers as the report shows them: percentages, counts (11.2 M), sizes, durations; a
missing value (``None`` or NaN) is a dash."""

from __future__ import annotations

import math
from typing import Any

DASH = "–"


def missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt_pct(value: float | None) -> str:
    return DASH if missing(value) else f"{100 * value:.1f} %"


def fmt_points(diff: float) -> str:
    """A difference of two accuracies, in percentage points, with its sign."""
    return f"{100 * diff:+.1f} points"


def fmt_count(value: float | None) -> str:
    """Parameters and MACs: 11.2 M, 1.82 G."""
    if missing(value):
        return DASH
    for unit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= unit:
            return f"{_three_digits(value / unit)} {suffix}"
    return f"{value:.0f}"


def _three_digits(x: float) -> str:
    """11.2, 2.80, 37.0, 512: three significant digits, trailing zeros kept."""
    return f"{x:.{2 if abs(x) < 10 else 1 if abs(x) < 100 else 0}f}"


def fmt_ms(value: float | None) -> str:
    return DASH if missing(value) else f"{value:.3g} ms"


def fmt_size(num_bytes: float | None) -> str:
    """File sizes: 417 B, 13.0 kB, 44.8 MB (powers of 1000, as the export's size_mb)."""
    if missing(num_bytes):
        return DASH
    for unit, suffix in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if num_bytes >= unit:
            return f"{_three_digits(num_bytes / unit)} {suffix}"
    return f"{num_bytes:.0f} B"


def fmt_ratio(after: float | None, before: float | None) -> str:
    if missing(after) or missing(before) or not before:
        return DASH
    return f"{after / before:.2f}×"


def fmt_duration(seconds: float | None) -> str:
    if missing(seconds):
        return DASH
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {round(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def fmt_value(value: Any) -> str:
    """A sampled value or a metric of unknown kind."""
    if missing(value):
        return DASH
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def fmt_metric(metric: str, value: Any) -> str:
    """An accuracy as a percentage, any other metric as a plain number."""
    return fmt_pct(value) if "acc" in metric else fmt_value(value)
