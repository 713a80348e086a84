"""The guard on the final model (``raycv.compress.guard``): the most compressed raycv
checkpoint within ``compress.max_drop`` points of the original is kept, else the original;
an int8 archive beyond the limit is refused; lower-is-better metrics are judged the other
way. The pipelines that use it: tests/test_pipeline.py and the task pipelines."""

from __future__ import annotations

from raycv.compress.guard import KEPT, ORIGINAL, REFUSED, WITHIN, judge


def row(variant: str, score: float, file: str = "steps/x/best/checkpoint.pt") -> dict:
    return {"variant": variant, "score": score, "file": file, "metric": "val_acc"}


ROWS = [
    row("original", 0.800, "/runs/finetune/best/checkpoint.pt"),
    row("channel 50% (1/2), before fine-tuning", 0.600, "variants/pruned-1/checkpoint.pt"),
    row("channel 50% (1/2), fine-tuned 2 epochs", 0.795),
    row("channel 50% (2/2), fine-tuned 2 epochs", 0.780),
    row("int8 post-training", 0.792, "variants/int8.pt2"),
]


def test_the_most_compressed_checkpoint_within_the_drop_is_kept():
    guard = judge(ROWS, max_drop=1.0, mode="max")
    assert guard.kept == 2
    assert guard.verdicts == [ORIGINAL, REFUSED, KEPT, REFUSED, WITHIN]
    assert guard.drops == [0.0, 20.0, 0.5, 2.0, 0.8]
    summary = guard.summary(ROWS)
    assert "kept 'channel 50% (1/2), fine-tuned 2 epochs' (-0.5 pts)" in summary
    assert "'channel 50% (2/2), fine-tuned 2 epochs' (-2.0 pts, 1.0 beyond)" in summary


def test_a_wider_limit_keeps_the_last_round_and_the_int8_archive_is_never_the_kept_one():
    guard = judge(ROWS, max_drop=2.5, mode="max")
    assert guard.kept == 3 and guard.verdicts[4] == WITHIN


def test_nothing_within_the_drop_keeps_the_original():
    guard = judge(ROWS, max_drop=0.1, mode="max")
    assert guard.kept == 0 and guard.kept_original
    assert guard.verdicts[1:] == [REFUSED] * 4
    assert guard.summary(ROWS).startswith("guard: kept the original model")


def test_a_lower_is_better_metric_is_judged_the_other_way():
    rows = [row("original", 0.50), row("pruned", 0.505), row("pruned more", 0.53)]
    guard = judge(rows, max_drop=1.0, mode="min")
    assert guard.drops == [0.0, 0.5, 3.0] and guard.kept == 1
