"""Bad inputs (docs/bad_inputs.md): each one stops with one line that names the fix, or is
handled in a documented way, and leaves what was already written in place.

Rows that other modules already test are cited in the docs table, not repeated here. The
tests above the Ray line run without Ray; the ones below share one local Ray and start
no Train workers."""

from __future__ import annotations

import io
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image

from raycv import checkpoint
from raycv.cli import main
from raycv.config import ConfigError, from_dict
from raycv.data.images import decode, decode_batch, shrink
from raycv.data.pipeline import check_sizes
from raycv.data.sources import SOURCES, check_classes_left, find_split
from raycv.distill import check_teacher_classes
from raycv.errors import BadImageError, DataError, NonFiniteLossError
from raycv.loop import _check_finite
from raycv.models import create_model
from raycv.runs import MetricsRecorder, RunFolder, best_of
from raycv.train import check_resumed_classes, failure_hint, fit

RED, BLUE = (200, 10, 10), (10, 10, 200)
FOUR_SHAPES = ["circle", "square", "triangle", "star"]  # the first 4 built-in classes


def encode(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    return buffer.getvalue()


def write_images(folder: Path, count: int, colour=RED) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i}.png" for i in range(count)]
    for i, path in enumerate(paths):
        Image.new("RGB", (20 + i, 16), colour).save(path)
    return paths


def folder_cfg(root: Path, **data):
    return from_dict({"data": {"source": "folder", "folder": {"root": str(root)}, **data}})


def listed(root: Path, **data):
    """The folder source's split, listed only: nothing is decoded, no Ray starts."""
    return find_split(pafs.LocalFileSystem(), str(root), folder_cfg(root, **data))


# ------------------------------------------------------------------ empty and single-class data


def test_a_root_without_class_folders_names_the_layout(tmp_path):
    (tmp_path / "root").mkdir()
    with pytest.raises(DataError) as info:
        listed(tmp_path / "root")
    assert str(info.value) == (
        f"{tmp_path / 'root'} has 0 class folder(s); a classifier needs at least 2: put each "
        "class's images in a folder of its own, root/<class>/*.jpg or root/train/<class>/*.jpg"
    )


def test_empty_class_folders_are_an_empty_dataset(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "root" / "train" / name).mkdir(parents=True)
    with pytest.raises(DataError, match=r"train holds no files under its class folders cat, dog; "):
        listed(tmp_path / "root")


def test_a_single_class_folder_is_refused(tmp_path):
    write_images(tmp_path / "root" / "train" / "cat", 3)
    with pytest.raises(DataError, match=r"has 1 class folder\(s\) \(cat\); a classifier needs"):
        listed(tmp_path / "root")


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"classes": ["circle"]}, "classes must name at least 2 different shapes"),
        ({"num_classes": 1}, "data.shapes.num_classes: Input should be greater than or equal to 2"),
    ],
)
def test_a_single_built_in_shape_class_is_refused_by_the_config(shapes, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"data": {"shapes": shapes}})


def test_a_class_left_without_images_stops_or_warns(tmp_path, caplog):
    files = [f"/r/train/{c}/{i}.jpg" for c in ("ant", "bee", "cat") for i in range(2)]
    with pytest.raises(DataError) as info:  # every bee and cat file was unreadable
        check_classes_left(["ant", "bee", "cat"], files, files[2:])
    assert str(info.value) == (
        "class folders with readable training images: 1 of 3; a classifier needs at least 2: "
        "add images to bee, cat"
    )
    with caplog.at_level(logging.WARNING, "raycv.data.sources"):
        check_classes_left(["ant", "bee", "cat"], files, files[4:])
    assert "no readable training images in class folder(s) cat" in caplog.text


@pytest.mark.parametrize(
    ("num_train", "num_val", "message"),
    [
        (0, 5, "the training split has no readable images (train 0, val 5, 3 unreadable "),
        (40, 0, "the validation split has no readable images (train 40, val 0, 3 unreadable "),
    ],
)
def test_an_empty_split_is_refused_before_training(num_train, num_val, message):
    with pytest.raises(DataError) as info:
        check_sizes(from_dict({}), num_train, num_val, skipped=3)
    assert str(info.value).startswith(message)


# ------------------------------------------------------------------ batch size


