"""Experiment trackers: where each epoch's metrics go besides metrics.jsonl (``run.loggers``).

``tensorboard`` (the default) writes events into the run folder's ``tb/``. ``mlflow`` logs
to ``run.mlflow.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a ``file:`` store beside
the experiment folders (``<run.storage>/mlruns``). ``wandb`` logs online when
``WANDB_API_KEY`` is set, else offline into the run folder's ``wandb/`` (``wandb sync``
uploads it later). MLflow and W&B are optional extras (``pip install 'raycv[mlflow]'``).

Every tracker has the same verbs, called in three places:

- ``start``, in the driver before training: makes the tracker's run, or finds the one this
  run folder made before (its id is kept in ``trackers.json``: ``--resume`` continues
  it), and logs the resolved config;
- ``log_epoch``, where epochs are recorded (``MetricsRecorder``: the Train controller, or
  in-process with ``--local``): each epoch's numeric metrics, at step = epoch; ``close``
  after the last epoch lets go of what that process holds;
- ``finish``, in the driver after training: the run folder's plots, the best checkpoint's
  path, and the run's status.

A tracker that fails while training logs a warning and training goes on (metrics.jsonl
keeps every epoch); one that cannot start stops the run before training, in one line.
No secret reaches a tracker or the console: secret-like config values go as ``***``
(``raycv.redact``), API keys and a tracking server's credentials come from the environment
only, and a tracking URI is shown without its user part."""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import logging
import os
import re
import secrets
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from raycv import atomic, verbosity
from raycv import storage as remote
from raycv.redact import redact
from raycv.registry import Registry

if TYPE_CHECKING:
    from raycv.config import Config
    from raycv.runs import RunFolder

log = logging.getLogger(__name__)

STATE_FILE = "trackers.json"  # each tracker's run id, in the run folder
# MLflow's limits: values per log_batch call, and a param value's length.
_PARAMS_PER_BATCH = 100
_PARAM_LENGTH = 6000


@dataclass(frozen=True)
class Outcome:
    """How a run ended, for ``finish``."""

    status: str  # FINISHED or FAILED
    metric: str  # what "best" means (checkpoint.metric)
    best: dict[str, Any] | None = None  # the best epoch's metrics.jsonl row
    best_checkpoint: str | None = None  # where best/ is: a path, or a URI on object storage


class Tracker:
    """One experiment tracker. ``__init__(cfg, run)`` reads its settings and the run's saved
    state and must stay cheap (no import of the tracker's library): trackers are built in
    the driver and travel to the Train controller with the ``MetricsRecorder``."""

    extra: ClassVar[str | None] = None  # the pip extra that installs it (None: always there)
    module: ClassVar[str | None] = None  # what it imports

    def __init__(self, cfg: Config, run: RunFolder) -> None:
        pass

    @classmethod
    def check(cls, cfg: Config) -> None:
        """At config validation, before Ray starts: ValueError in one line if it cannot run."""
        if cls.module and importlib.util.find_spec(cls.module) is None:
            raise ValueError(
                f"run.loggers has {cls.name()}, which is not installed: "
                f"pip install 'raycv[{cls.extra}]'"
            )

    @classmethod
    def name(cls) -> str:
        return next(n for n in TRACKERS if TRACKERS.get(n) is cls)

    def start(self, run: RunFolder, kind: str) -> None:
        """Make or find this run's tracker run; ``kind``: train, finetune, trial."""

    def log_epoch(self, run: RunFolder, row: dict[str, Any]) -> None:
        """One metrics.jsonl row."""

    def close(self) -> None:
        """Let go of what this process holds for the run (after its last epoch)."""

    def finish(self, run: RunFolder, outcome: Outcome) -> None:
        """Plots, the best checkpoint's path, the status."""


TRACKERS: Registry[type[Tracker]] = Registry("logger")


# ------------------------------------------------------------------ what the stages call


def check(cfg: Config) -> None:
    """Config validation: every logger of ``run.loggers`` can run (installed, ...)."""
    for name in cfg.run.loggers:
        TRACKERS.get(name).check(cfg)


