"""Augmentation presets applied by Ray Data ``map_batches(preset, batch_format="numpy")``.

Images arrive already decoded and resized once to the working size (cached), as
``{"image": uint8 (N, H, W, 3), "label": int64 (N,), ...}``.  A preset replaces "image" with
the augmented ``uint8 (N, 3, S, S)`` and passes every other key through untouched: the
stream carries a quarter of float32's bytes, and the training worker converts to float and
normalises on its own device (``normalize``, called by every consumer of a stream).  An
optional ``"aspect"`` column (float (N,), width / height) says that each image is a whole
photo squeezed into the square (data/images.py ``decode_whole``): crops, rotation and the
centre crop are then drawn in the photo's own proportions, as if on the file itself.

Segmentation batches also hold ``"mask"``: uint8 (N, H, W) class ids, ``ignore_index`` (255 by
default) where a pixel has no label.  It comes out as uint8 (N, S, S), moved by exactly the
geometry of its own image (nearest-neighbour, so ids are never blended); pixels a rotation
brings in from outside the image get ``ignore_index``; colour jitter leaves it alone.

Presets (registered in ``AUGMENTATIONS``):

* ``classic``: the default train preset.  Flip x rotation x random-resized-crop fused into one
  affine matrix per image and applied to the whole batch with a single ``grid_sample``; colour
  jitter as per-image factors, vectorised.  Each image gets its own random draw.
* ``classic_v2``: the same recipe with ``torchvision.transforms.v2``, called once per image.
  The reference implementation (and the benchmark baseline); about 3x slower.
* ``eval``: deterministic resize + centre crop, applied to the whole batch at once; with
  ``whole_frame=True`` the whole image resized to S x S instead (segmentation scores every pixel).

Each preset also exposes ``transform(images, rng, aspect)`` on a uint8 NCHW tensor, giving
float pixels in [0, 1], and ``transform_pair(images, masks, rng, aspect)`` for images with
their masks; for ``classic`` and ``eval`` they run on whatever device the tensors live on, so
the same code can augment on a GPU.  ``__call__`` feeds them cache-sized chunks of the batch
(``CHUNK_PIXELS``) and rounds their pixels back to uint8.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from raycv.config import AugmentConfig
from raycv.data.boxes import warp_boxes
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
BOX_COLUMNS = ("boxes", "labels", "crowd")  # a detection batch's padded per-box columns


class Preset:
    """A picklable batch transform: numpy batch in, numpy batch out, extra keys untouched.

    ``ignore_index``: the mask value of unlabelled pixels, given to pixels from outside the
    image too.  ``whole_frame``: show the whole input frame, uncropped (presets that crop at
    random refuse it).
    """

    # Whether ``whole_frame`` means anything to this preset.
    shows_whole_frame = False
    # The target columns it keeps true to its pixels (config checks them against the task's).
    carries: frozenset[str] = frozenset({"label", "mask"})
    name = ""  # its name in AUGMENTATIONS, set by build_preset

    def __init__(
        self,
        cfg: AugmentConfig,
        image_size: int,
        *,
        ignore_index: int = 255,
        whole_frame: bool = False,
    ) -> None:
        if whole_frame and not self.shows_whole_frame:
            raise ValueError(
                f"whole_frame=True is for an eval preset such as 'eval'; {type(self).__name__} "
                "crops at random by design"
            )
        if not 0 <= ignore_index <= 255:
            raise ValueError(f"ignore_index must fit a uint8 mask (0-255), got {ignore_index}")
        self.cfg = cfg
        self.image_size = image_size
        self.ignore_index = ignore_index
        self.whole_frame = whole_frame
        # None: fresh OS entropy on every call.  An int makes every call repeat the same draws
        # (for tests and previews).  We never keep a generator in the object: Ray ships one
        # pickled copy to each worker, and copies of one generator would draw identical streams.
        self.seed: int | None = None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "boxes" in batch:
            return self._call_with_boxes(batch)
        images = _images_nchw(batch["image"])
        masks = _masks_nhw(batch["mask"], images) if "mask" in batch else None
        n, size = len(images), self.image_size
        out = {"image": np.empty((n, 3, size, size), dtype=np.uint8)}
        if masks is not None:
            out["mask"] = np.empty((n, size, size), dtype=np.uint8)
        rng = np.random.default_rng(self.seed)  # one stream for the batch: chunks differ
        aspect = batch.get("aspect")
        step = max(1, CHUNK_PIXELS // (size * size))
        for start in range(0, n, step):
            part = slice(start, start + step)
            chunk = self.transform_pair(
                images[part],
                None if masks is None else masks[part],
                rng,
                None if aspect is None else aspect[part],
            )
            out["image"][part] = _to_uint8(chunk[0])
            if masks is not None:
                out["mask"][part] = chunk[1].numpy()
        return {**batch, **out}

    def _call_with_boxes(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``__call__`` for detection: padded ``boxes`` (N, K, 4) and ``labels`` (N, K) (-1:
        padding), and ``crowd`` (N, K) where there is one, moved with their images; a box
        that leaves the output is dropped with its label and the rest move up."""
        images = _images_nchw(batch["image"])
        n, size = len(images), self.image_size
        out = {"image": np.empty((n, 3, size, size), dtype=np.uint8)}
        rng = np.random.default_rng(self.seed)
        aspect = batch.get("aspect")
        step = max(1, CHUNK_PIXELS // (size * size))
        moved = []
        for start in range(0, n, step):
            part = slice(start, start + step)
            pixels, kept = self.transform_boxes(
                images[part],
                _real_boxes(batch, part),
                rng,
                None if aspect is None else aspect[part],
            )
            out["image"][part] = _to_uint8(pixels)
            moved += kept
        return {**batch, **out, **_packed_boxes(batch, moved)}

    def apply(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``__call__`` for a batch of tensors on the training worker's device
        (``augment.where=worker``): uint8 (N, H, W, 3) images in, float (N, 3, S, S) pixels
        in [0, 1] out, masks and boxes moved with them, every image its own draw."""
        images = batch["image"].permute(0, 3, 1, 2)
        rng = np.random.default_rng(self.seed)
        aspect = batch["aspect"].cpu().numpy() if "aspect" in batch else None
        if "boxes" not in batch:
            pixels, masks = self.transform_pair(images, batch.get("mask"), rng, aspect)
            return {**batch, "image": pixels} | ({} if masks is None else {"mask": masks})
        # Boxes are a few numbers per image: they move on the CPU, as in Ray Data.
        columns = {k: batch[k].cpu().numpy() for k in BOX_COLUMNS if k in batch}
        pixels, moved = self.transform_boxes(images, _real_boxes(columns), rng, aspect)
        packed = _packed_boxes(columns, moved)
        return {**batch, "image": pixels} | {
            k: torch.from_numpy(v).to(images.device) for k, v in packed.items()
        }

    def transform_boxes(
        self,
        images: torch.Tensor,
        boxes: list[np.ndarray],
        rng: np.random.Generator,
        aspect: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, list[tuple[np.ndarray, np.ndarray]]]:
        """``transform`` for images with their (K, 4) xyxy pixel boxes: per image, the boxes
        that stay and the mask of which stayed (to keep their labels)."""
        raise NotImplementedError(f"{type(self).__name__} does not move boxes")

    def transform(
        self, images: torch.Tensor, rng: np.random.Generator, aspect: np.ndarray | None = None
    ) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float32 (N, 3, S, S) pixels in [0, 1], drawing from ``rng``;
        ``aspect``: each image's width / height before it was squeezed into H x W."""
        return self.transform_pair(images, None, rng, aspect)[0]

    def transform_pair(
        self,
        images: torch.Tensor,
        masks: torch.Tensor | None,
        rng: np.random.Generator,
        aspect: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``transform`` for images with their masks, uint8 (N, H, W) -> uint8 (N, S, S), each
        moved with its own image.  ``masks`` None: images alone (None back), the same draws."""
        raise NotImplementedError


AUGMENTATIONS: Registry[type[Preset]] = Registry("augmentation preset")


def build_preset(
    name: str,
    cfg: AugmentConfig,
    image_size: int,
    *,
    ignore_index: int = 255,
    whole_frame: bool = False,
) -> Preset:
    """The single way in: ``build_preset(cfg.augment.train_preset, cfg.augment, size)``.
    Segmentation passes ``ignore_index=cfg.data.ignore_index``, and ``whole_frame=True`` to
    its eval preset: every pixel of the image is scored, so none may be cropped away."""
    preset = AUGMENTATIONS.get(name)(
        cfg, image_size, ignore_index=ignore_index, whole_frame=whole_frame
    )
    preset.name = name  # what a PresetStep (data/preset_step.py) rebuilds it by
    return preset


def normalize(
    images: torch.Tensor, cfg: AugmentConfig, channels_last: bool = False
) -> torch.Tensor:
    """A stream's uint8 (N, 3, S, S) images (or a preset's float pixels in [0, 1]) -> the
    model's input, float32 normalised with ``cfg.mean`` and ``cfg.std``, on their device."""
    out = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
    mean = out.new_tensor(cfg.mean).view(1, 3, 1, 1)
    std = out.new_tensor(cfg.std).view(1, 3, 1, 1)
    out = out.sub_(mean).div_(std)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def displayable(images: np.ndarray) -> np.ndarray:
    """A stream's uint8 (N, 3, S, S) images -> uint8 (N, S, S, 3), for pictures."""
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1))


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return pixels.mul(255).round_().clamp_(0, 255).to(torch.uint8).numpy()


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
    reach outside the image; the crop box always lies inside it.  Masks follow through the
    same sampling grid with nearest-neighbour lookups, which cost little next to the pixels.

    Known differences from ``classic_v2``: no antialiasing when the crop is shrunk (working
    size is ~1.15 x S, so the shrink is mild); jitter runs in the fixed order brightness,
    contrast, saturation in float (v2 permutes the order per image and rounds to uint8).
    """

    def transform_pair(
        self,
        images: torch.Tensor,
        masks: torch.Tensor | None,
        rng: np.random.Generator,
        aspect: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        theta = self._draw(images, rng, aspect)
        grid = _grid(torch.from_numpy(theta).to(images.device), self.image_size)
        masks = None if masks is None else warp_masks(masks, grid, self.ignore_index)
        return self._pixels(images, grid, rng), masks

    carries = Preset.carries | {"boxes", "labels"}

    def transform_boxes(
        self,
        images: torch.Tensor,
        boxes: list[np.ndarray],
        rng: np.random.Generator,
        aspect: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, list[tuple[np.ndarray, np.ndarray]]]:
        """Each image's boxes move through its own warp (``raycv.data.boxes.warp_boxes``)."""
        _, _, height, width = images.shape
        theta = self._draw(images, rng, aspect)
        grid = _grid(torch.from_numpy(theta).to(images.device), self.image_size)
        moved = [warp_boxes(b, t, height, width, self.image_size) for b, t in zip(boxes, theta)]
        return self._pixels(images, grid, rng), moved

    def _draw(
        self, images: torch.Tensor, rng: np.random.Generator, aspect: np.ndarray | None
    ) -> np.ndarray:
        n, _, height, width = images.shape
        return _draw_affine(rng, self.cfg, n, *true_sides(aspect, n, height, width))

    def _pixels(
        self, images: torch.Tensor, grid: torch.Tensor, rng: np.random.Generator
    ) -> torch.Tensor:
        out = _warp(images, grid).mul_(1 / 255)  # scaled after the warp: S*S pixels, not H*W
        return color_jitter(out, _draw_jitter(rng, self.cfg, len(images)))


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


