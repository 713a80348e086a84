"""Models by name (``MODELS``), for every task, behind ``create_model``."""

from raycv.models import classification, detection, segmentation, yolo
from raycv.models.classification import INCEPTION_AUX_MIN_SIZE
from raycv.models.registry import (
    MODELS,
    ModelSpec,
    check_input_size,
    check_weights,
    create_model,
    replace_heads,
)

__all__ = [
    "INCEPTION_AUX_MIN_SIZE",
    "MODELS",
    "ModelSpec",
    "check_input_size",
    "check_weights",
    "classification",
    "create_model",
    "detection",
    "replace_heads",
    "segmentation",
    "yolo",
]