@pytest.mark.parametrize(
    ("scaling", "train", "largest"),
    [
        ({}, {"batch_size": 64}, 30),
        ({"num_workers": 4}, {"batch_size": 32}, 28),  # 7 images per worker
        ({"num_workers": 4}, {"batch_size": 4, "grad_accum_steps": 8}, None),
        ({"num_workers": [1, 4]}, {"batch_size": 64}, 30),  # elastic: any batch >= 4
    ],
)
def test_a_batch_larger_than_the_dataset_names_the_largest_that_fits(scaling, train, largest):
    raw = {"scaling": scaling, "train": train}
    with pytest.raises(DataError) as info:
        check_sizes(from_dict(raw), num_train=30, num_val=8, skipped=0)
    fix = (
        f"set train.batch_size={largest} or lower"
        if largest
        else "lower train.grad_accum_steps or scaling.num_workers, or add images"
    )
    assert str(info.value).endswith(
        f"is larger than the 30 training images: not one step per epoch; {fix}"
    )
    if largest:  # the batch it names does fit
        check_sizes(from_dict(raw, [f"train.batch_size={largest}"]), 30, 8, 0)


# ------------------------------------------------------------------ image files


def test_a_20000_pixel_wide_png_is_reduced_before_it_is_converted():
    img = Image.new("RGB", (20_000, 2_000), RED)
    img.paste(BLUE, (10_000, 0, 20_000, 2_000))
    data = encode(img, "PNG")
    opened = Image.open(io.BytesIO(data))
    opened.load()
    reduced = shrink(opened, 37)
    # 2,000 // (2 x 37) = 27: the shorter side keeps at least twice the working size.
    assert reduced.mode == "RGB" and reduced.size == (741, 75)
    image = decode(data, "panorama.png", 37)
    assert image.shape == (37, 37, 3)
    # The centre square straddles the two halves: red on its left, blue on its right.
    np.testing.assert_allclose(image[:, :5], np.broadcast_to(RED, (37, 5, 3)), atol=2)
    np.testing.assert_allclose(image[:, -5:], np.broadcast_to(BLUE, (37, 5, 3)), atol=2)


