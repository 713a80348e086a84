"""Every epoch reads the training split in a fresh order drawn from (seed, epoch), mixed
across classes before the split across workers; samples (calibration, previews) are
random draws that cover every class. Folders here list their files class by class, as
ImageFolders do, which is what an unshuffled stream would hand to the workers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
import ray.train
import ray.train.torch
from PIL import Image
from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raycv.config import from_dict
from raycv.data.order import epoch_order, stratified_sample
from raycv.data.pipeline import build_streams

SEED = 7


def write_class_folder(root: Path, counts: dict[str, int], size=(24, 32)) -> None:
    """JPEGs of one flat colour plus noise per class, portrait, named so that a listing
    sorted by class and file name is the class-sorted order."""
    rng = np.random.default_rng(0)
    colours = [(200, 40, 40), (40, 60, 200), (40, 180, 60)]
    for k, (name, count) in enumerate(counts.items()):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(count):
            noise = rng.normal(0, 12, (size[1], size[0], 3))
            pixels = np.clip(np.asarray(colours[k]) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)


def folder_cfg(root: Path, storage: Path, **train) -> dict:
    return {
        "experiment": "shuffle",
        "seed": SEED,
        "data": {"source": "folder", "folder": {"root": str(root)}, "val_fraction": 0.2},
        "model": {"name": "resnet18", "image_size": 32},
        "train": {"epochs": 2, "batch_size": 32, **train},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "run": {"storage": str(storage)},
    }


# ---------------------------------------------------------------- the order itself


def test_each_epoch_has_its_own_order_and_the_same_seed_repeats_it():
    first, second = epoch_order(SEED, 1, 500), epoch_order(SEED, 2, 500)
    assert sorted(first) == list(range(500))  # a permutation: every row once
    assert (first != second).mean() > 0.9
    assert np.array_equal(first, np.random.default_rng([SEED, 1]).permutation(500))
    assert (first != epoch_order(SEED + 1, 1, 500)).mean() > 0.9


@pytest.mark.parametrize(
    ("sizes", "count"),
    [((100, 100, 100), 3), ((500, 20, 5), 3), ((500, 20, 5), 10), ((50, 50), 7), ((9, 1), 4)],
)
def test_small_samples_cover_every_class_in_proportion(sizes, count):
    labels = np.repeat(np.arange(len(sizes)), sizes)  # sorted by class, as a folder lists them
    picked = stratified_sample(labels, count, seed=0)
    assert len(picked) == len(set(picked)) == count
    drawn = np.bincount(labels[picked], minlength=len(sizes))
    assert (drawn >= 1).all(), drawn
    share = np.asarray(sizes) * count / sum(sizes)
    assert (np.abs(drawn - share) <= np.maximum(1, share)).all()  # no class far off its share


def test_samples_are_random_draws_not_the_first_rows():
    labels = np.repeat([0, 1], 200)
    a, b = stratified_sample(labels, 20, seed=0), stratified_sample(labels, 20, seed=1)
    assert set(a) != set(b)
    assert np.array_equal(a, stratified_sample(labels, 20, seed=0))
    assert not set(a) <= set(range(10)) | set(range(200, 210))
    assert sorted(stratified_sample(labels, 1000, seed=0)) == list(range(400))


# ---------------------------------------------------------------- read through Ray Train


def read_epochs(payload: dict) -> None:
    """A Train loop that reads epochs as raycv's loop does (its clock, its batches) and
    writes each worker's batches (row numbers and labels) to a JSON file per epoch."""
    from raycv import loop
    from raycv.config import Config

    cfg = Config.model_validate(payload["config"])
    rank = ray.train.get_context().get_world_rank()
    saved = ray.train.get_checkpoint()
    start = json.loads((Path(saved.path) / "epoch.json").read_text()) if saved else 0
    shard = ray.train.get_dataset_shard("train")
    device = ray.train.torch.get_device()
    for epoch in range(start + 1, cfg.train.epochs + 1):
        loop.start_reading(payload["epoch_clock"], epoch, rank)
        batches = [
            {"row": b["row"].tolist(), "label": b["label"].tolist()}
            for b in loop._batches(shard, cfg, device, train=True)
        ]
        out = Path(payload["out"]) / f"epoch{epoch}-rank{rank}.json"
        out.write_text(json.dumps(batches))
        ckpt = Path(payload["out"]) / f"ckpt{epoch}-rank{rank}"
        ckpt.mkdir()
        (ckpt / "epoch.json").write_text(json.dumps(epoch))
        ray.train.report({"epoch": epoch}, checkpoint=ray.train.Checkpoint.from_directory(ckpt))


