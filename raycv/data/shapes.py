"""Shapes: a built-in dataset of procedurally drawn shapes that needs no download.

Each sample shows one main shape, whose class is the sample's label, on a
background made of a random base colour, smooth colour blobs, a gradient,
sometimes stripes, and per-pixel Gaussian noise. Harder levels add smaller
distractor shapes of other classes and thin clutter lines. A sample depends
only on ``(seed, index)`` and the options, so any Ray worker can draw any
slice of the dataset without files or coordination.

Every drawn object also has a mask of its visible pixels (shapes drawn later
cover earlier ones) and the tight box of that mask, so the same samples serve
classification, detection and segmentation. The main object always comes first.

Difficulty levels (sizes are the main shape's circumscribed diameter as a share
of the image side):

* ``easy``: 35-70 %, high contrast, mild texture and noise, no distractors.
* ``medium``: 25-55 %, stronger texture and noise, 0-2 distractors that may
  cover up to 30 % of the main shape.
* ``hard``: 18-45 %, busy texture with stripes and clutter lines, low contrast,
  1-3 distractors that may cover up to half of the main shape.

Boxes are ``xyxy`` in pixel-edge coordinates: a mask spanning columns ``x0..x1``
has ``x_min = x0`` and ``x_max = x1 + 1``, so every box has a positive area.
This is ``torchvision.ops.masks_to_boxes`` plus one on ``x_max`` and ``y_max``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from raycv.data.boxes import mask_box

# Polygon fill has no anti-aliasing; drawing at this factor and box-filtering
# down keeps corners and thin arms readable on 32 px images.
_SUPERSAMPLE = 4
_CIRCLE_VERTICES = 48
# Below this radius (pixels) stars and crosses turn into blobs.
_MIN_RADIUS = 3.0
_DISTRACTOR_SCALE = (0.3, 0.6)  # of the main shape's size, so the label stays obvious
_MIN_DISTRACTOR_PIXELS = 20
_PLACEMENT_TRIES = 4
COLUMNS = ("image", "label", "boxes", "labels", "masks", "semantic")


def _ellipse(rx: float, ry: float, cx: float = 0.0) -> np.ndarray:
    t = 2 * np.pi * np.arange(_CIRCLE_VERTICES) / _CIRCLE_VERTICES
    return np.stack([cx + rx * np.cos(t), ry * np.sin(t)], axis=1)


def _regular(n: int, start: float = -np.pi / 2) -> np.ndarray:
    t = start + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return _regular(2 * points) * radii[:, None]


def _cross(arm: float = 0.33) -> np.ndarray:
    quarter = [(1.0, -arm), (1.0, arm), (arm, arm)]
    turns = [np.array([[c, -s], [s, c]]) for c, s in ((1, 0), (0, 1), (-1, 0), (0, -1))]
    return np.concatenate([np.array(quarter) @ r.T for r in turns])


def _heart() -> np.ndarray:
    t = 2 * np.pi * np.arange(_CIRCLE_VERTICES) / _CIRCLE_VERTICES
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], axis=1)


_Outline = tuple[tuple[np.ndarray, bool], ...]
_ARROW = np.array(
    [(-1, -0.22), (0.15, -0.22), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.22), (-1, 0.22)]
)
_DIAMOND = np.array([(1, 0), (0, 0.55), (-1, 0), (0, -0.55)])


def _normalised(outline: list[tuple[np.ndarray, bool]]) -> _Outline:
    """Centre the filled parts' box on the origin and scale them into the unit circle.

    A unit circumradius lets placement keep any rotation of any class inside the image.
    """
    filled = np.concatenate([v for v, add in outline if add])
    centre = (filled.min(axis=0) + filled.max(axis=0)) / 2
    scale = np.linalg.norm(filled - centre, axis=1).max()
    return tuple(((v - centre) / scale, add) for v, add in outline)


# (polygon, fill) pairs drawn in order; fill=False cuts holes (ring, crescent).
_OUTLINES = {
    name: _normalised(parts)
    for name, parts in {
        "circle": [(_ellipse(1, 1), True)],
        "square": [(_regular(4, np.pi / 4), True)],
        "triangle": [(_regular(3), True)],
        "star": [(_star(), True)],
        "cross": [(_cross(), True)],
        "arrow": [(_ARROW, True)],
        "hexagon": [(_regular(6), True)],
        # Elongated so that no rotation of a square looks like it.
        "diamond": [(_DIAMOND, True)],
        "ellipse": [(_ellipse(1, 0.5), True)],
        "ring": [(_ellipse(1, 1), True), (_ellipse(0.55, 0.55), False)],
        "crescent": [(_ellipse(1, 1), True), (_ellipse(0.8, 0.8, 0.45), False)],
        "heart": [(_heart(), True)],
    }.items()
}
SHAPE_CLASSES: tuple[str, ...] = tuple(_OUTLINES)


@dataclass(frozen=True)
class _Level:
    """What one difficulty sets; sizes are shares of the image side."""

    size: tuple[float, float]  # main shape's circumscribed diameter
    distractors: tuple[int, int]  # inclusive range of how many to try to place
    contrast: tuple[float, float]  # RGB distance between a shape and the base colour
    noise: float  # per-pixel Gaussian sigma
    texture: float  # amplitude of blobs, gradient and stripes
    cells: tuple[int, int]  # blob grid size: more cells, busier background
    stripes: float  # chance of a stripe pattern
    stripe_cycles: tuple[float, float]
    clutter_lines: tuple[int, int]
    min_visible: float  # share of the main shape's pixels distractors must leave uncovered


_LEVELS = {
    # Easy is meant to be learnt from scratch in minutes on a CPU (the quickstart).
    "easy": _Level(
        size=(0.55, 0.85),
        distractors=(0, 0),
        contrast=(150, 220),
        noise=4.0,
        texture=12.0,
        cells=(2, 3),
        stripes=0.0,
        stripe_cycles=(1.5, 4),
        clutter_lines=(0, 0),
        min_visible=1.0,
    ),
    "medium": _Level(
        size=(0.25, 0.55),
        distractors=(0, 2),
        contrast=(80, 160),
        noise=10.0,
        texture=28.0,
        cells=(3, 6),
        stripes=0.5,
        stripe_cycles=(2, 6),
        clutter_lines=(0, 2),
        min_visible=0.7,
    ),
    "hard": _Level(
        size=(0.18, 0.45),
        distractors=(1, 3),
        contrast=(70, 130),
        noise=10.0,
        texture=24.0,
        cells=(4, 8),
        stripes=0.5,
        stripe_cycles=(3, 8),
        clutter_lines=(1, 3),
        min_visible=0.5,
    ),
}
DIFFICULTIES: tuple[str, ...] = tuple(_LEVELS)


@dataclass(frozen=True, eq=False)
class _Shape:
    label: int
    radius: float
    colour: np.ndarray  # (3,) float32 RGB
    alpha: np.ndarray  # (H, W) float32 coverage in [0, 1]

    @property
    def drawn(self) -> np.ndarray:
        return self.alpha >= 0.5


def _check_num_classes(num_classes: int) -> None:
    if not 2 <= num_classes <= len(SHAPE_CLASSES):
        raise ValueError(f"num_classes must be in [2, {len(SHAPE_CLASSES)}], got {num_classes}")


def _check_args(index: int, image_size: int, difficulty: str, seed: int) -> None:
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if difficulty not in _LEVELS:
        raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")


def class_names(num_classes: int, classes: Sequence[str] | None = None) -> list[str]:
    """Names of the classes in label order: ``classes`` when given (any subset of
    ``SHAPE_CLASSES``, e.g. to pretrain on one family and transfer to another), else the
    first ``num_classes``."""
    if not classes:
        _check_num_classes(num_classes)
        return list(SHAPE_CLASSES[:num_classes])
    unknown = [c for c in classes if c not in _OUTLINES]
    if unknown:
        raise ValueError(
            f"unknown shape classes {unknown}; choose from: {', '.join(SHAPE_CLASSES)}"
        )
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise ValueError(f"classes must name at least 2 different shapes, got {list(classes)}")
    return list(classes)


@functools.lru_cache(maxsize=64)
def _upsampler(cells: int, size: int) -> np.ndarray:
    """(size, cells) weights that spread a cells-wide grid of values smoothly over size pixels."""
    pos = (np.arange(size) + 0.5) / size * (cells - 1)
    left = np.minimum(pos.astype(int), cells - 2)
    t = pos - left
    t = t * t * (3 - 2 * t)  # smoothstep: plain linear steps show the grid as creases
    weights = np.zeros((size, cells), np.float32)
    weights[np.arange(size), left] = 1 - t
    weights[np.arange(size), left + 1] = t
    weights.setflags(write=False)
    return weights


@functools.lru_cache(maxsize=16)
def _ramp(size: int) -> np.ndarray:
    ramp = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    ramp.setflags(write=False)
    return ramp


def _texture(rng: np.random.Generator, size: int, level: _Level) -> np.ndarray:
    """(3, H, W) zero-mean-ish texture: colour blobs, a gradient and maybe stripes."""
    cells = int(rng.integers(level.cells[0], level.cells[1] + 1))
    up = _upsampler(cells, size)
    # A shared part varies brightness; a smaller per-channel part varies hue.
    grid = rng.standard_normal((1, cells, cells)) + 0.5 * rng.standard_normal((3, cells, cells))
    texture = up @ (grid.astype(np.float32) * level.texture) @ up.T
    ramp = _ramp(size)
    slope = rng.normal(0, level.texture, size=(3, 2)).astype(np.float32)
    texture += slope[:, 0, None, None] * ramp[None, None, :]
    texture += slope[:, 1, None, None] * ramp[None, :, None]
    if rng.random() < level.stripes:
        angle, phase = rng.uniform(0, 2 * np.pi, size=2)
        cycles = rng.uniform(*level.stripe_cycles)
        along = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
        wave = np.sin(2 * np.pi * cycles * along + phase)
        tint = rng.normal(0, level.texture / 2, size=3).astype(np.float32)
        texture += tint[:, None, None] * wave[None]
    return texture


def _contrasting(rng: np.random.Generator, base: np.ndarray, level: _Level) -> np.ndarray:
    """A colour at a random RGB distance in ``level.contrast`` from ``base``."""
    direction = rng.standard_normal(3)
    step = direction / np.linalg.norm(direction) * rng.uniform(*level.contrast)
    colour = base + step
    # Flip channels that would clip so the requested contrast survives.
    clipped = (colour < 0) | (colour > 255)
    colour[clipped] = base[clipped] - step[clipped]
    return np.clip(colour, 0, 255).astype(np.float32)


def _coverage(outline: _Outline, centre: np.ndarray, radius: float, angle: float, size: int):
    """(size, size) float32 share of each pixel that the rotated, scaled outline covers."""
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s], [s, c]])
    parts = [((v @ rotation.T) * radius + centre, add) for v, add in outline]
    corners = np.concatenate([p for p, _ in parts])
    low = np.clip(np.floor(corners.min(axis=0)).astype(int), 0, size - 1)
    high = np.maximum(np.clip(np.ceil(corners.max(axis=0)).astype(int), 0, size), low + 1)
    (x0, y0), (x1, y1) = low, high
    canvas = Image.new("L", ((x1 - x0) * _SUPERSAMPLE, (y1 - y0) * _SUPERSAMPLE))
    draw = ImageDraw.Draw(canvas)
    for points, add in parts:
        # PIL puts pixel centres on integers; ours sit at +0.5.
        local = (points - (x0, y0)) * _SUPERSAMPLE - 0.5
        draw.polygon(local.ravel().tolist(), fill=255 if add else 0)
    alpha = np.zeros((size, size), np.float32)
    small = canvas.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
    alpha[y0:y1, x0:x1] = np.asarray(small, np.float32) / 255
    return alpha


def _random_shape(
    rng: np.random.Generator,
    label: int,
    outline: _Outline,
    radius: float,
    size: int,
    base: np.ndarray,
    level: _Level,
) -> _Shape:
    centre = rng.uniform(radius, size - radius, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    alpha = _coverage(outline, centre, radius, angle, size)
    return _Shape(label, radius, _contrasting(rng, base, level), alpha)


def _clutter(rng: np.random.Generator, size: int, base: np.ndarray, level: _Level) -> list[_Shape]:
    """Thin lines across the background: edges that belong to no object."""
    lines = []
    for _ in range(int(rng.integers(level.clutter_lines[0], level.clutter_lines[1] + 1))):
        half_length = rng.uniform(0.2, 0.6) * size
        half_width = rng.uniform(0.4, 0.8) * max(size / 64, 1.0)
        bar = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)]) * (1, half_width / half_length)
        centre = rng.uniform(0, size, size=2)
        angle = rng.uniform(0, 2 * np.pi)
        alpha = _coverage(((bar, True),), centre, half_length, angle, size)
        # Half an object's contrast: clutter should distract, not dominate.
        colour = (base + _contrasting(rng, base, level)) / 2
        lines.append(_Shape(-1, half_length, colour, alpha))
    return lines


def _leaves_main_visible(main: _Shape, covered: np.ndarray, level: _Level) -> bool:
    drawn = main.drawn
    return np.count_nonzero(drawn & ~covered) >= level.min_visible * np.count_nonzero(drawn)


def _stack(
    rng: np.random.Generator,
    main: _Shape,
    outlines: list[_Outline],
    size: int,
    base: np.ndarray,
    level: _Level,
) -> list[_Shape]:
    """Main shape plus distractors, in drawing order (later ones cover earlier ones)."""
    below, above = [], []
    covered = np.zeros((size, size), bool)
    others = [label for label in range(len(outlines)) if label != main.label]
    for _ in range(int(rng.integers(level.distractors[0], level.distractors[1] + 1))):
        label = int(rng.choice(others))
        radius = main.radius * rng.uniform(*_DISTRACTOR_SCALE)
        if rng.random() < 0.5:
            below.append(_random_shape(rng, label, outlines[label], radius, size, base, level))
            continue
        for _ in range(_PLACEMENT_TRIES):
            shape = _random_shape(rng, label, outlines[label], radius, size, base, level)
            if _leaves_main_visible(main, covered | shape.drawn, level):
                above.append(shape)
                covered |= shape.drawn
                break
    return [*below, main, *above]


def _visible_masks(stack: list[_Shape]) -> list[np.ndarray]:
    covered = np.zeros_like(stack[0].drawn)
    masks = []
    for shape in reversed(stack):
        masks.append(shape.drawn & ~covered)
        covered |= shape.drawn
    return masks[::-1]


def _paint(image: np.ndarray, shapes: list[_Shape]) -> None:
    for shape in shapes:
        alpha = shape.alpha[..., None]
        image += alpha * (shape.colour - image)


def _annotations(stack: list[_Shape], main: _Shape) -> tuple[dict, np.ndarray]:
    """Boxes, labels and visible masks with the main shape first; also each one's drawn area.
    The semantic mask labels every visible pixel, of the tiny distractor pieces too that are
    too small to count as objects."""
    visible = _visible_masks(stack)
    semantic = np.zeros(visible[0].shape, np.uint8)
    for shape, mask in zip(stack, visible):
        semantic[mask] = shape.label + 1
    main_at = [shape is main for shape in stack].index(True)
    keep = [main_at] + [
        i
        for i, mask in enumerate(visible)
        if i != main_at and np.count_nonzero(mask) >= _MIN_DISTRACTOR_PIXELS
    ]
    masks = np.stack([visible[i] for i in keep]).astype(np.uint8)
    return {
        "boxes": np.array([mask_box(m) for m in masks], np.float32).reshape(-1, 4),
        "labels": np.array([stack[i].label for i in keep], np.int64),
        "masks": masks,
        "semantic": semantic,
    }, np.array([np.count_nonzero(stack[i].drawn) for i in keep], np.int64)


def _render(
    index: int,
    *,
    image_size: int,
    num_classes: int,
    difficulty: str,
    seed: int,
    classes: Sequence[str] | None = None,
) -> tuple[dict, np.ndarray]:
    """``render`` plus each returned object's pixel count before occlusion (for tests)."""
    _check_args(index, image_size, difficulty, seed)
    outlines = [_OUTLINES[name] for name in class_names(num_classes, classes)]
    level = _LEVELS[difficulty]
    rng = np.random.default_rng([seed, index])
    base = rng.uniform(30, 225, size=3).astype(np.float32)
    image = base + _texture(rng, image_size, level).transpose(1, 2, 0)
    _paint(image, _clutter(rng, image_size, base, level))
    radius = max(rng.uniform(*level.size) * image_size / 2, _MIN_RADIUS)
    label = int(rng.integers(len(outlines)))
    main = _random_shape(rng, label, outlines[label], radius, image_size, base, level)
    stack = _stack(rng, main, outlines, image_size, base, level)
    _paint(image, stack)
    image += rng.standard_normal(image.shape, dtype=np.float32) * level.noise
    pixels = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    annotations, drawn_area = _annotations(stack, main)
    return {"image": pixels, "label": main.label, **annotations}, drawn_area


