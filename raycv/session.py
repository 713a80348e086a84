"""Connecting to Ray: an existing cluster when there is one, else a local one sized so
that Ray Data's tasks still get CPUs next to the Train workers."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import tempfile
from collections.abc import Iterator

import psutil
import ray
import ray.data

from raycv import verbosity
from raycv.config import Config, ScalingConfig

log = logging.getLogger(__name__)

# Ray Train's controller takes each worker's report off a one-slot queue every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s), and a worker whose previous report
# is still there waits: an epoch shorter than that took 2 s whatever its work (the compress
# stage's 40 recovery epochs of 120 images, fine-tuning; docs/benchmarks.md). A user's own
# setting wins.
POLL_ENV, POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"


def train_env() -> dict[str, str]:
    """The Ray Train settings raycv runs with: Train propagates them from the process that
    calls ``fit`` to its controller (and Tune's trials are such processes)."""
    return {POLL_ENV: os.environ.get(POLL_ENV, POLL_S)}


def local_cpus(cfg: Config) -> int:
    """Logical CPUs for a local Ray: the workers' reservation plus every core again.

    Train workers reserve their CPUs for the whole run; with no logical CPUs left, the
    Ray Data tasks that decode and augment never get scheduled and training waits
    forever (seen with 2 workers on 2 cores). The extra logical CPUs oversubscribe the
    cores on purpose: augmentation runs while the workers wait on each other."""
    return math.ceil(cfg.scaling.max_cpus) + (os.cpu_count() or 1)


def physical_cores() -> int:
    """The cores this process may run on, a core's hyper-threads counted once: the smaller
    of the machine's physical cores and the logical CPUs its affinity allows (a container
    pinned to some of them)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return min(cores, usable or cores)


def oversubscription(scaling: ScalingConfig, cores: int) -> str | None:
    """What is wrong when the training workers alone reserve more CPUs than there are
    ``cores``: Ray counts logical CPUs (a local Ray gets extra for Ray Data, on purpose),
    so such a run starts and then its workers' steps share the cores."""
    wanted = scaling.max_cpus
    if wanted <= cores:
        return None
    return (
        f"the workers take {wanted:g} CPUs ({scaling.max_workers} x {scaling.cpus_per_worker:g})"
        f" on {cores} physical cores, {wanted / cores:.1f}x oversubscribed before Ray Data's "
        f"tasks: their steps will share cores; give them {cores} CPUs at most in all "
        "(scaling.num_workers x scaling.cpus_per_worker)"
    )


def quiet_data_progress() -> None:
    """Ray Data logs a progress table per dataset per epoch; keep the run's own lines readable."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(max(logging.WARNING, verbosity.ray_level()))


def ensure_ray(cfg: Config, num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS, else start a local one (idempotent) with
    ``num_cpus`` logical CPUs (default: ``local_cpus``)."""
    quiet_data_progress()
    os.environ.update(train_env())  # for this process's own fits, on any cluster
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=verbosity.ray_level())
        return
    num_cpus = num_cpus or local_cpus(cfg)
    dashboard = start_local(num_cpus, cfg.run.dashboard_host)
    cores = physical_cores()
    log.info(
        "started a local Ray with %s logical CPUs on %d physical cores; dashboard: %s",
        num_cpus,
        cores,
        dashboard,
    )
    warning = oversubscription(cfg.scaling, cores)
    if warning:
        log.warning("warning: %s", warning)
    verbosity.warn_if_disk_full(os.environ.get("RAY_TMPDIR", tempfile.gettempdir()))


def start_local(num_cpus: int, dashboard_host: str, **init_args) -> str:
    """Start a local Ray whose processes can find their own cluster.

    Train's placement-group cleaner asks the State API with no address. A Ray started by
    ``ray.init`` leaves no address file, so Ray then looks for running GCS processes and
    gives up when it finds two (another local Ray on this machine): the placement groups
    of trials that ASHA stopped are never removed and the sweep waits forever for CPUs.
    The dashboard, which serves the State API, therefore gets a port picked here, and
    every worker is told its URL, which is returned."""
    port = free_port()
    reach = "127.0.0.1" if dashboard_host in ("0.0.0.0", "::", "localhost") else dashboard_host
    # The dashboard stays on: Train's placement-group cleanup needs the State API it serves.
    # It listens on this machine only unless run.dashboard_host opens it on purpose.
    url = f"http://{reach}:{port}"
    # Ray's processes inherit the environment of the raylet, a child of this process: the
    # variables are set while Ray starts, not passed as a job runtime_env, whose workers Ray
    # starts through its runtime-env agent and never takes from the ones it prestarts (the
    # first Ray Data execution took 1.1-1.4 s longer with one, docs/benchmarks.md).
    with environment({"RAY_API_SERVER_ADDRESS": url, **verbosity.worker_env(), **train_env()}):
        ray.init(
            num_cpus=num_cpus,
            dashboard_host=dashboard_host,
            dashboard_port=port,
            logging_level=verbosity.ray_level(),
            **init_args,
        )
    return url


@contextlib.contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    """``variables`` set in this process's environment, the earlier values back after."""
    saved = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
