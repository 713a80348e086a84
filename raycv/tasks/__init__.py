"""Tasks by name (``TASKS``): what a batch holds, the forward pass, the loss, the metrics and
what every later stage reads from a model's output. See ``base.Task``."""

from raycv.tasks import classification, detection, segmentation
from raycv.tasks.base import TASKS, Evaluator, Metric, Task, build_task, total

__all__ = [
    "TASKS",
    "Evaluator",
    "Metric",
    "Task",
    "build_task",
    "classification",
    "detection",
    "segmentation",
    "total",
]