def render(
    index: int,
    *,
    image_size: int,
    num_classes: int,
    difficulty: str,
    seed: int,
    classes: Sequence[str] | None = None,
) -> dict:
    """Sample ``index`` of the dataset fixed by ``seed``; a pure function of its arguments.
    Labels index ``class_names(num_classes, classes)``.

    Returns ``image`` (H, W, 3) uint8, ``label`` (the main shape's class), ``boxes``
    (N, 4) float32 xyxy, ``labels`` (N,) int64 and ``masks`` (N, H, W) uint8 0/1 of
    visible pixels, for every drawn object with the main shape first, and ``semantic``
    (H, W) uint8: 0 on the background, class + 1 on every visible shape pixel.
    """
    sample, _ = _render(
        index,
        image_size=image_size,
        num_classes=num_classes,
        difficulty=difficulty,
        seed=seed,
        classes=classes,
    )
    return sample


def render_range(start: int, stop: int, **kwargs) -> dict[str, list]:
    """Samples ``start`` to ``stop - 1`` as columns (one list per key of ``render``)."""
    columns: dict[str, list] = {key: [] for key in COLUMNS}
    for index in range(start, stop):
        sample = render(index, **kwargs)
        for key in COLUMNS:
            columns[key].append(sample[key])
    return columns