def open_all(cfg: Config, run: RunFolder) -> list[Tracker]:
    """The config's trackers for ``run``, with the ids its folder keeps."""
    return [TRACKERS.get(name)(cfg, run) for name in cfg.run.loggers]


def start(cfg: Config, run: RunFolder, kind: str) -> list[Tracker]:
    """The driver, before training: each tracker's run made (or found again) and the
    config logged. Raises RunFailedError in one line when one cannot start."""
    from raycv.errors import RunFailedError

    trackers = open_all(cfg, run)
    for name, tracker in zip(cfg.run.loggers, trackers):
        try:
            tracker.start(run, kind)
        except Exception as e:
            raise RunFailedError(
                f"{name} could not start: {_first_line(e)}; fix its settings (run.{name}.*, "
                f"the environment) or drop it from run.loggers"
            ) from e
    return trackers


def record(
    trackers: Sequence[Tracker], run: RunFolder, rows: list[dict[str, Any]], last: bool
) -> None:
    """Where epochs are recorded: ``rows`` logged by every tracker; ``last``: the run's
    last epoch. A failure is a warning (the first per tracker and process; debug after)."""
    for tracker in trackers:
        for row in rows:
            _safely(tracker, f"log epoch {row.get('epoch')}", tracker.log_epoch, run, row)
        if last:
            _safely(tracker, "close its run", tracker.close)


def finish(cfg: Config, run: RunFolder, outcome: Outcome) -> None:
    """The driver, after training (or after it failed): plots, best checkpoint, status."""
    for tracker in open_all(cfg, run):
        _safely(tracker, "finish its run", tracker.finish, run, outcome)


_warned: set[str] = set()


def _safely(tracker: Tracker, what: str, call, *args) -> None:
    try:
        call(*args)
    except Exception as e:
        name = tracker.name()
        level = logging.DEBUG if name in _warned else logging.WARNING
        _warned.add(name)
        log.log(
            level,
            "warning: %s could not %s (%s); the run goes on, metrics.jsonl has every epoch",
            name,
            what,
            _first_line(e),
        )


# ------------------------------------------------------------------------ shared helpers


