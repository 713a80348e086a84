"""Augmentation presets applied by Ray Data ``map_batches(preset, batch_format="numpy")``.

Images arrive already decoded and resized once to the working size (cached), as
``{"image": uint8 (N, H, W, 3), "label": int64 (N,), ...}``.  A preset replaces "image" with
normalised ``float32 (N, 3, S, S)`` and passes every other key through untouched.  An
optional ``"aspect"`` column (float (N,), width / height) says that each image is a whole
photo squeezed into the square (data/images.py ``decode_whole``): crops, rotation and the
centre crop are then drawn in the photo's own proportions, as if on the file itself.

Presets (registered in ``AUGMENTATIONS``):

* ``classic``: the default train preset.  Flip x rotation x random-resized-crop fused into one
  affine matrix per image and applied to the whole batch with a single ``grid_sample``; colour
  jitter as per-image factors, vectorised.  Each image gets its own random draw.
* ``classic_v2``: the same recipe with ``torchvision.transforms.v2``, called once per image.
  The reference implementation (and the benchmark baseline); about 3x slower.
* ``eval``: deterministic resize + centre crop, applied to the whole batch at once.

Each preset also exposes ``transform(images, rng, aspect)`` on a uint8 NCHW tensor; for ``classic``
and ``eval`` it runs on whatever device the tensor lives on, so the same code can augment on a
GPU.  ``__call__`` feeds it cache-sized chunks of the batch (``CHUNK_PIXELS``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from raycv.config import AugmentConfig
from raycv.registry import Registry

# Weights of torchvision's rgb_to_grayscale (ITU-R 601-2 luma), used by contrast and saturation.
_GREY_WEIGHTS = (0.2989, 0.587, 0.114)
# RandomResizedCrop.get_params tries this many draws before falling back to a centre crop.
_CROP_ATTEMPTS = 10
# Output pixels transformed at a time.  The warp, jitter and normalisation are passes over
# memory: 64 images at 224 px (38 MB of float) spill out of cache and run 1.5x slower than
# chunks of 8 (measured on a 2-core Xeon, scripts/bench/data_throughput.py); small images
# still go as one chunk.
CHUNK_PIXELS = 8 * 224 * 224


class Preset:
    """A picklable batch transform: numpy batch in, numpy batch out, extra keys untouched."""

    def __init__(self, cfg: AugmentConfig, image_size: int) -> None:
        self.cfg = cfg
        self.image_size = image_size
        # None: fresh OS entropy on every call.  An int makes every call repeat the same draws
        # (for tests and previews).  We never keep a generator in the object: Ray ships one
        # pickled copy to each worker, and copies of one generator would draw identical streams.
        self.seed: int | None = None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = _images_nchw(batch["image"])
        size = self.image_size
        out = np.empty((len(images), 3, size, size), dtype=np.float32)
        rng = np.random.default_rng(self.seed)  # one stream for the batch: chunks differ
        aspect = batch.get("aspect")
        step = max(1, CHUNK_PIXELS // (size * size))
        for start in range(0, len(images), step):
            part = None if aspect is None else aspect[start : start + step]
            chunk = self.transform(images[start : start + step], rng, part)
            out[start : start + len(chunk)] = chunk.numpy()
        return {**batch, "image": out}

    def transform(
        self, images: torch.Tensor, rng: np.random.Generator, aspect: np.ndarray | None = None
    ) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> normalised float32 (N, 3, S, S), drawing from ``rng``;
        ``aspect``: each image's width / height before it was squeezed into H x W."""
        raise NotImplementedError


AUGMENTATIONS: Registry[type[Preset]] = Registry("augmentation preset")


def build_preset(name: str, cfg: AugmentConfig, image_size: int) -> Preset:
    """The single way in: ``build_preset(cfg.augment.train_preset, cfg.augment, size)``."""
    return AUGMENTATIONS.get(name)(cfg, image_size)


