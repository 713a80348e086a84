"""Progress within an epoch, from rank 0 alone: steps done and left, images/s, the share of
time spent waiting for data and the running loss, for training and validation.

On an interactive terminal a bar: Ray's distributed tqdm (``ray.experimental.tqdm_ray``)
sends the worker's bar state through the worker's log to the driver, which draws a real
tqdm bar there and hides it around other log lines; in ``--local`` runs the driver draws
it directly. Otherwise (CI, a file, ``ray job submit`` logs) plain lines: one every
``run.progress_every_s`` seconds of a long epoch, beside the controller's line per epoch.
Sweep trials print neither: their live trial table speaks for them."""

from __future__ import annotations

import logging
import math
import sys
import time

import torch

from raycv import verbosity
from raycv.config import Config

log = logging.getLogger(__name__)

# How often a bar's state travels to the driver: each update is one log line of JSON.
BAR_REFRESH_S = 0.5


def mode(enabled: bool) -> str:
    """What the driver wants its workers to show: ``bar`` where tqdm draws on a terminal
    (stderr), ``lines`` where it would fill a file with carriage returns, ``off`` for sweep
    trials and for ``RAYCV_LOG_LEVEL`` warning or error."""
    if not enabled or verbosity.level() > logging.INFO:
        return "off"
    return "bar" if sys.stderr.isatty() else "lines"


class EpochProgress:
    """One pass over a shard (``phase`` train or val) of epoch ``epoch``; ``total`` steps.
    Call ``step`` after each batch, ``close`` at the end. Costs nothing between refreshes:
    the loss stays on the device until a refresh reads it."""

    def __init__(self, how: str, phase: str, epoch: str, total: int, every_s: float) -> None:
        self.how, self.label, self.total = how, f"epoch {epoch} {phase}", total
        self.every_s = BAR_REFRESH_S if how == "bar" else every_s
        self.started = self.shown = time.perf_counter()
        self.done = self.images = 0
        self.waited = 0.0
        self.loss_sum: torch.Tensor | None = None
        self.bar = self._bar() if how == "bar" else None

    def _bar(self):
        from ray.experimental import tqdm_ray

        # The state goes out only when this class refreshes it, not on every update.
        return tqdm_ray.tqdm(desc=self.label, total=self.total, unit="step", flush_interval_s=0)

    def step(self, images: int, waited: float, loss: torch.Tensor | None = None) -> None:
        if self.how == "off":  # every rank but 0, every step: nothing to count
            return
        self.done += 1
        self.images += images
        self.waited += waited
        if loss is not None:
            loss = loss.detach().float()
            self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        now = time.perf_counter()
        if now - self.shown >= self.every_s:
            self.shown = now
            self._show(now)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.n = self.done
            self.bar.set_description(self.describe(time.perf_counter()))
            self.bar.close()

    def describe(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        parts = [self.label]
        if self.loss_sum is not None:
            parts.append(f"loss {self.loss_sum.item() / self.done:.4f}")
        parts += [f"{self.images / elapsed:.0f} img/s", f"data wait {self.waited / elapsed:.0%}"]
        return " | ".join(parts)

    def _show(self, now: float) -> None:
        if self.bar is not None:
            self.bar.n = self.done  # the setter sends nothing; set_description sends both
            self.bar.set_description(self.describe(now))
            return
        head, _, rest = self.describe(now).partition(" | ")
        log.info("%s | step %d/%d | %s", head, self.done, self.total, rest)


def val_steps(num_val: int, cfg: Config) -> int:
    """Validation batches per worker: its shard of ``num_val`` in local batches of
    ``batch_size // world``, about ``num_val / batch_size`` for any number of workers."""
    return max(1, math.ceil(num_val / cfg.train.batch_size))
