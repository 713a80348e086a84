"""Connecting to Ray: an existing cluster when there is one, else a local one sized so
that Ray Data's tasks still get CPUs next to the Train workers."""

from __future__ import annotations

import logging
import math
import os

import ray
import ray.data

from raycv.config import Config

log = logging.getLogger(__name__)


def local_cpus(cfg: Config) -> int:
    """Logical CPUs for a local Ray: the workers' reservation plus every core again.

    Train workers reserve their CPUs for the whole run; with no logical CPUs left, the
    Ray Data tasks that decode and augment never get scheduled and training waits
    forever (seen with 2 workers on 2 cores). The extra logical CPUs oversubscribe the
    cores on purpose: augmentation runs while the workers wait on each other."""
    workers = cfg.scaling.max_workers * cfg.scaling.cpus_per_worker  # an elastic run: its most
    return math.ceil(workers) + (os.cpu_count() or 1)


def quiet_data_progress() -> None:
    """Ray Data logs a progress table per dataset per epoch; keep the run's own lines readable."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def ensure_ray(cfg: Config, num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS, else start a local one (idempotent) with
    ``num_cpus`` logical CPUs (default: ``local_cpus``)."""
    quiet_data_progress()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    num_cpus = num_cpus or local_cpus(cfg)
    # The dashboard stays on: Train's placement-group cleanup needs the State API it serves.
    # It listens on this machine only unless run.dashboard_host opens it on purpose.
    ray.init(
        num_cpus=num_cpus,
        dashboard_host=cfg.run.dashboard_host,
        # Ray Data's per-epoch "execution finished" lines, and Ray's own deprecation
        # warnings from inside its actors, would drown the progress lines.
        runtime_env={
            "env_vars": {
                "RAY_DATA_LOG_LEVEL": "WARNING",
                "PYTHONWARNINGS": "ignore::DeprecationWarning",
            }
        },
    )
    log.info("started a local Ray with %s logical CPUs", num_cpus)