def denormalize(images: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    """Normalised float (N, 3, S, S) -> uint8 (N, S, S, 3), for preview grids."""
    mean = np.asarray(cfg.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(cfg.std, dtype=np.float32).reshape(1, 3, 1, 1)
    pixels = np.clip(images * std + mean, 0.0, 1.0) * 255.0
    return np.rint(pixels).astype(np.uint8).transpose(0, 2, 3, 1)


# ---------------------------------------------------------------- classic: one fused warp


@AUGMENTATIONS.register("classic")
class ClassicPreset(Preset):
    """Per-image flip, rotation, resized crop and colour jitter, fused for the whole batch.

    Hand-written on purpose.  A v2 transform called on a batch tensor draws ONE parameter set
    for the whole batch (every image gets the same flip, angle and crop), and calling v2 once
    per image is about 3x slower (see "Augmentation speed facts" in the design notes).  Composing
    flip x rotation x crop into one affine matrix per image and running one ``affine_grid`` +
    ``grid_sample`` directly at the output size gives each image its own draw, interpolates
    once instead of twice, and runs unchanged on a GPU tensor.

    Padding is zeros, not reflection: it matches ``classic_v2`` (RandomRotation fills with 0),
    so the two presets sample the same distribution, and reflection would mirror object parts
    into the rotated corners, inventing shapes the label does not describe.  Only rotation can
    reach outside the image; the crop box always lies inside it.

    Known differences from ``classic_v2``: no antialiasing when the crop is shrunk (working
    size is ~1.15 x S, so the shrink is mild); jitter runs in the fixed order brightness,
    contrast, saturation in float (v2 permutes the order per image and rounds to uint8).
    """

    def transform(
        self, images: torch.Tensor, rng: np.random.Generator, aspect: np.ndarray | None = None
    ) -> torch.Tensor:
        n, _, height, width = images.shape
        theta = _draw_affine(rng, self.cfg, n, *true_sides(aspect, n, height, width))
        out = _warp(images, torch.from_numpy(theta).to(images.device), self.image_size)
        out = out.mul_(1 / 255)  # scaled after the warp: S*S pixels instead of H*W
        out = color_jitter(out, _draw_jitter(rng, self.cfg, n))
        return _normalize(out, self.cfg)


def true_sides(
    aspect: np.ndarray | None, n: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each image's (height, width) in pixels of the proportions it had before it was
    squeezed into ``height`` x ``width``: the squeezed side is stretched back, the other kept.
    Boxes and rotations drawn in these units and scaled to [-1, 1] by them address the
    squeezed pixels exactly (both span the whole image)."""
    h = np.full(n, float(height))
    w = np.full(n, float(width))
    if aspect is None:
        return h, w
    stretch = np.asarray(aspect, np.float64) * h / w  # > 1: the width was squeezed
    return np.where(stretch < 1, h / stretch, h), np.where(stretch > 1, w * stretch, w)


def _draw_affine(
    rng: np.random.Generator,
    cfg: AugmentConfig,
    n: int,
    height: np.ndarray,
    width: np.ndarray,
) -> np.ndarray:
    flip_x = rng.random(n) < cfg.hflip
    flip_y = rng.random(n) < cfg.vflip
    angle = rng.uniform(-cfg.rotation, cfg.rotation, n)
    boxes = crop_boxes(rng, n, height, width, cfg.scale, cfg.ratio)
    return affine_matrices(flip_x, flip_y, angle, boxes, height, width)


def crop_boxes(
    rng: np.random.Generator,
    n: int,
    height: float | np.ndarray,
    width: float | np.ndarray,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> np.ndarray:
    """(N, 4) int boxes (top, left, h, w): torchvision RandomResizedCrop.get_params, vectorised;
    ``height`` and ``width``: one image size for all, or one per image.

    Each image gets up to 10 draws of (area, log-uniform aspect ratio); the first that fits is
    kept, and images where none fits fall back to the same centre crop torchvision uses.
    """
    height = np.broadcast_to(np.asarray(height, np.float64), (n,))
    width = np.broadcast_to(np.asarray(width, np.float64), (n,))
    shape = (n, _CROP_ATTEMPTS)
    area = (height * width)[:, None] * rng.uniform(scale[0], scale[1], shape)
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), shape))
    w = np.rint(np.sqrt(area * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.argmax(axis=1)
    w, h = w[np.arange(n), first], h[np.arange(n), first]
    top = np.floor(rng.random(n) * (np.floor(height) - h + 1)).astype(np.int64)
    left = np.floor(rng.random(n) * (np.floor(width) - w + 1)).astype(np.int64)
    for i in np.flatnonzero(~fits.any(axis=1)):
        top[i], left[i], h[i], w[i] = _fallback_box(int(height[i]), int(width[i]), ratio)
    return np.stack([top, left, h, w], axis=1)


def _fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, ...]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def affine_matrices(
    flip_x: np.ndarray,
    flip_y: np.ndarray,
    angle: np.ndarray,
    boxes: np.ndarray,
    height: float | np.ndarray,
    width: float | np.ndarray,
) -> np.ndarray:
    """(N, 2, 3) float32 ``affine_grid`` thetas for hflip -> vflip -> rotate -> resized crop;
    ``height`` and ``width``: one image size for all, or one per image (``true_sides``).

    A theta maps output coordinates in [-1, 1] back to input coordinates in [-1, 1]
    (align_corners=False), so the chain is walked backwards, in pixel units centred on the
    image (where rotation is a true rotation even for non-square images):
    output -> crop box -> undo rotation -> undo flips -> input, scaled to [-1, 1].
    """
    top, left, h, w = (boxes[:, k].astype(np.float64) for k in range(4))
    height = np.broadcast_to(np.asarray(height, np.float64), (len(boxes),))
    width = np.broadcast_to(np.asarray(width, np.float64), (len(boxes),))
    # Crop: output [-1, 1] spans the box; its centre sits at this offset from the image centre.
    crop = np.zeros((len(boxes), 3, 3))
    crop[:, 0, 0], crop[:, 0, 2] = w / 2, left + w / 2 - width / 2
    crop[:, 1, 1], crop[:, 1, 2] = h / 2, top + h / 2 - height / 2
    crop[:, 2, 2] = 1
    # Inverse of torchvision's rotate (positive angle = counter-clockwise on screen, y down).
    rad = np.deg2rad(angle)
    cos, sin = np.cos(rad), np.sin(rad)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    # A flip about the centre is its own inverse: negate the coordinate.
    flips = np.stack([np.where(flip_x, -1.0, 1.0), np.where(flip_y, -1.0, 1.0)], -1)
    to_unit = np.stack([2 / width, 2 / height], axis=-1)[:, :, None]
    linear = to_unit * flips[:, :, None] * rot  # rows scaled: diag(to_unit) @ diag(flips) @ rot
    return (linear @ crop[:, :2, :]).astype(np.float32)


def _warp(images: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    n, channels = images.shape[:2]
    grid = F.affine_grid(theta, [n, channels, size, size], align_corners=False)
    # contiguous first: converting the NHWC-strided uint8 view straight to float is 4x slower
    return F.grid_sample(
        images.contiguous().float(),
        grid,
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )


def _draw_jitter(rng: np.random.Generator, cfg: AugmentConfig, n: int) -> np.ndarray:
    """(N, 3) factors for brightness, contrast, saturation; ColorJitter's ranges."""
    strengths = (cfg.brightness, cfg.contrast, cfg.saturation)
    return np.stack([rng.uniform(max(0.0, 1 - x), 1 + x, n) for x in strengths], axis=1)


def color_jitter(images: torch.Tensor, factors: np.ndarray) -> torch.Tensor:
    """In place, per image: the v2 adjust_brightness, adjust_contrast, adjust_saturation formulas.

    ``images`` float in [0, 1], (N, 3, H, W); ``factors`` (N, 3); a factor of 1 is a no-op.
    """
    f = torch.from_numpy(factors.astype(np.float32)).to(images.device)[:, :, None, None, None]
    active = (factors != 1).any(axis=0)  # skip whole passes when a jitter is switched off
    if active[0]:  # blend with black
        images = images.mul_(f[:, 0]).clamp_(0, 1)
    if active[1]:  # blend with the image's mean grey level
        # grey is linear, so the grey of the channel means is the mean grey, at 1/5 the cost
        mean = _grey(images.mean(dim=(-2, -1), keepdim=True))
        images = _blend(images, mean, f[:, 1])
    if active[2]:  # blend with the grey image
        images = _blend(images, _grey(images), f[:, 2])
    return images


def _grey(images: torch.Tensor) -> torch.Tensor:
    weights = images.new_tensor(_GREY_WEIGHTS).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return images.mul_(factor).add_(other * (1 - factor)).clamp_(0, 1)


def _normalize(images: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    mean = images.new_tensor(cfg.mean).view(1, 3, 1, 1)
    std = images.new_tensor(cfg.std).view(1, 3, 1, 1)
    return images.sub_(mean).div_(std)


# ---------------------------------------------------------------- reference and eval presets


@AUGMENTATIONS.register("classic_v2")
class ClassicV2Preset(Preset):
    """The classic recipe with torchvision v2, called once per image so draws are per image."""

    def __init__(self, cfg: AugmentConfig, image_size: int) -> None:
        super().__init__(cfg, image_size)
        bilinear = v2.InterpolationMode.BILINEAR  # as the fused warp; v2's default is nearest
        self.pipeline = v2.Compose(
            [
                v2.RandomHorizontalFlip(cfg.hflip),
                v2.RandomVerticalFlip(cfg.vflip),
                v2.RandomRotation(cfg.rotation, interpolation=bilinear),
                v2.RandomResizedCrop(image_size, cfg.scale, cfg.ratio, antialias=True),
                v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(cfg.mean, cfg.std),
            ]
        )

    def transform(
        self, images: torch.Tensor, rng: np.random.Generator, aspect: np.ndarray | None = None
    ) -> torch.Tensor:
        # v2 draws from torch's global generator: seed a private fork of it, so calls get fresh
        # entropy (or self.seed) and the caller's own random stream is left untouched.
        seed = int(rng.integers(2**62))
        n, _, height, width = images.shape
        heights, widths = true_sides(aspect, n, height, width)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torch.stack(
                [
                    self.pipeline(_unsqueezed(image, h, w))
                    for image, h, w in zip(images, heights, widths)
                ]
            )


def _unsqueezed(image: torch.Tensor, height: float, width: float) -> torch.Tensor:
    """A squeezed image resized back to its own proportions (per image: the reference)."""
    size = [round(height), round(width)]
    return image if list(image.shape[1:]) == size else v2.functional.resize(image, size)


@AUGMENTATIONS.register("eval")
class EvalPreset(Preset):
    """Deterministic resize + centre crop; safe to apply to the whole batch tensor at once."""

    def __init__(self, cfg: AugmentConfig, image_size: int) -> None:
        super().__init__(cfg, image_size)
        # The same 1.15 ratio as the default working size, so the usual cached batch skips it.
        self.resize_to = round(image_size * 1.15)
        self.resize = v2.Resize(self.resize_to, antialias=True)
        self.finish = v2.Compose(
            [
                v2.CenterCrop(image_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(cfg.mean, cfg.std),
            ]
        )

    def transform(
        self, images: torch.Tensor, rng: np.random.Generator, aspect: np.ndarray | None = None
    ) -> torch.Tensor:
        if aspect is not None:
            return self._squeezed(images, aspect)
        if min(images.shape[-2:]) != self.resize_to:
            images = self.resize(images)
        return self.finish(images)

    def _squeezed(self, images: torch.Tensor, aspect: np.ndarray) -> torch.Tensor:
        """The same centre crop of whole photos squeezed into the square: one warp for the
        batch, from the box that resize + centre crop would cut in each photo's proportions."""
        n, _, height, width = images.shape
        heights, widths = true_sides(aspect, n, height, width)
        side = np.minimum(heights, widths) * self.image_size / self.resize_to
        boxes = np.stack([(heights - side) / 2, (widths - side) / 2, side, side], axis=1)
        still = np.zeros(n)
        theta = affine_matrices(still > 0, still > 0, still, boxes, heights, widths)
        out = _warp(images, torch.from_numpy(theta).to(images.device), self.image_size)
        return _normalize(out.mul_(1 / 255), self.cfg)


def _images_nchw(images: np.ndarray) -> torch.Tensor:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"augmentation expects batch['image'] as uint8 (N, H, W, 3), got {images.dtype} "
            f"{images.shape}; decode to RGB and resize every image to the working size first"
        )
    # Ray may hand over read-only views of its object store; torch needs a writable array.
    images = np.require(images, requirements=["C", "W"])
    return torch.from_numpy(images).permute(0, 3, 1, 2)
