"""Augmentation presets: per-image randomness, exact geometry, uint8 out and normalisation on
the worker, pass-through."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from raycv.config import AugmentConfig
from raycv.data.augment import (
    AUGMENTATIONS,
    CHUNK_PIXELS,
    ClassicV2Preset,
    affine_matrices,
    build_preset,
    color_jitter,
    crop_boxes,
    displayable,
    normalize,
    true_sides,
)

PRESETS = ["classic", "classic_v2", "eval"]
# Every random augmentation off; the crop covers the whole image.
IDENTITY = {
    "hflip": 0.0,
    "vflip": 0.0,
    "rotation": 0.0,
    "scale": (1.0, 1.0),
    "ratio": (1.0, 1.0),
    "brightness": 0.0,
    "contrast": 0.0,
    "saturation": 0.0,
}


def asymmetric_image(size: int) -> np.ndarray:
    """uint8 (size, size, 3): gradients plus an off-centre square, so no flip maps it to itself."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    image = np.stack([x, y, x * (1 - y)], axis=-1) * 200
    image[size // 5 : size // 2, size // 8 : size // 3] = (250, 30, 90)
    return image.astype(np.uint8)


def batch_of(images: np.ndarray) -> dict[str, np.ndarray]:
    n = len(images)
    return {
        "image": images,
        "label": np.arange(n, dtype=np.int64) % 3,
        "path": np.array([f"img_{i}.jpg" for i in range(n)]),
    }


def nchw(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> what the presets emit for it untransformed, uint8 (N, 3, H, W)."""
    return images.transpose(0, 3, 1, 2)


# A preset's pixels differ in grey levels (0-255); a normalised unit is about 58 of them.
LEVELS_PER_UNIT = 255 * 0.226


def n_distinct(images: np.ndarray) -> int:
    return len({image.tobytes() for image in images})


# ---------------------------------------------------------------- per-image randomness


@pytest.mark.parametrize("name", ["classic", "classic_v2"])
def test_each_image_gets_its_own_draw(name):
    copies = np.repeat(asymmetric_image(74)[None], 32, axis=0)
    out = build_preset(name, AugmentConfig(), 64)(batch_of(copies))["image"]
    assert out.shape == (32, 3, 64, 64)
    assert n_distinct(out) >= 30


def test_draws_differ_across_chunks_and_repeat_with_a_seed():
    # A batch larger than one cache-sized chunk is transformed chunk by chunk: the chunks must
    # not repeat each other's draws, even when the preset is seeded.
    size = 224
    per_chunk = CHUNK_PIXELS // (size * size)
    copies = np.repeat(asymmetric_image(258)[None], 2 * per_chunk + 1, axis=0)
    preset = build_preset("classic", AugmentConfig(), size)
    preset.seed = 5
    out = preset(batch_of(copies))["image"]
    assert n_distinct(out) == len(copies)
    np.testing.assert_array_equal(out, preset(batch_of(copies))["image"])


def test_one_v2_call_on_a_batch_draws_once_for_all_images():
    # Why "classic" is hand-written: a v2 pipeline applied to a batch tensor draws one
    # parameter set, so all 32 copies come out identical.
    copies = np.repeat(asymmetric_image(74)[None], 32, axis=0)
    pipeline = ClassicV2Preset(AugmentConfig(), 64).pipeline
    out = pipeline(torch.from_numpy(copies).permute(0, 3, 1, 2)).numpy()
    assert out.shape == (32, 3, 64, 64)
    assert n_distinct(out) == 1


@pytest.mark.parametrize("name", ["classic", "classic_v2"])
def test_fresh_entropy_per_call_unless_seeded(name):
    batch = batch_of(np.repeat(asymmetric_image(37)[None], 4, axis=0))
    preset = build_preset(name, AugmentConfig(), 32)
    assert not np.array_equal(preset(batch)["image"], preset(batch)["image"])
    preset.seed = 3
    shipped = pickle.loads(pickle.dumps(preset))  # as Ray ships it to a worker
    np.testing.assert_array_equal(preset(batch)["image"], shipped(batch)["image"])


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("name", PRESETS)
def test_constant_grey_stays_grey_in_uint8_and_normalises_on_the_worker(name):
    cfg = AugmentConfig(**IDENTITY)
    grey = np.full((3, 40, 40, 3), 128, dtype=np.uint8)
    out = build_preset(name, cfg, 32)(batch_of(grey))["image"]
    assert out.shape == (3, 3, 32, 32) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, 128)
    model_input = normalize(torch.from_numpy(out), cfg, channels_last=True)
    assert model_input.dtype == torch.float32
    assert model_input.is_contiguous(memory_format=torch.channels_last)
    expected = (128 / 255 - np.array(cfg.mean)) / np.array(cfg.std)
    np.testing.assert_allclose(
        model_input.numpy(), np.broadcast_to(expected.reshape(1, 3, 1, 1), out.shape), atol=1e-6
    )


@pytest.mark.parametrize(("flip", "axis"), [("hflip", -1), ("vflip", -2)])
def test_flip_alone_flips_exactly(flip, axis):
    cfg = AugmentConfig(**{**IDENTITY, flip: 1.0})
    images = asymmetric_image(32)[None]
    out = build_preset("classic", cfg, 32)(batch_of(images))["image"]
    # Working size == output size: the warp samples pixel centres, so this is exact.
    np.testing.assert_array_equal(out, np.flip(nchw(images), axis))


def test_flip_with_resize_matches_flipped_bilinear_resize():
    cfg = AugmentConfig(**{**IDENTITY, "hflip": 1.0})
    images = asymmetric_image(37)[None]
    out = build_preset("classic", cfg, 32)(batch_of(images))["image"]
    pixels = torch.from_numpy(nchw(images).astype(np.float32))
    expected = TF.resize(pixels, [32, 32], antialias=False).numpy()
    # within rounding to the nearest grey level
    np.testing.assert_allclose(out, np.flip(expected, -1), atol=0.5 + 1e-3)


def test_fused_warp_equals_torchvision_flip_rotate_crop():
    # One grid_sample with the composed matrix == v2 hflip, vflip, rotate, crop in sequence.
    height, width, box = 30, 50, (4, 6, 20, 20)
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    image = torch.stack([x, y, x * y])[None]
    theta = affine_matrices(
        np.array([True]), np.array([True]), np.array([25.0]), np.array([box]), height, width
    )
    grid = F.affine_grid(torch.from_numpy(theta), [1, 3, 20, 20], align_corners=False)
    fused = F.grid_sample(image, grid, align_corners=False)
    rotated = TF.rotate(image.flip(-1).flip(-2), 25.0, TF.InterpolationMode.BILINEAR)
    np.testing.assert_allclose(fused.numpy(), TF.crop(rotated, *box).numpy(), atol=1e-5)


def test_color_jitter_matches_torchvision_per_image():
    images = torch.rand(4, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    factors = np.random.default_rng(0).uniform(0.5, 1.5, (4, 3))
    out = color_jitter(images.clone(), factors)
    for image, result, (b, c, s) in zip(images, out, factors, strict=True):
        expected = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(image, b), c), s)
        np.testing.assert_allclose(result.numpy(), expected.numpy(), atol=1e-5)


def test_crop_boxes_fit_and_fall_back_like_torchvision():
    rng = np.random.default_rng(0)
    top, left, h, w = crop_boxes(rng, 500, 40, 60, (0.3, 1.0), (3 / 4, 4 / 3)).T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all()
    assert (left + w <= 60).all()
    area = h * w / (40 * 60)
    assert area.min() > 0.25 and area.max() <= 1.0
    # Aspect ratio 2 at full area never fits a square: torchvision's centre fallback.
    boxes = crop_boxes(rng, 5, 40, 40, (1.0, 1.0), (2.0, 2.0))
    np.testing.assert_array_equal(boxes, np.tile([10, 0, 20, 40], (5, 1)))


def test_eval_is_deterministic_centre_crop():
    cfg = AugmentConfig()
    images = np.stack([asymmetric_image(37), asymmetric_image(37)[::-1]])
    preset = build_preset("eval", cfg, 32)  # round(32 * 1.15) == 37: no resize
    first, second = preset(batch_of(images))["image"], preset(batch_of(images))["image"]
    np.testing.assert_array_equal(first, second)
    top = round((37 - 32) / 2)  # torchvision's anchor
    crop = images[:, top : top + 32, top : top + 32]
    np.testing.assert_array_equal(first, nchw(crop))
    np.testing.assert_array_equal(displayable(first), crop)


@pytest.mark.parametrize("working", [64, 37, 30])
@pytest.mark.parametrize("whole_frame", [False, True])
def test_eval_resizes_and_crops_as_torchvision_does(working, whole_frame):
    """The eval preset's resize, centre crop and masks on torch alone (no torchvision import
    in Ray Data's processes) equal torchvision v2's Resize + CenterCrop, masks NEAREST_EXACT."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, working, working, 3), np.uint8)
    masks = rng.integers(0, 5, (3, working, working), np.uint8)
    out = build_preset("eval", AugmentConfig(), 32, whole_frame=whole_frame)(
        {"image": images, "mask": masks}
    )
    exact = TF.InterpolationMode.NEAREST_EXACT
    size = [32, 32] if whole_frame else [37]  # round(32 * 1.15) == 37
    expected = TF.resize(torch.from_numpy(images).permute(0, 3, 1, 2), size, antialias=True)
    expected_masks = TF.resize(torch.from_numpy(masks), size, interpolation=exact)
    if not whole_frame:
        expected = TF.center_crop(expected, [32])
        expected_masks = TF.center_crop(expected_masks, [32])
    np.testing.assert_array_equal(out["image"], expected.numpy())
    np.testing.assert_array_equal(out["mask"], expected_masks.numpy())


def test_the_data_path_presets_do_not_import_torchvision():
    """torchvision costs every augmenting Ray Data process about 1.4 s before its first
    batch: only the classic_v2 reference may import it."""
    import subprocess
    import sys

    code = (
        "import sys; from raycv.config import AugmentConfig; "
        "from raycv.data.augment import build_preset; import numpy as np; "
        "batch = {'image': np.zeros((2, 40, 40, 3), np.uint8), "
        "'mask': np.zeros((2, 40, 40), np.uint8)}; "
        "[build_preset(n, AugmentConfig(), 32, whole_frame=w)(batch) "
        "for n, w in (('classic', False), ('eval', False), ('eval', True))]; "
        "print('torchvision' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert out.stdout.decode().strip() == "False"


def test_eval_resizes_other_working_sizes():
    out = build_preset("eval", AugmentConfig(), 32)(batch_of(asymmetric_image(64)[None]))
    assert out["image"].shape == (1, 3, 32, 32)


def smooth_photo(height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3): a different colour at each side and each end, nothing sharp."""
    y, x = np.mgrid[0:height, 0:width]
    u, v = x / (width - 1), y / (height - 1)
    return (np.stack([u, v, (1 - u) * (1 - v)], axis=-1) * 220 + 15).astype(np.uint8)


def squeezed(photo: np.ndarray, side: int) -> np.ndarray:
    """The photo resized whole into side x side, as data/images.decode_whole caches it."""
    pixels = torch.from_numpy(photo).permute(2, 0, 1)
    return TF.resize(pixels, [side, side], antialias=True).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("shape", [(40, 100), (100, 40)])
def test_a_squeezed_photo_augments_as_the_photo_itself(name, shape):
    """Crops, flips, rotation and the eval centre crop drawn on a squeezed photo with its
    aspect ratio land where they land on the photo in its own proportions (same draws)."""
    photo = smooth_photo(*shape)
    side = min(shape)  # the photo's own pixels are then the units the draws are made in
    preset = build_preset(name, AugmentConfig(rotation=25, scale=(0.2, 1.0)), 32)
    preset.seed = 4
    batch = batch_of(np.stack([photo] * 6))
    direct = preset(batch)["image"] / LEVELS_PER_UNIT  # in normalised units
    cached = {**batch_of(np.stack([squeezed(photo, side)] * 6)), "aspect": np.full(6, 0.0)}
    cached["aspect"][:] = shape[1] / shape[0]
    out = preset(cached)["image"] / LEVELS_PER_UNIT
    assert out.shape == direct.shape == (6, 3, 32, 32)
    gap = np.abs(out - direct)  # 0.04 is about 2 grey levels
    assert gap.mean() < 0.04 and np.quantile(gap, 0.99) < 0.1, (gap.mean(), gap.max())
    # Without its aspect the same squeezed photo comes out squeezed: far off.
    ignored = preset({**cached, "aspect": np.ones(6)})["image"] / LEVELS_PER_UNIT
    assert np.abs(ignored - direct).mean() > 0.2
    if name != "eval":  # and the draws are not all alike: the check compares real crops
        assert np.abs(direct[0] - direct[1:]).mean() > 0.5


def test_true_sides_stretch_back_the_squeezed_side():
    heights, widths = true_sides(np.array([2.0, 0.5, 1.0]), 3, 30, 30)
    np.testing.assert_allclose(heights, [30, 60, 30])
    np.testing.assert_allclose(widths, [60, 30, 30])
    assert [a.tolist() for a in true_sides(None, 2, 30, 40)] == [[30, 30], [40, 40]]


# ---------------------------------------------------------------- batch plumbing


@pytest.mark.parametrize("name", PRESETS)
def test_other_keys_pass_through(name):
    batch = batch_of(np.repeat(asymmetric_image(37)[None], 5, axis=0))
    out = build_preset(name, AugmentConfig(), 32)(batch)
    assert set(out) == {"image", "label", "path"}
    assert out["image"].shape == (5, 3, 32, 32) and out["image"].dtype == np.uint8
    np.testing.assert_array_equal(out["label"], [0, 1, 2, 0, 1])
    assert out["path"].tolist() == [f"img_{i}.jpg" for i in range(5)]


@pytest.mark.parametrize("name", PRESETS)
def test_empty_and_read_only_batches(name):
    preset = build_preset(name, AugmentConfig(), 32)
    assert preset(batch_of(np.zeros((0, 37, 37, 3), np.uint8)))["image"].shape == (0, 3, 32, 32)
    frozen = np.repeat(asymmetric_image(37)[None], 2, axis=0)
    frozen.flags.writeable = False  # Ray's zero-copy batches can be read-only
    assert preset(batch_of(frozen))["image"].shape == (2, 3, 32, 32)


def test_wrong_image_layout_names_the_fix():
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        build_preset("classic", AugmentConfig(), 32)({"image": np.zeros((2, 37, 37), np.uint8)})


def test_unknown_preset_lists_known_ones():
    assert AUGMENTATIONS.names() == PRESETS
    with pytest.raises(KeyError, match="choose one of: classic, classic_v2, eval"):
        build_preset("clasic", AugmentConfig(), 32)
