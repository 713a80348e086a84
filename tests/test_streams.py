"""Every task's streams carry uint8 images, a quarter of float32's bytes, and the consumer's
``normalize`` turns them into the model input the float presets used to send: the same
values within half a grey level, on the consumer's side."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycv.config import from_dict
from raycv.data.augment import build_preset, normalize
from raycv.data.pipeline import build_streams

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
