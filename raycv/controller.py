"""What ``raycv.train.fit`` hands to Ray Train's controller, in a module that imports little.

The controller is a fresh process that unpickles the train function and the callbacks
before it starts the workers. With the train function in ``raycv.loop``, the controller
imported the loop's dependencies (torchvision, torch-pruning and the timm it imports) before
any worker started, and each worker imported them again: 2.8 s more on the way to the first
step on 2 cores (docs/benchmarks.md, start-up). Now the controller loads this module and
``raycv.runs`` (torch, which Ray's TorchConfig imports there anyway); the loop is imported
by the workers that run it."""

from __future__ import annotations

from typing import Any

import ray.train

from raycv import verbosity
from raycv.runs import MetricsRecorder


def train_func(payload: dict[str, Any]) -> None:
    """Each worker's loop, ``raycv.loop.train_func``, imported where it runs."""
    from raycv.loop import train_func as loop

    loop(payload)


class RecordReports(ray.train.UserCallback):
    """Runs on the Train controller: records each epoch that the workers report."""

    def __init__(self, recorder: MetricsRecorder, progress: bool = True) -> None:
        self.recorder = recorder
        self.progress = progress

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        # The controller is a fresh process; sweep trials stay quiet (the trial table speaks).
        if self.progress:
            verbosity.configure(verbose_flag=False)  # RAYCV_LOG_LEVEL came with the env
        self.recorder.record(metrics, checkpoint.path if checkpoint else None)