def declared_png(width: int, height: int) -> bytes:
    """A well-formed greyscale PNG that declares ``width`` x ``height``: PIL reads the size
    from its header, so the bomb check runs before any pixel is decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(("width", "height"), [(25_000, 20_000), (30_000, 30_000)])
def test_an_image_over_400_megapixels_is_refused_as_a_decompression_bomb(width, height):
    with pytest.raises(BadImageError) as info:
        decode(declared_png(width, height), "/data/huge.png", 24)
    assert str(info.value).startswith("/data/huge.png: not a readable image (DecompressionBomb")
    assert f"Image size ({width * height} pixels) exceeds limit of " in str(info.value)


def test_palette_and_16_bit_images_are_not_averaged():
    palette = Image.new("P", (4_000, 400))
    grey16 = Image.new("I;16", (4_000, 400))
    assert shrink(palette, 37) is palette  # averaged palette indices are other colours
    assert shrink(grey16, 37) is grey16  # PIL cannot reduce 16-bit images


def corrupt_pngs() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    png = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "PNG")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return {
        "/data/cut short.png": png[: len(png) // 2],
        "/data/garbage pixels.png": png[:60] + bytes(200) + png[260:],  # zeros inside IDAT
    }


def test_a_corrupt_png_is_a_bad_image_that_a_batch_skips():
    good = encode(Image.new("RGB", (30, 30), RED), "PNG")
    bad = corrupt_pngs()
    for path, data in bad.items():
        with pytest.raises(BadImageError, match=rf"^{path}: not a readable image \(OSError: "):
            decode(data, path, 24)
    images, _, errors = decode_batch([good, *bad.values()], ["/data/good.png", *bad], 24)
    assert [bool(e) for e in errors] == [False, True, True]
    assert images[0].any() and not images[1:].any()


# ------------------------------------------------------------------ validation split


def test_a_val_folder_under_another_name_is_named_in_a_warning(tmp_path, caplog):
    root = tmp_path / "root"
    for name in ("cat", "dog"):
        write_images(root / "train" / name, 10)
        write_images(root / "valid" / name, 2)
    with caplog.at_level(logging.WARNING, "raycv.data.sources"):
        split = listed(root, val_fraction=0.2)
    assert (
        f"{root} has no val/ folder: validating on data.val_fraction=0.2 of train/" in caplog.text
    )
    assert "set data.folder.val_split=valid to validate on it" in caplog.text
    assert (len(split.train), len(split.val)) == (16, 4)
    assert all("/train/" in p for p in split.train + split.val)
    caplog.clear()
    named = listed(root, folder={"root": str(root), "val_split": "valid"})
    assert len(named.val) == 4 and all("/valid/" in p for p in named.val)
    assert caplog.text == ""


def test_no_validation_at_all_is_refused_by_the_config():
    with pytest.raises(ConfigError, match=r"data.val_fraction: Input should be greater than 0"):
        from_dict({"data": {"val_fraction": 0}})


# ------------------------------------------------------------------ NaN loss


def test_a_nan_loss_stops_with_the_learning_rate_to_lower():
    cfg = from_dict({"optimizer": {"lr": 1e6}})
    _check_finite(torch.tensor(1.5), 0, cfg)  # finite: goes on
    with pytest.raises(NonFiniteLossError) as info:
        _check_finite(torch.tensor(float("nan")), 2, cfg)
    assert str(info.value) == (
        "the loss became nan at step 3: training diverged; start a new run with a lower "
        "optimizer.lr (now 1e+06); --resume would keep it"
    )


def _epoch(run: RunFolder, epoch: int, weight: float, **metrics) -> tuple[list[dict], str]:
    """What the controller hands the recorder for one epoch: the reports and the folder
    of the checkpoint reported with them."""
    folder = run.checkpoints / checkpoint.epoch_dir_name(epoch)
    folder.mkdir(parents=True)
    checkpoint.save(folder, {"model": {"w": torch.full((3,), weight)}, "epoch": epoch})
    return [{"epoch": epoch, **metrics}], str(folder)


def test_a_diverged_epoch_never_replaces_the_best_checkpoint(tmp_path):
    run = RunFolder(tmp_path / "run")
    recorder = MetricsRecorder(run, epochs=3, keep=3, metric="val_acc", mode="max")
    good = {"train_loss": 1.2, "val_loss": 1.1}
    recorder.record(*_epoch(run, 1, 1.0, val_acc=0.20, **good))
    # The last step of epoch 2 blew the weights up: NaN logits make argmax pick class 0,
    # whose share can beat a poor but real epoch.
    nan = float("nan")
    recorder.record(*_epoch(run, 2, nan, val_acc=0.25, train_loss=2.0, val_loss=nan))
    assert checkpoint.load(run.best)["epoch"] == 1
    assert recorder.best(json_lines(run.metrics))["epoch"] == 1
    assert best_of([{"val_loss": nan}, {"val_loss": 0.5}], "val_loss", "min") == {"val_loss": 0.5}
    hint = failure_hint("NonFiniteLossError: the loss became nan at step 1: ...", run)
    assert (
        hint == f"the best epoch so far is in {run.best}; start a new run with a lower optimizer.lr"
    )


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------ checkpoints


@pytest.fixture
def four_class_checkpoint(tmp_path, shapes_cfg, save_checkpoint) -> Path:
    """An untrained 4-class ResNet-18 saved as a raycv checkpoint (the classes are what
    these tests need, not the weights)."""
    cfg = from_dict({**shapes_cfg, "run": {"storage": str(tmp_path / "runs")}})
    model = create_model("resnet18", 4, None, 32)
    return save_checkpoint(tmp_path / "ckpt", cfg, model, {"epoch": 1, "val_acc": 0.5})


def test_a_teacher_with_other_classes_is_refused(four_class_checkpoint, shapes_cfg):
    cfg = from_dict({**shapes_cfg, "distill": {"teacher": str(four_class_checkpoint)}})
    check_teacher_classes(cfg, FOUR_SHAPES)
    with pytest.raises(ConfigError) as info:
        check_teacher_classes(cfg, FOUR_SHAPES[:3])
    assert str(info.value) == (
        f"distill.teacher predicts {FOUR_SHAPES}, the data has {FOUR_SHAPES[:3]}; distil from "
        "a model trained on the same classes"
    )


def test_resuming_on_data_with_other_classes_is_refused(tmp_path):
    run = RunFolder(tmp_path / "run")
    folder = run.checkpoints / "epoch_0002"
    folder.mkdir(parents=True)
    checkpoint.save(folder, {"model": {}, "class_names": ["cat", "dog"], "epoch": 2})
    check_resumed_classes(run, ["cat", "dog"])
    check_resumed_classes(RunFolder(tmp_path / "fresh"), ["cat", "dog", "fox"])  # nothing saved
    with pytest.raises(DataError) as info:
        check_resumed_classes(run, ["cat", "dog", "fox"])
    assert str(info.value) == (
        f"{run.path} was trained on the classes ['cat', 'dog'], the data now has "
        "['cat', 'dog', 'fox']; restore the data's class folders to resume, or start a new run"
    )
    assert (folder / "checkpoint.pt").is_file()


def test_resuming_a_run_whose_checkpoints_are_on_a_store_checks_its_best(tmp_path):
    """A URI run's mirror holds best/ but no checkpoints/ (they stay on the store)."""
    run = RunFolder(tmp_path / "mirror")
    run.best.mkdir(parents=True)
    checkpoint.save(run.best, {"model": {}, "class_names": ["cat", "dog"], "epoch": 1})
    check_resumed_classes(run, ["cat", "dog"])
    with pytest.raises(DataError, match=r"trained on the classes \['cat', 'dog'\]"):
        check_resumed_classes(run, ["cat", "fox"])