def fit_reader(raw: dict, out: Path, storage: Path) -> list[int]:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests
    cfg = from_dict(raw)
    streams = build_streams(cfg)
    payload = {"config": cfg.model_dump(mode="json"), "epoch_clock": streams.clock}
    trainer = TorchTrainer(
        read_epochs,
        train_loop_config={**payload, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name="reader", storage_path=str(storage), checkpoint_config=CheckpointConfig(1)
        ),
        datasets={"train": streams.train},
    )
    trainer.fit()
    return streams.train_rows.labels.tolist()


@pytest.fixture(scope="module")
def epochs_read(ray_local, tmp_path_factory):
    """Epochs 1-2 read by two workers, then the run resumed for epoch 3."""
    tmp = tmp_path_factory.mktemp("shuffle")
    root, out, storage = tmp / "images", tmp / "out", tmp / "storage"
    write_class_folder(root, {"a": 80, "b": 80})
    out.mkdir()
    raw = folder_cfg(root, tmp / "runs", epochs=2)
    labels = fit_reader(raw, out, storage)
    raw["train"]["epochs"] = 3
    assert fit_reader(raw, out, storage) == labels  # the resumed run: same cache order

    def read(epoch: int) -> list[list[dict]]:
        return [json.loads((out / f"epoch{epoch}-rank{r}.json").read_text()) for r in (0, 1)]

    return {e: read(e) for e in (1, 2, 3)}, np.asarray(labels)


@pytest.mark.slow
def test_every_batch_on_every_worker_mixes_the_classes(epochs_read):
    epochs, labels = epochs_read
    assert sorted(set(labels.tolist())) == [0, 1] and labels[0] == labels[1]  # sorted cache
    for worker in epochs[1]:
        assert len(worker) == len(labels) // 32  # 16 images a step on each of 2 workers
        for batch in worker:
            assert len(batch["label"]) == 16 and set(batch["label"]) == {0, 1}, batch


@pytest.mark.slow
@pytest.mark.parametrize("epoch", [1, 2, 3])
def test_each_epoch_reads_the_order_drawn_from_seed_and_epoch(epochs_read, epoch):
    """Each worker reads its rows in the epoch's order; together they read it all (epoch 3
    in the resumed run, whose clock and cache are new, as the uninterrupted run would)."""
    epochs, labels = epochs_read
    order = epoch_order(SEED, epoch, len(labels))
    place = np.argsort(order)  # row -> its position in the epoch's order
    read = []
    for worker in epochs[epoch]:
        rows = [r for batch in worker for r in batch["row"]]
        positions = place[rows]
        assert (np.diff(positions) > 0).mean() > 0.8  # in order, chunk by chunk
        read += rows
        assert all(labels[r] == lab for b in worker for r, lab in zip(b["row"], b["label"]))
    assert len(read) == len(set(read)) == len(labels)  # every row once, no worker overlap
    assert sorted(read, key=lambda r: place[r]) == order.tolist()


@pytest.mark.slow
def test_two_epochs_read_different_orders(epochs_read):
    epochs, _ = epochs_read
    firsts = {e: [b["row"] for b in epochs[e][0][:3]] for e in (1, 2, 3)}
    assert firsts[1] != firsts[2] != firsts[3] != firsts[1]


