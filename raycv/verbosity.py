"""How much a raycv command prints. Its own lines (the run folder, progress, summaries,
errors) always; Ray's start-up warnings and internal notices (token authentication, "Progress
bars disabled", deprecations from inside its actors, its C++ core's notices) only with
``--verbose`` or ``RAYCV_LOG_LEVEL=debug``.

The level travels in the environment variable ``RAYCV_LOG_LEVEL``: the command sets it, a local
Ray's processes inherit it, and a cluster's workers get it through the runtime environment, so
every process of a run gives the same answer."""

from __future__ import annotations

import logging
import os
import shutil
import sys

ENV = "RAYCV_LOG_LEVEL"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
LEVELS["error"] = logging.ERROR
# Ray's raylet warns when its disk passes this share (local_fs_capacity_threshold); quiet
# runs hide the raylet's lines, so raycv says it itself.
DISK_FULL = 0.95
# Lines of Ray's C++ core that its workers forward to the driver and that no user acts on:
# info and warning lines, and the error-level notice about the constructor arguments of Train's
# own PreemptionWatcher actor (ray-project/ray#53727). Fatal and other error lines still show.
# Also the raylet's notice (a WARNING line) that a node started more Python workers than it
# expects at once: Train, Tune and Ray Data start many on a small machine, by design.
# And the raylet's disk-full error, repeated every 10 s: raycv says it once (warn_if_disk_full).
# And Train's placement-group cleaner, which loses the controller that Ctrl-C stopped.
# Setting RAY_BACKEND_LOG_LEVEL instead makes every process print a line saying it did.
CORE_NOTICES = "|".join(
    (
        r"\d [IW] \d+ \d+\] \w+\.cc:\d+: ",
        r"'PreemptionWatcher'.*max_restarts",
        r"PYTHON worker processes have been started on node",
        r"file_system_monitor\.cc:\d+: .* is over \d+% full",
        r"Failed to query Ray Train Controller actor state",
    )
)

# How the driver draws a worker's progress bar. Ray's driver side makes the tqdm (with
# unit_scale, so "9.00/40.0"); tqdm's TQDM_* variables set what Ray does not pass. The state
# arrives in bursts through the worker's log, so the rate between two arrivals means nothing:
# no rate on the bar (its text carries img/s) and the time left from the average (smoothing 0).
BAR_STYLE = {
    "TQDM_BAR_FORMAT": "{desc} {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} steps "
    "[{elapsed}<{remaining}]",
    "TQDM_SMOOTHING": "0",
}

log = logging.getLogger(__name__)


def level() -> int:
    """raycv's log level from ``RAYCV_LOG_LEVEL`` (default info); a bad value is a
    ValueError that names the good ones."""
    name = os.environ.get(ENV, "info").strip().lower()
    if name not in LEVELS:
        raise ValueError(f"{ENV}={name!r} is not a level; use one of {', '.join(LEVELS)}")
    return LEVELS[name]


def verbose() -> bool:
    """True when Ray's own output is wanted as Ray prints it."""
    return level() <= logging.DEBUG


def configure(verbose_flag: bool) -> None:
    """Set up this process's logging for a command; ``--verbose`` means debug."""
    if verbose_flag:
        os.environ[ENV] = "debug"
    ours = level()
    if not verbose():
        # Read when Ray is imported (its log deduplicator), which the CLI has not done yet;
        # a user's own regex wins.
        os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", CORE_NOTICES)
        # Tune's own experiment banner and paths (raycv's trial table says what matters):
        # without its new output engine, Tune at verbose=0 prints nothing.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if not sys.stdout.isatty():  # a file or a pipe: Ray's worker prefixes without colour codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if sys.stderr.isatty():  # the bars this driver draws for its workers (raycv.progress)
        for name, value in BAR_STYLE.items():
            os.environ.setdefault(name, value)
    # Other libraries (the ONNX exporter's passes, ...) at WARNING, their INFO when verbose.
    others = logging.INFO if verbose() else max(ours, logging.WARNING)
    logging.basicConfig(level=others, format="%(message)s")
    logging.getLogger("raycv").setLevel(ours)
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(ray_level())


def ray_level() -> int:
    """The level of Ray's Python loggers in the driver (ray.init's ``logging_level``)."""
    return logging.INFO if verbose() else logging.ERROR


def worker_env() -> dict[str, str]:
    """Environment for Ray's worker processes (a runtime environment's ``env_vars``)."""
    env = {ENV: os.environ.get(ENV, "info")}
    if verbose():
        return env | {"RAY_DATA_LOG_LEVEL": "INFO"}
    # Ray Data's notices ("execution finished", "Progress bars disabled") and the deprecation
    # warnings Ray's own actors raise would drown the progress lines.
    return env | {
        "RAY_DATA_LOG_LEVEL": "ERROR",
        "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
    }


def warn_if_disk_full(path: str) -> None:
    """One line when the disk under Ray's session folder is nearly full: Ray then fails to
    spill objects, and its own warning is hidden in quiet runs."""
    usage = shutil.disk_usage(path)
    if usage.used / usage.total > DISK_FULL:
        log.warning(
            "warning: the disk under %s is %.0f%% full (%.1f GB free): Ray fails to create "
            "objects once it must spill; free space or set RAY_TMPDIR to a larger disk",
            path,
            100 * usage.used / usage.total,
            usage.free / 1e9,
        )
