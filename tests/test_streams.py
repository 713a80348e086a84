"""Every task's streams carry uint8 images, a quarter of float32's bytes, and the consumer's
``normalize`` turns them into the model input the float presets used to send: the same
values within half a grey level, on the consumer's side."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycv.config import from_dict
from raycv.data import shapes
from raycv.data.augment import build_preset, normalize
from raycv.data.decoders import padded_boxes
from raycv.data.pipeline import build_streams, preset_of

SIZE = 32
MODELS = {"classification": "resnet18", "segmentation": "unet", "detection": "yolo_n"}
TARGETS = {"classification": "label", "segmentation": "mask", "detection": "boxes"}


def config(task: str):
    return from_dict(
        {
            "task": task,
            "data": {"source": "shapes", "shapes": {"num_images": 24, "image_size": SIZE}},
            "model": {"name": MODELS[task], "image_size": SIZE},
            "train": {"batch_size": 8},
        }
    )


@pytest.mark.parametrize("task", list(MODELS))
def test_each_tasks_streams_carry_uint8_images_with_their_targets(ray_local, task):
    cfg = config(task)
    streams = build_streams(cfg)
    for stream in (streams.train, streams.val):
        batch = stream.take_batch(4, batch_format="numpy")
        assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 3, SIZE, SIZE)
        assert TARGETS[task] in batch
        assert 0 < batch["image"].mean() < 255  # pixels, not an empty frame


@pytest.mark.parametrize("name", ["classic", "eval"])
def test_normalised_uint8_pixels_are_the_float_pixels_to_half_a_grey_level(name):
    cfg = config("classification")
    y, x = np.mgrid[0:37, 0:37] / 36
    images = (np.stack([x, y, x * y], axis=-1) * 255).astype(np.uint8)[None].repeat(4, axis=0)
    preset = build_preset(name, cfg.augment, SIZE)
    preset.seed = 3  # __call__ and transform then draw alike
    shipped = preset({"image": images})["image"]
    exact = preset.transform(torch.from_numpy(images).permute(0, 3, 1, 2), np.random.default_rng(3))
    model_input = normalize(torch.from_numpy(shipped), cfg.augment, channels_last=True)
    assert model_input.dtype == torch.float32
    assert model_input.is_contiguous(memory_format=torch.channels_last)
    half_level = 0.5 / 255 / torch.tensor(cfg.augment.std).view(1, 3, 1, 1)
    gap = (model_input - normalize(exact, cfg.augment)).abs()
    assert (gap <= half_level + 1e-6).all() and gap.max() > 0  # rounded, not clipped


# ---------------------------------------------------------------- augment.where=worker


def shapes_rows(task: str, n: int = 8, size: int = 37) -> dict[str, np.ndarray]:
    """A cached batch as the train stream hands it to a worker that augments: uint8 (N, W, W,
    3) images at the working size with the task's targets (boxes padded to 6, -1 labels)."""
    samples = [
        shapes.render(i, image_size=size, num_classes=3, difficulty="easy", seed=2)
        for i in range(n)
    ]
    batch = {"image": np.stack([s["image"] for s in samples])}
    if task == "segmentation":
        batch["mask"] = np.stack([s["semantic"] for s in samples]).astype(np.uint8)
    if task == "detection":
        padded = [padded_boxes(s, size, 6) for s in samples]
        batch["boxes"] = np.stack([b for b, _ in padded])
        batch["labels"] = np.stack([labels for _, labels in padded])
        batch["crowd"] = np.zeros(batch["labels"].shape, bool)
    return batch


@pytest.mark.parametrize("task", list(MODELS))
def test_the_worker_draws_what_ray_data_draws_with_every_target(task):
    # Same seed, same code: the worker's tensors are Ray Data's batch before rounding to
    # uint8, so masks and boxes stay on their pixels (tests/test_*_augment.py) either way.
    cfg = config(task)
    preset = preset_of(cfg, train=True)
    preset.seed = 11
    batch = shapes_rows(task)
    shipped = preset(batch)
    on_worker = preset.apply({k: torch.from_numpy(v) for k, v in batch.items()})
    assert on_worker["image"].dtype == torch.float32
    rounded = on_worker["image"].mul(255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(rounded, shipped["image"])
    for key in set(batch) - {"image"}:
        np.testing.assert_array_equal(on_worker[key].numpy(), shipped[key])
    if task == "detection":  # boxes did move: the draws were real
        assert not np.array_equal(shipped["boxes"], batch["boxes"])


@pytest.mark.parametrize("task", list(MODELS))
def test_a_worker_prepares_validation_as_ray_data_does(ray_local, task):
    # augment.where=worker: the workers read the cached val images and prepare them
    # themselves, so that no Ray Data process of the run imports torch for the eval preset.
    cfg = from_dict({**config(task).model_dump(mode="json"), "augment": {"where": "worker"}})
    streams = build_streams(cfg)
    read = streams.for_training(cfg)["val"].take_batch(8, batch_format="numpy")
    assert read["image"].shape[1:] == (cfg.working_size, cfg.working_size, 3)  # unprepared
    on_worker = preset_of(cfg, train=False).apply({k: torch.from_numpy(v) for k, v in read.items()})
    shipped = streams.val.take_batch(8, batch_format="numpy")
    rounded = on_worker["image"].mul(255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(rounded, shipped["image"])
    for key in set(shipped) - {"image"}:
        np.testing.assert_array_equal(on_worker[key].cpu().numpy(), shipped[key])


def test_the_worker_draws_per_image_and_afresh_each_batch():
    preset = preset_of(config("classification"), train=True)
    copies = torch.from_numpy(np.repeat(shapes_rows("classification", 1)["image"], 32, axis=0))
    first, second = (preset.apply({"image": copies})["image"] for _ in range(2))
    assert len({image.numpy().tobytes() for image in first}) >= 30
    assert not torch.equal(first, second)


def test_auto_augments_on_the_worker_only_where_it_has_a_gpu():
    raw = config("classification").model_dump(mode="json")
    assert not from_dict(raw).augments_on_worker
    assert from_dict({**raw, "scaling": {**raw["scaling"], "use_gpu": True}}).augments_on_worker
    assert from_dict({**raw, "augment": {**raw["augment"], "where": "worker"}}).augments_on_worker


RUN_STEP_ELSEWHERE = """
import pickle, sys
step, batch = pickle.loads(sys.stdin.buffer.read())
before = "torch" in sys.modules
out = step(batch)
sys.stdout.buffer.write(pickle.dumps((before, out)))
"""


@pytest.mark.parametrize("task", list(MODELS))
def test_a_stream_ships_its_preset_as_a_step_that_imports_torch_only_to_augment(task):
    """Ray Train's DatasetManager and each SplitCoordinator unpickle a stream's plan and
    never augment: unpickling its preset must not import torch (about 2.7 s a process).
    Where a batch is augmented, the step draws what the preset draws, from its seed."""
    import pickle
    import subprocess
    import sys

    from raycv.data.preset_step import PresetStep

    preset = preset_of(config(task), train=True)
    preset.seed = 7
    batch = shapes_rows(task)
    step = PresetStep.of(preset)
    assert pickle.loads(pickle.dumps(step))._built is None  # built where it lands
    out = subprocess.run(
        [sys.executable, "-c", RUN_STEP_ELSEWHERE],
        input=pickle.dumps((step, batch)),
        capture_output=True,
        check=True,
    ).stdout
    torch_at_unpickling, shipped = pickle.loads(out)
    assert torch_at_unpickling is False
    expected = preset(batch)
    assert set(shipped) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(shipped[key], value)
