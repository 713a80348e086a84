"""A preset as a Ray Data batch function that imports torch only where it augments.

A stream's plan is unpickled by processes that never augment a batch: Ray Train's
DatasetManager and each stream's SplitCoordinator. A Preset pickles by reference to
raycv.data.augment, so each of those imported torch and torchvision before it could hand
out epoch 1's first batch: about 2.7 s per process on 2 cores, on the way to the first
step (docs/benchmarks.md, start-up). A PresetStep carries the preset's name and settings
and builds it in the process that calls it, once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from raycv.config import AugmentConfig

if TYPE_CHECKING:
    from raycv.data.augment import Preset


@dataclass
class PresetStep:
    name: str  # in AUGMENTATIONS
    augment: AugmentConfig
    image_size: int
    ignore_index: int
    whole_frame: bool
    seed: int | None
    _built: Any = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def of(cls, preset: Preset) -> PresetStep:
        return cls(
            preset.name,
            preset.cfg,
            preset.image_size,
            preset.ignore_index,
            preset.whole_frame,
            preset.seed,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._built is None:
            from raycv.data.augment import build_preset  # here: see the module's docstring

            self._built = build_preset(
                self.name,
                self.augment,
                self.image_size,
                ignore_index=self.ignore_index,
                whole_frame=self.whole_frame,
            )
            self._built.seed = self.seed
        return self._built(batch)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_built": None}  # rebuilt where it lands