def numeric(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers but its epoch (the step): no flags, lists or strings."""
    return {
        k: v
        for k, v in row.items()
        if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def params(cfg: Config) -> dict[str, str]:
    """The resolved config as flat ``section.key`` -> text, secrets as ``***``."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[re.sub(r"[^\w./ -]", "_", prefix)] = text[:_PARAM_LENGTH]

    walk("", redact(cfg.model_dump(mode="json")))
    return flat


def run_names(cfg: Config, run: RunFolder) -> tuple[str, str | None]:
    """(name, group): the run's path under its experiment folder, and for a run inside
    another (a pipeline's stage, a sweep's trial, a compress step) that one's name."""
    home = experiment_folder(cfg, run)
    if home is None:
        return run.path.name, None
    parts = Path(os.path.abspath(run.path)).relative_to(home).parts
    return "/".join(parts), parts[0] if len(parts) > 1 else None


def experiment_folder(cfg: Config, run: RunFolder) -> Path | None:
    """``<storage root>/<experiment>`` holding ``run``. A sweep's trials run in folders of
    their own (Ray Tune changes their working directory): there, a relative run.storage
    would lead elsewhere, so the run's own nearest folder named for the experiment wins."""
    from raycv.runs import storage_root

    path = Path(os.path.abspath(run.path))
    home = storage_root(cfg.run.storage) / cfg.experiment
    if path.is_relative_to(home):
        return home
    return next((p for p in path.parents if p.name == cfg.experiment), None)


def shown_uri(uri: str) -> str:
    """``uri`` fit for the console and the logs: no user or password, no query."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query=""))


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return re.sub(r"//[^/@\s]+@", "//", text)  # a URI's user and password, wherever they are


def load_state(run: RunFolder) -> dict[str, Any]:
    path = run.path / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def save_state(run: RunFolder, name: str, state: dict[str, Any]) -> None:
    atomic.write_text(
        run.path / STATE_FILE, json.dumps({**load_state(run), name: state}, indent=2) + "\n"
    )


def _quiet(library: str) -> None:
    """A tracker library's own logger: its INFO lines only with --verbose."""
    logging.getLogger(library).setLevel(logging.INFO if verbosity.verbose() else logging.WARNING)


# ------------------------------------------------------------------------- the trackers


_tb_writers: dict[str, Any] = {}  # per process, by events folder


@TRACKERS.register("tensorboard")
class TensorBoard(Tracker):
    """Events in the run folder's tb/ (``tensorboard --logdir runs``): one event file per
    process that records the run (a resumed run adds one), flushed after every epoch so
    that a run that stops early keeps what it logged."""

    def __init__(self, cfg: Config, run: RunFolder) -> None:
        self.folder = str(run.tensorboard)

    def log_epoch(self, run: RunFolder, row: dict[str, Any]) -> None:
        writer = _tb_writers.get(self.folder)
        if writer is None:
            from tensorboardX import SummaryWriter

            writer = _tb_writers[self.folder] = SummaryWriter(self.folder)
        for key, value in numeric(row).items():
            writer.add_scalar(key, value, row["epoch"])
        writer.flush()

    def close(self) -> None:
        writer = _tb_writers.pop(self.folder, None)
        if writer is not None:
            writer.close()


_mlflow_clients: dict[str, Any] = {}  # per process, by tracking URI


@TRACKERS.register("mlflow")
class MLflow(Tracker):
    """An MLflow run per run folder: the config as params, each epoch's metrics at step =
    epoch, tags for the run folder and best checkpoint, plots/*.png as artifacts."""

    extra = "mlflow"
    module = "mlflow"

    def __init__(self, cfg: Config, run: RunFolder) -> None:
        self.uri = tracking_uri(cfg, run)
        self.experiment = cfg.run.mlflow.experiment or cfg.experiment
        self.name, self.group = run_names(cfg, run)
        self.run_id: str | None = load_state(run).get("mlflow", {}).get("run_id")
        self.params = params(cfg)
        self.tags = {"raycv.run_folder": run.where, "raycv.task": cfg.task}
        if self.group:
            self.tags["raycv.group"] = self.group

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        given = cfg.run.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not given and remote.is_uri(cfg.run.storage):
            raise ValueError(
                f"run.loggers has mlflow and run.storage={cfg.run.storage} is object "
                "storage, where MLflow keeps no file: store: set run.mlflow.tracking_uri "
                "(or MLFLOW_TRACKING_URI) to an MLflow server or database"
            )

    def _client(self):
        if self.uri not in _mlflow_clients:
            _quiet("mlflow")
            if urlsplit(self.uri).scheme in ("", "file"):
                # MLflow 3.13+ refuses its file store unless asked: raycv asks for it.
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            # raycv says where the run is itself (without credentials).
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
            from mlflow.tracking import MlflowClient

            _mlflow_clients[self.uri] = MlflowClient(tracking_uri=self.uri)
        return _mlflow_clients[self.uri]

    def start(self, run: RunFolder, kind: str) -> None:
        from mlflow.entities import RunStatus

        client = self._client()
        where = shown_uri(self.uri)
        if self.run_id and _mlflow_run(client, self.run_id) is not None:
            client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            self._log_params(client)
            log.info("MLflow: continuing run %s (%s) at %s", self.name, self.run_id, where)
            return
        experiment_id = _mlflow_experiment(client, self.experiment)
        made = client.create_run(
            experiment_id, run_name=self.name, tags={**self.tags, "raycv.kind": kind}
        )
        self.run_id = made.info.run_id
        save_state(run, "mlflow", {"run_id": self.run_id, "experiment_id": experiment_id})
        self._log_params(client)
        from raycv.runs import read_metrics

        for row in read_metrics(run.metrics):  # epochs run before mlflow was turned on
            self.log_epoch(run, row)
        log.info(
            "MLflow: run %s (%s) in experiment %s at %s",
            self.name,
            self.run_id,
            self.experiment,
            where,
        )

    def _log_params(self, client) -> None:
        """The config as params; keys a --resume changed (params never change) as tags
        ``resumed.KEY`` with their new value."""
        from mlflow.entities import Param, RunTag

        have = client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in self.params.items() if k not in have]
        changed = [RunTag(f"resumed.{k}", v) for k, v in self.params.items() if have.get(k, v) != v]
        for i in range(0, max(len(new), len(changed)), _PARAMS_PER_BATCH):
            part = slice(i, i + _PARAMS_PER_BATCH)
            client.log_batch(self.run_id, params=new[part], tags=changed[part])

    def log_epoch(self, run: RunFolder, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            raise RuntimeError("no MLflow run was started for this run folder")
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, row["epoch"]) for k, v in numeric(row).items()]
        self._client().log_batch(self.run_id, metrics=metrics)

    def finish(self, run: RunFolder, outcome: Outcome) -> None:
        from mlflow.entities import Metric, RunTag

        if self.run_id is None:
            return
        client = self._client()
        for plot in sorted(run.plots.glob("*.png")):
            client.log_artifact(self.run_id, str(plot), "plots")
        tags, metrics = [], []
        if outcome.best_checkpoint:
            tags.append(RunTag("best_checkpoint", outcome.best_checkpoint))
        best = outcome.best or {}
        if isinstance(best.get(outcome.metric), (int, float)):
            tags.append(RunTag("best_epoch", str(best["epoch"])))
            value = best[outcome.metric]
            now = int(time.time() * 1000)
            metrics.append(Metric(f"best_{outcome.metric}", value, now, best["epoch"]))
        client.log_batch(self.run_id, metrics=metrics, tags=tags)
        client.set_terminated(self.run_id, outcome.status)


