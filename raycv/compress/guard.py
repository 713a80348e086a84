"""The guard on the final model: compression never hands on a worse model silently.

Each variant of the compression table is judged against the original (the model compress
started from, the table's first row) by the task's primary metric: its drop in points
(100 x the metric, in the direction that is worse) either fits ``compress.max_drop`` or not.
The kept model is the most compressed raycv checkpoint that fits (the last such row: each
step compresses the one before further); when none does, it is the original, and the
pipeline's final model is then the fine-tuned one. An int8 archive that does not fit is
refused too: it is not offered as the deployable model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from raycv.checkpoint import CHECKPOINT_FILE

ORIGINAL, KEPT, WITHIN, REFUSED = "original", "kept", "within", "refused"


@dataclass(frozen=True)
class Guard:
    max_drop: float  # points of the metric
    metric: str
    mode: str  # "max" or "min": which way is better
    kept: int  # the kept row (0: the original)
    verdicts: list[str]  # per row: original, kept, within, refused
    drops: list[float]  # per row, points below the original (negative: better)

    @property
    def kept_original(self) -> bool:
        return self.kept == 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self, rows: list[dict[str, Any]]) -> str:
        """One line for the log: what was kept, what was refused and by how much."""
        limit = f"compress.max_drop={self.max_drop:g} points of {self.metric}"
        if self.kept_original:
            kept = "kept the original model: no compressed raycv checkpoint is within"
        else:
            kept = (
                f"kept {rows[self.kept]['variant']!r} ({-self.drops[self.kept]:+.1f} pts), within"
            )
        refused = [
            f"{rows[i]['variant']!r} ({-self.drops[i]:+.1f} pts, "
            f"{self.drops[i] - self.max_drop:.1f} beyond)"
            for i, verdict in enumerate(self.verdicts)
            if verdict == REFUSED
        ]
        tail = f"; refused {', '.join(refused)}" if refused else ""
        return f"guard: {kept} {limit}{tail}"


def judge(rows: list[dict[str, Any]], max_drop: float, mode: str) -> Guard:
    """The verdict on each row of the compression table (``Row.as_dict()``, the original
    first)."""
    base = rows[0]["score"]
    sign = 1.0 if mode == "max" else -1.0
    drops = [round(100 * sign * (base - r["score"]), 4) for r in rows]
    fits = [i > 0 and d <= max_drop for i, d in enumerate(drops)]
    checkpoints = [i for i, r in enumerate(rows) if fits[i] and r["file"].endswith(CHECKPOINT_FILE)]
    kept = checkpoints[-1] if checkpoints else 0
    verdicts = [
        ORIGINAL if i == 0 else KEPT if i == kept else WITHIN if fits[i] else REFUSED
        for i in range(len(rows))
    ]
    return Guard(max_drop, rows[0]["metric"], mode, kept, verdicts, drops)
