"""torch-pruning's pruner with one rounding fix, in its own module: importing torch-pruning
costs 0.9 s (timm, torchvision), which ``raycv.pruning``'s registry, imported by every
command to validate its config, must not pay."""

from __future__ import annotations

import torch_pruning as tp


class RoundedPruner(tp.pruner.BasePruner):
    """torch-pruning's pruner, except that ``round_to`` never rounds a layer away."""

    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        # torch-pruning rounds the kept count down to a multiple of round_to; below round_to
        # that is 0 and it then skips the layer, so a higher ratio could leave a bigger model
        # (resnet18 at ratio 0.9 kept its whole 64-channel stage). Keep round_to instead.
        kept = current_channels - n_pruned
        kept = max(kept - kept % round_to, min(round_to, current_channels))
        return current_channels - kept