def tracking_uri(cfg: Config, run: RunFolder) -> str:
    """run.mlflow.tracking_uri, else MLFLOW_TRACKING_URI, else the file: store
    ``mlruns`` beside the experiment folders."""
    given = cfg.run.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if given:
        return absolute_store(given)
    home = experiment_folder(cfg, run)
    if home is None:
        from raycv.runs import storage_root

        return (storage_root(cfg.run.storage) / "mlruns").as_uri()
    return (home.parent / "mlruns").as_uri()


def absolute_store(uri: str) -> str:
    """A local path or relative ``file:`` URI made absolute (a run's processes start in
    other folders, a sweep's trials in their own); any other URI as it is."""
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return uri if parts.path.startswith("/") else Path(parts.path).resolve().as_uri()
    if len(parts.scheme) > 1 or uri.startswith("databricks"):  # a server, a database, ...
        return uri
    return Path(os.path.expanduser(uri)).resolve().as_uri()  # a plain path


def _mlflow_run(client, run_id: str):
    """The run, or None when the store has no such run (or it was deleted)."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_run(run_id)
    except MlflowException:
        return None
    return found if found.info.lifecycle_stage == "active" else None


def _mlflow_experiment(client, name: str) -> str:
    """The experiment's id, made if missing (by whichever sweep trial gets there first)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # made meanwhile by a concurrent trial
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage != "active":
        raise ValueError(
            f"the MLflow experiment {name!r} is deleted; restore it or set run.mlflow.experiment"
        )
    return found.experiment_id


_wandb_runs: dict[str, Any] = {}  # per process, by W&B run id: the runs still open here