def _grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """(N, S, S, 2) sampling grid of the (N, 2, 3) ``theta``s: shared by pixels and masks."""
    return F.affine_grid(theta, [len(theta), 1, size, size], align_corners=False)


def _warp(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    # contiguous first: converting the NHWC-strided uint8 view straight to float is 4x slower
    return F.grid_sample(
        images.contiguous().float(),
        grid,
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )


def warp_masks(masks: torch.Tensor, grid: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """uint8 (N, H, W) class ids -> uint8 (N, S, S) at ``grid``: each output pixel takes the id
    of the input pixel nearest its sample point, or ``ignore_index`` when that point falls
    outside the image.  Ids are shifted up by one for the lookup, so grid_sample's zero padding
    marks exactly those points (its nearest mode uses the same pixel centres as bilinear)."""
    shifted = masks[:, None].float().add_(1)
    out = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    outside = out == 0
    return out.sub_(1).masked_fill_(outside, ignore_index)[:, 0].to(torch.uint8)


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


# ---------------------------------------------------------------- reference and eval presets


@AUGMENTATIONS.register("classic_v2")
class ClassicV2Preset(Preset):
    """The classic recipe with torchvision v2, called once per image so draws are per image.

    Masks travel as ``tv_tensors.Mask`` beside their image: v2 moves them with the same draw,
    always nearest-neighbour, and fills what rotation brings in with ``ignore_index``.
    """

    def __init__(
        self,
        cfg: AugmentConfig,
        image_size: int,
        *,
        ignore_index: int = 255,
        whole_frame: bool = False,
    ) -> None:
        super().__init__(cfg, image_size, ignore_index=ignore_index, whole_frame=whole_frame)
        # Imported here: the reference preset alone needs torchvision, and importing it cost
        # every augmenting Ray Data process about 1.4 s before its first batch on 2 cores.
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        bilinear = v2.InterpolationMode.BILINEAR  # as the fused warp; v2's default is nearest
        fill = {tv_tensors.Mask: ignore_index, "others": 0}
        self.pipeline = v2.Compose(
            [
                v2.RandomHorizontalFlip(cfg.hflip),
                v2.RandomVerticalFlip(cfg.vflip),
                v2.RandomRotation(cfg.rotation, interpolation=bilinear, fill=fill),
                v2.RandomResizedCrop(image_size, cfg.scale, cfg.ratio, antialias=True),
                v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation),
                v2.ToDtype(torch.float32, scale=True),  # images only: masks stay uint8
            ]
        )

    def transform_pair(
        self,
        images: torch.Tensor,
        masks: torch.Tensor | None,
        rng: np.random.Generator,
        aspect: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from torchvision import tv_tensors  # see __init__

        # v2 draws from torch's global generator: seed a private fork of it, so calls get fresh
        # entropy (or self.seed) and the caller's own random stream is left untouched.
        seed = int(rng.integers(2**62))
        n, _, height, width = images.shape
        sides = list(zip(*true_sides(aspect, n, height, width)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if masks is None:
                out = [self.pipeline(_unsqueezed(im, *hw)) for im, hw in zip(images, sides)]
                return torch.stack(out), None
            pairs = [
                self.pipeline(_unsqueezed(im, *hw), _unsqueezed(tv_tensors.Mask(m[None]), *hw))
                for im, m, hw in zip(images, masks, sides)
            ]
        return torch.stack([im for im, _ in pairs]), torch.cat([m for _, m in pairs])


def _unsqueezed(image: torch.Tensor, height: float, width: float) -> torch.Tensor:
    """A squeezed image (or Mask, which v2 resizes nearest) resized back to its own
    proportions, per image: the reference."""
    from torchvision.transforms import v2  # see ClassicV2Preset.__init__

    size = [round(height), round(width)]
    return image if list(image.shape[1:]) == size else v2.functional.resize(image, size)


@AUGMENTATIONS.register("eval")
class EvalPreset(Preset):
    """Deterministic resize + centre crop; safe to apply to the whole batch tensor at once.

    Masks are resized nearest-neighbour with pixel centres aligned (``NEAREST_EXACT``; v2's
    plain ``NEAREST`` reads up and left of each output pixel's centre, half an output pixel
    off the bilinear image on average) and cropped with the same integer box as their image.
    ``whole_frame``: no centre crop, the whole image resized to S x S, so that segmentation
    scores every pixel of it.
    """

    shows_whole_frame = True
    carries = Preset.carries | {"boxes", "labels"}  # with whole_frame

    def __init__(
        self,
        cfg: AugmentConfig,
        image_size: int,
        *,
        ignore_index: int = 255,
        whole_frame: bool = False,
    ) -> None:
        super().__init__(cfg, image_size, ignore_index=ignore_index, whole_frame=whole_frame)
        # The same 1.15 ratio as the default working size, so the usual cached batch skips it.
        self.resize_to = round(image_size * 1.15)

    def transform_pair(
        self,
        images: torch.Tensor,
        masks: torch.Tensor | None,
        rng: np.random.Generator,
        aspect: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.whole_frame:
            return self._whole(images, masks)
        if aspect is not None:
            return self._squeezed(images, masks, aspect)
        size = _shorter_side_to(images.shape[-2:], self.resize_to)
        images, masks = _resized(images, size), _resized(masks, size, nearest=True)
        masks = None if masks is None else _centre_crop(masks, self.image_size)
        return _to_float(_centre_crop(images, self.image_size)), masks

    def transform_boxes(
        self,
        images: torch.Tensor,
        boxes: list[np.ndarray],
        rng: np.random.Generator,
        aspect: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, list[tuple[np.ndarray, np.ndarray]]]:
        """The whole frame at S x S, every box moved with it (none is lost). A squeezed photo
        (``aspect``) is letterboxed: its long side fills S, the rest is padded, so objects
        keep the proportions that training's crops showed them in."""
        if not self.whole_frame:
            raise ValueError("the eval preset moves boxes with whole_frame=True only")
        n, _, height, width = images.shape
        if aspect is None:
            scale = np.array([width, height, width, height], np.float32)
            scaled = [(b * (self.image_size / scale), np.ones(len(b), bool)) for b in boxes]
            return self._whole(images, None)[0], scaled
        theta = self._letterbox(*true_sides(aspect, n, height, width))
        grid = _grid(torch.from_numpy(theta).to(images.device), self.image_size)
        out = _warp(images, grid).mul_(1 / 255)
        moved = [warp_boxes(b, t, height, width, self.image_size, 0) for b, t in zip(boxes, theta)]
        return out, moved

    @staticmethod
    def _letterbox(heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
        """(N, 2, 3) warps that fit each image whole and centred in a square of its long side."""
        side = np.maximum(heights, widths)
        boxes = np.stack([(heights - side) / 2, (widths - side) / 2, side, side], axis=1)
        still = np.zeros(len(side))
        return affine_matrices(still > 0, still > 0, still, boxes, heights, widths)

    def _whole(
        self, images: torch.Tensor, masks: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole frame, squeezed to S x S.  A squeezed photo (``aspect``) stays squeezed:
        its mask is squeezed alike, so every label still sits on its pixel and every pixel is
        scored, and validation sees the same squeeze every epoch, so epochs and runs compare.
        (Training sees true proportions; this small shift is the price of scoring all pixels
        at S x S.)"""
        size = [self.image_size, self.image_size]
        return _to_float(_resized(images, size)), _resized(masks, size, nearest=True)

    def _squeezed(
        self, images: torch.Tensor, masks: torch.Tensor | None, aspect: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The same centre crop of whole photos squeezed into the square: one warp for the
        batch, from the box that resize + centre crop would cut in each photo's proportions."""
        n, _, height, width = images.shape
        heights, widths = true_sides(aspect, n, height, width)
        side = np.minimum(heights, widths) * self.image_size / self.resize_to
        boxes = np.stack([(heights - side) / 2, (widths - side) / 2, side, side], axis=1)
        still = np.zeros(n)
        theta = affine_matrices(still > 0, still > 0, still, boxes, heights, widths)
        grid = _grid(torch.from_numpy(theta).to(images.device), self.image_size)
        out = _warp(images, grid).mul_(1 / 255)
        return out, None if masks is None else warp_masks(masks, grid, self.ignore_index)


def _real_boxes(batch: dict[str, np.ndarray], part: slice = slice(None)) -> list[np.ndarray]:
    """Each image's boxes without the padding (label -1)."""
    return [b[labels >= 0] for b, labels in zip(batch["boxes"][part], batch["labels"][part])]


def _packed_boxes(batch: dict[str, np.ndarray], moved: list) -> dict[str, np.ndarray]:
    """The box columns after a warp, padded as before: each image's boxes that stayed
    (``moved``: per image, the boxes and which of the real ones they are) first, with their
    labels and crowd flags, then label -1."""
    n, k = batch["labels"].shape
    out = {"boxes": np.zeros((n, k, 4), np.float32), "labels": np.full((n, k), -1, np.int64)}
    extras = [c for c in BOX_COLUMNS[2:] if c in batch]
    out |= {c: np.zeros_like(batch[c]) for c in extras}
    for i, (kept, stayed) in enumerate(moved):
        real = batch["labels"][i] >= 0
        out["boxes"][i, : len(kept)] = kept
        for column in ("labels", *extras):
            out[column][i, : len(kept)] = batch[column][i][real][stayed]
    return out


# torchvision v2's resize, centre crop and float conversion, as the eval preset used them,
# on torch alone: importing torchvision cost every augmenting Ray Data process about 1.4 s
# before its first batch on 2 cores (docs/benchmarks.md).


def _resized(x: torch.Tensor | None, size: list[int], nearest: bool = False) -> torch.Tensor | None:
    """Images (N, C, H, W) bilinear with antialiasing, or masks (N, H, W) nearest with
    pixel centres aligned (``nearest-exact``: their values stay class ids), at ``size``.
    uint8 images resize natively on the CPU; elsewhere through float, rounded back."""
    if x is None or list(x.shape[-2:]) == list(size):
        return x
    if nearest:
        return F.interpolate(x.unsqueeze(1), size=size, mode="nearest-exact").squeeze(1)
    through_float = x.dtype == torch.uint8 and x.device.type != "cpu"
    out = F.interpolate(
        x.float() if through_float else x,
        size=size,
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    return out.round_().to(torch.uint8) if through_float else out


def _shorter_side_to(hw: torch.Size, side: int) -> list[int]:
    """(H, W) with the shorter side scaled to ``side``, the longer one in proportion (and
    rounded down), as torchvision's Resize(int) does."""
    height, width = hw
    short, long = min(height, width), max(height, width)
    other = int(side * long / short)
    return [side, other] if height <= width else [other, side]


def _centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` x ``size`` of (..., H, W), its corner rounded as torchvision's."""
    height, width = x.shape[-2:]
    top, left = round((height - size) / 2.0), round((width - size) / 2.0)
    return x[..., top : top + size, left : left + size]


def _to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1]."""
    return images.to(torch.float32).mul_(1.0 / 255)


def _images_nchw(images: np.ndarray) -> torch.Tensor:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"augmentation expects batch['image'] as uint8 (N, H, W, 3), got {images.dtype} "
            f"{images.shape}; decode to RGB and resize every image to the working size first"
        )
    # Ray may hand over read-only views of its object store; torch needs a writable array.
    images = np.require(images, requirements=["C", "W"])
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def _masks_nhw(masks: np.ndarray, images: torch.Tensor) -> torch.Tensor:
    n, _, height, width = images.shape
    if masks.dtype != np.uint8 or masks.shape != (n, height, width):
        raise ValueError(
            f"augmentation expects batch['mask'] as uint8 (N, H, W) class ids the size of "
            f"batch['image'], here ({n}, {height}, {width}); got {masks.dtype} {masks.shape}: "
            "resize masks with nearest-neighbour to the working size with their images"
        )
    return torch.from_numpy(np.require(masks, requirements=["C", "W"]))