@pytest.mark.parametrize("command", ["eval", "export", "predict"])
def test_a_plain_state_dict_is_not_taken_for_a_raycv_checkpoint(tmp_path, capsys, command):
    weights = tmp_path / "resnet18 weights.pth"
    torch.save(create_model("resnet18", 4, None, 32).state_dict(), weights)
    picture = tmp_path / "picture.png"
    Image.new("RGB", (8, 8), RED).save(picture)
    images = [str(picture)] if command == "predict" else []
    assert main([command, str(weights), *images]) == 2
    assert capsys.readouterr().err == (
        f"error: {weights} is not a raycv checkpoint (it has no class names and config to "
        f"rebuild its model from); fine-tune from it with raycv finetune CONFIG --from {weights}\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["picture.png", "resnet18 weights.pth"]


# ================================================================== with a local Ray


def test_a_class_whose_files_are_all_unreadable_is_refused(ray_local, tmp_path):
    root = tmp_path / "root"
    for split in ("train", "val"):
        write_images(root / split / "cat", 3)
        write_images(root / split / "dog", 2, BLUE)
    for path in (root / "train" / "dog").iterdir():
        path.write_bytes(b"not a picture")  # the dog class has no readable training image
    with pytest.raises(
        DataError, match=r"images: 1 of 2; a classifier needs at least 2: add images to dog$"
    ):
        SOURCES.get("folder")(folder_cfg(root))
    assert len(list((root / "train" / "dog").iterdir())) == 2  # nothing deleted


def test_eval_on_data_with_other_classes_is_one_line(ray_local, four_class_checkpoint, capsys):
    storage = four_class_checkpoint.parents[1] / "runs"
    assert main(["eval", str(four_class_checkpoint), "data.shapes.num_classes=3"]) == 2
    assert capsys.readouterr().err == (
        f"error: the model knows classes {FOUR_SHAPES}, the data has {FOUR_SHAPES[:3]}; point "
        "data.* at data with the same class folders\n"
    )
    assert not storage.exists()  # no eval run folder


@pytest.mark.parametrize(
    ("scaling", "message"),
    [
        (
            {"num_workers": 8},
            "8 workers x (1 CPU), PACK do not fit: the 1 nodes (4 CPUs, 0 GPUs) hold 4; "
            "set scaling.num_workers=4 or lower scaling.cpus_per_worker, or add nodes",
        ),
        (
            {"use_gpu": True},
            "1 workers x (1 CPU + 1 GPU), PACK do not fit: no node holds even one worker "
            "(largest: 4 CPUs, 0 GPUs); the cluster has no GPUs: set scaling.use_gpu=false",
        ),
        (
            {"num_workers": 4},
            "0 CPUs left for Ray Data once the workers hold theirs, 0 at most on one node: "
            "data loading would wait forever; lower scaling.cpus_per_worker",
        ),
    ],
)
def test_workers_the_cluster_cannot_hold_fail_before_any_work(
    ray_local, tmp_path, shapes_cfg, scaling, message
):
    raw = {**shapes_cfg, "scaling": scaling, "run": {"storage": str(tmp_path)}}
    raw["train"] = {"epochs": 1, "batch_size": 8}
    run = RunFolder(tmp_path / "run")
    with pytest.raises(ConfigError) as info:
        fit(from_dict(raw), run)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
    assert not run.manifest.exists()  # refused before the data was decoded or a run began