@TRACKERS.register("wandb")
class WandB(Tracker):
    """A W&B run per run folder: the config, each epoch's metrics at step = epoch, the best
    checkpoint in the summary, plots/*.png among its files. Offline, its files land in the
    run folder's wandb/; each process that logs to it adds an offline-run-* folder there."""

    extra = "wandb"
    module = "wandb"

    def __init__(self, cfg: Config, run: RunFolder) -> None:
        settings = cfg.run.wandb
        self.project = settings.project or cfg.experiment
        self.mode = wandb_mode(settings.mode)
        self.name, self.group = run_names(cfg, run)
        saved = load_state(run).get("wandb", {})
        self.id: str | None = saved.get("id")
        self.kind: str | None = saved.get("kind")  # the run's job type
        self.config = redact(cfg.model_dump(mode="json"))

    def start(self, run: RunFolder, kind: str) -> None:
        self.kind = kind
        if self.mode == "disabled":
            return
        files = run.path / "wandb"
        where = (
            f"; upload it with: wandb sync {files}/offline-run-*" if self.mode == "offline" else ""
        )
        if self.id is not None:
            log.info(
                "W&B: continuing %s run %s in project %s%s",
                self.mode,
                self.id,
                self.project,
                where,
            )
            return
        alphabet = string.ascii_lowercase + string.digits
        self.id = "".join(secrets.choice(alphabet) for _ in range(8))
        save_state(run, "wandb", {"id": self.id, "project": self.project, "kind": kind})
        log.info("W&B: %s run %s in project %s%s", self.mode, self.id, self.project, where)
        from raycv.runs import read_metrics

        earlier = read_metrics(run.metrics)  # epochs run before wandb was turned on
        if earlier:
            for row in earlier:
                self.log_epoch(run, row)
            self.close()

    def _run(self, run: RunFolder):
        """This process's open W&B run, started (or resumed) if there is none."""
        if self.id in _wandb_runs:
            return _wandb_runs[self.id]
        _quiet("wandb")
        if not verbosity.verbose():
            # Read once per process by wandb's own setup: its banners and notices (offline
            # mode, the sync command, files linked) go to its debug.log instead.
            os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        opened = wandb.init(
            project=self.project,
            id=self.id,
            name=self.name,
            group=self.group,
            job_type=self.kind,
            dir=str(run.path),
            mode=self.mode,
            resume="allow",
            config=self.config,
            allow_val_change=True,  # a --resume may have changed train.epochs
            settings=wandb.Settings(
                silent=not verbosity.verbose(),
                console="off",  # the controller's own output stays Ray's
                reinit="create_new",  # a --local pipeline has one run per stage in one process
                save_code=False,
            ),
        )
        _wandb_runs[self.id] = opened
        # Last registered, so run first at exit: before the hook of W&B's (new) service.
        atexit.unregister(_wandb_teardown)
        atexit.register(_wandb_teardown)
        return opened

    def log_epoch(self, run: RunFolder, row: dict[str, Any]) -> None:
        if self.mode == "disabled":
            return
        if self.id is None:
            raise RuntimeError("no W&B run was started for this run folder")
        self._run(run).log({**numeric(row), "epoch": row["epoch"]}, step=row["epoch"])

    def close(self) -> None:
        opened = _wandb_runs.pop(self.id, None) if self.id else None
        if opened is None:
            return
        opened.finish()
        if not _wandb_runs:  # nothing else open here: the service's process can go
            _wandb_teardown()

    def finish(self, run: RunFolder, outcome: Outcome) -> None:
        if self.mode == "disabled" or self.id is None:
            return
        opened = self._run(run)
        for plot in sorted(run.plots.glob("*.png")):  # among the run's files, as plots/NAME
            opened.save(str(plot), base_path=str(run.path), policy="now")
        if outcome.best_checkpoint:
            opened.summary["best_checkpoint"] = outcome.best_checkpoint
        best = outcome.best or {}
        if isinstance(best.get(outcome.metric), (int, float)):
            opened.summary["best_epoch"] = best["epoch"]
            opened.summary[f"best_{outcome.metric}"] = best[outcome.metric]
        _wandb_runs.pop(self.id, None)
        opened.finish(exit_code=0 if outcome.status == "FINISHED" else 1)


def _wandb_teardown() -> None:
    """Stop this process's W&B service, quietly: at a Train controller's exit its service
    process may be gone already, and W&B's own exit hook would print a traceback."""
    import wandb

    with contextlib.suppress(Exception):
        wandb.teardown()


def wandb_mode(mode: str) -> str:
    """run.wandb.mode; auto: online when WANDB_API_KEY is set, else offline."""
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"
