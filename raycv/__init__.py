"""raycv: distributed training of vision models on Ray."""

__version__ = "0.1.0"
