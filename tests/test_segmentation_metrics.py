"""Segmentation's loss and metrics: mIoU from a confusion matrix, ignore_index left out,
and the value two workers agree on equals the single-process one."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from raycv.config import from_dict
from raycv.tasks import build_task, total
from raycv.tasks.iou import segmentation_scores

CLASSES = ["background", "circle", "square"]


def seg_task(**train):
    cfg = from_dict(
        {"task": "segmentation", "model": {"name": "unet"}, "train": {"batch_size": 2, **train}}
    )
    return build_task(cfg, CLASSES)


def random_maps(seed: int, n: int = 6, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, len(CLASSES), size, size, generator=g)
    mask = torch.randint(0, len(CLASSES), (n, size, size), generator=g).to(torch.uint8)
    mask[:, :2] = 255  # an ignored band
    return logits, mask


def test_scores_from_a_known_confusion_matrix():
    confusion = torch.tensor([[8.0, 2.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    scores = segmentation_scores(confusion, CLASSES, "val")
    # IoU = hits / (row + column - hits): 8/11, 3/6; "square" is absent from both: no IoU.
    assert scores["val_iou/background"] == pytest.approx(8 / 11)
    assert scores["val_iou/circle"] == pytest.approx(0.5)
    assert scores["val_miou"] == pytest.approx((8 / 11 + 0.5) / 2)
    assert scores["val_pixel_acc"] == pytest.approx(11 / 14)


def test_ignored_pixels_leave_loss_and_metrics_untouched():
    task = seg_task()
    logits, mask = random_maps(0)
    changed = logits.clone()
    changed[:, :, :2] = torch.randn_like(changed[:, :, :2]) * 50  # only ignored pixels differ
    metrics = []
    for out in (logits, changed):
        meter = task.evaluator()
        batch = {"mask": mask}
        meter.process(batch, out, task.loss(out, batch))
        metrics.append(meter.evaluate("val"))
    assert metrics[0] == metrics[1]
    expected = F.cross_entropy(logits, mask.long(), ignore_index=255)
    assert metrics[0]["val_loss"] == pytest.approx(expected.item(), rel=1e-6)


def test_dice_and_aux_parts_join_the_loss():
    task = seg_task(dice_weight=0.5)
    logits, mask = random_maps(1)
    parts = task.loss(logits, {"mask": mask})
    assert set(parts) == {"ce", "dice"} and 0 < parts["dice"].item() <= 0.5
    tv = build_task(
        from_dict({"task": "segmentation", "model": {"name": "lraspp_mobilenet_v3_large"}}),
        CLASSES,
    )
    assert set(tv.loss({"out": logits}, {"mask": mask})) == {"ce"}
    fcn = build_task(
        from_dict(
            {
                "task": "segmentation",
                "model": {"name": "fcn_resnet50"},
                "train": {"batch_size": 2},
            }
        ),
        CLASSES,
    )
    parts = fcn.loss({"out": logits, "aux": logits.flip(0)}, {"mask": mask})
    assert set(parts) == {"ce", "aux"}
    aux = F.cross_entropy(logits.flip(0), mask.long(), ignore_index=255)
    assert parts["aux"].item() == pytest.approx(0.5 * aux.item(), rel=1e-6)
    assert total(parts).item() == pytest.approx(parts["ce"].item() + parts["aux"].item())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        task = seg_task()
        meter = task.evaluator()
        # Uneven shards on purpose: rank 0 gets 4 images, rank 1 gets 2.
        logits, mask = random_maps(7)
        mine = slice(0, 4) if rank == 0 else slice(4, 6)
        batch = {"mask": mask[mine]}
        meter.process(batch, logits[mine], task.loss(logits[mine], batch))
        meter.sync(torch.device("cpu"))
        out[rank] = meter.evaluate("val")
    finally:
        dist.destroy_process_group()


def test_two_workers_agree_with_one_process():
    task = seg_task()
    logits, mask = random_maps(7)
    # One process, in batches of the same images as the two workers hold.
    single = task.evaluator()
    for part in (slice(0, 4), slice(4, 6)):
        batch = {"mask": mask[part]}
        single.process(batch, logits[part], task.loss(logits[part], batch))
    expected = single.evaluate("val")

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
        results = dict(out)
    assert results[0] == results[1]
    for key, value in expected.items():
        assert results[0][key] == pytest.approx(value, rel=1e-9, nan_ok=True), key
    assert 0 < expected["val_miou"] < 1