def test_calibration_samples_cover_every_class(ray_local, tmp_path):
    write_class_folder(tmp_path / "images", {"a": 60, "b": 30, "c": 10})
    cfg = from_dict(folder_cfg(tmp_path / "images", tmp_path / "runs"))
    streams = build_streams(cfg)
    for count in (3, 8):
        batch = streams.train_sample(count, cfg.seed).take_batch(count, batch_format="numpy")
        assert sorted(set(batch["label"].tolist())) == [0, 1, 2]
        assert batch["image"].shape == (count, 3, 32, 32)  # prepared as for evaluation


# ---------------------------------------------------------------- a real-looking folder


def scene(kind: str, rng: np.random.Generator) -> Image.Image:
    """A beach (sky over sand) or a forest (trunks under a canopy), drawn at a random size
    and aspect with soft gradients, texture and sensor noise: photo-like, never square."""
    w, h = rng.integers(40, 72), rng.integers(40, 72)
    y = np.linspace(0, 1, h)[:, None, None]
    x = np.linspace(0, 1, w)[None, :, None]
    if kind == "beach":
        horizon = rng.uniform(0.35, 0.65)
        sky = np.asarray([90, 150, 230]) * (0.7 + 0.3 * y) + 0 * x
        sand = np.asarray([225, 200, 150]) * (0.9 + 0.1 * np.sin(40 * x + 3 * y))
        pixels = np.where(y < horizon, sky, sand)
    else:
        trunks = (np.sin(x * rng.uniform(20, 40) + rng.uniform(0, 6)) > 0.6) & (y > 0.3)
        canopy = np.asarray([40, 110, 40]) * (0.6 + 0.4 * np.cos(25 * x * y + rng.uniform(0, 6)))
        pixels = np.where(trunks, np.asarray([90, 60, 35]) + 0 * x * y, canopy)
    pixels = pixels * rng.uniform(0.7, 1.2) + rng.normal(0, 10, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.mark.slow
def test_a_class_sorted_folder_of_photos_trains_well_above_chance(ray_local, tmp_path):
    from raycv.runs import read_metrics
    from raycv.train import run_train

    rng = np.random.default_rng(0)
    for split, count in (("train", 64), ("val", 24)):
        for kind in ("beach", "forest"):
            folder = tmp_path / "scenes" / split / kind
            folder.mkdir(parents=True)
            for i in range(count):
                scene(kind, rng).save(folder / f"{i:03d}.jpg", quality=85)
    raw = folder_cfg(tmp_path / "scenes", tmp_path / "runs", epochs=4, batch_size=16)
    raw["optimizer"] = {"name": "adam", "lr": 1.0e-3}
    run = run_train(from_dict(raw))
    accs = [m["val_acc"] for m in read_metrics(run.metrics)]
    # Chance is 0.5. Unshuffled, each worker held one class: 0.42, 0.65, 0.98, 0.50 here,
    # a lucky epoch but no model; shuffled, every epoch after the first stays up.
    assert accs[-1] >= 0.9 and min(accs[1:]) >= 0.8, accs


def test_a_folder_is_decoded_once_per_run_not_once_per_epoch(ray_local, tmp_path):
    """Once the source is cached, its files can go: every epoch still reads every training
    image, with its pixels, from the cache (a stream that decoded again would lose them)."""
    import shutil

    root = tmp_path / "photos"
    write_class_folder(root, {"red": 10, "blue": 10, "green": 10})
    streams = build_streams(from_dict(folder_cfg(root, tmp_path / "runs", batch_size=8)))
    shutil.rmtree(root)
    for epoch in (1, 2, 3):
        ray.get(streams.clock.set.remote(epoch))
        rows = streams.train.take_all()
        assert len(rows) == streams.num_train == 24
        assert all(row["image"].mean() > 20 for row in rows)  # pixels, not an empty frame
        assert sorted(row["label"] for row in rows) == [0] * 8 + [1] * 8 + [2] * 8
