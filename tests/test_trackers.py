"""Experiment trackers (run.loggers): MLflow into a local file: store and W&B offline, read
back after a real 2-epoch run and after its --resume to 3 epochs (both through the CLI, as
a user runs them, so that what they print is checked too); and what is refused before Ray
starts."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from raycv import trackers
from raycv.cli import main
from raycv.config import RunConfig, from_dict
from raycv.runs import RunFolder

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
TINY = [
    "data.shapes.num_images=96",
    "train.batch_size=16",
    "model.image_size=32",
    "scaling.num_workers=1",
]
# W&B is an extra the dev install leaves out (see pyproject.toml): its tests run where it is.
HAS_WANDB = importlib.util.find_spec("wandb") is not None
LOGGERS = ["tensorboard", "mlflow", *(["wandb"] if HAS_WANDB else [])]
ALL = f"run.loggers=[{','.join(LOGGERS)}]"
needs_wandb = pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (raycv[wandb])")


# ------------------------------------------------------------- refused before Ray starts


def test_a_logger_asked_for_and_not_installed_is_one_line_naming_its_extra(
    monkeypatch, tmp_path, capsys
):
    # The real check (importlib finds no such module), pointed at a module that is missing:
    # the dev install has both extras.
    monkeypatch.setattr(trackers.MLflow, "module", "raycv_no_such_tracker_module")
    storage = tmp_path / "runs"
    code = main(["train", str(SMOKE), "run.loggers=[tensorboard,mlflow]", f"run.storage={storage}"])
    err = capsys.readouterr().err
    assert code == 2
    assert (
        err
        == "error: run.loggers has mlflow, which is not installed: pip install 'raycv[mlflow]'\n"
    )
    assert not storage.exists()  # refused before any run folder (or Ray) exists


@pytest.mark.skipif(HAS_WANDB, reason="wandb is installed here")
def test_wandb_not_installed_is_one_line_naming_its_extra(tmp_path, capsys):
    storage = tmp_path / "runs"
    code = main(["train", str(SMOKE), "run.loggers=[wandb]", f"run.storage={storage}"])
    assert code == 2
    assert capsys.readouterr().err == (
        "error: run.loggers has wandb, which is not installed: pip install 'raycv[wandb]'\n"
    )
    assert not storage.exists()


def test_the_loggers_named_in_the_config_are_the_registered_ones():
    (item,) = typing.get_args(RunConfig.model_fields["loggers"].annotation)
    assert sorted(typing.get_args(item)) == trackers.TRACKERS.names()
    assert RunConfig().loggers == ["tensorboard"]  # TensorBoard as before, by default


def test_a_tracking_uri_with_a_credential_is_refused_without_showing_it():
    with pytest.raises(ValueError) as info:
        from_dict({"run": {"mlflow": {"tracking_uri": "https://bob:hunter2@mlflow.example"}}})
    message = str(info.value)
    assert "hunter2" not in message and "bob" not in message and "\n" not in message
    assert message.startswith("run.mlflow: the tracking URI carries a credential")
    assert "MLFLOW_TRACKING_PASSWORD" in message


def test_a_logger_listed_twice_is_refused():
    with pytest.raises(ValueError, match=r"run.loggers: lists mlflow more than once"):
        from_dict({"run": {"loggers": ["mlflow", "tensorboard", "mlflow"]}})


def test_object_storage_needs_a_tracking_server(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = {"run": {"loggers": ["mlflow"], "storage": "s3://bucket/runs"}}
    with pytest.raises(ValueError, match=r"set run.mlflow.tracking_uri \(or MLFLOW_TRACKING_URI"):
        from_dict(raw)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert from_dict(raw).run.loggers == ["mlflow"]


def test_where_mlflow_logs(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = from_dict({"experiment": "e", "run": {"storage": str(tmp_path)}})
    run = RunFolder(tmp_path / "e" / "pipeline-1" / "finetune")
    # A file: store beside the experiment folders, found from the run's own folder.
    assert trackers.tracking_uri(cfg, run) == (tmp_path / "mlruns").as_uri()
    assert trackers.run_names(cfg, run) == ("pipeline-1/finetune", "pipeline-1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert trackers.tracking_uri(cfg, run) == "http://127.0.0.1:5000"
    given = from_dict({"run": {"mlflow": {"tracking_uri": "file:relative/store"}}})
    assert given.run.mlflow.tracking_uri == (Path.cwd() / "relative" / "store").as_uri()
    assert trackers.shown_uri("https://u:p@host:5000/x?token=t") == "https://host:5000/x"


def test_wandb_goes_online_only_with_an_api_key(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert trackers.wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert trackers.wandb_mode("auto") == "online"
    assert trackers.wandb_mode("offline") == "offline"


def test_params_are_the_resolved_config_flat_with_secrets_hidden():
    cfg = from_dict({"pipeline": {"pretrain": {"storage_token": "abc123"}}})
    params = trackers.params(cfg)
    assert params["model.name"] == "resnet18" and params["train.epochs"] == "10"
    assert params["checkpoint.metric"] == "val_acc"  # resolved: the task's metric
    assert params["augment.scale"] == "[0.35, 1.0]"
    assert params["pipeline.pretrain.storage_token"] == "***"
    assert "abc123" not in json.dumps(params)


# ------------------------------------------------------------------- a real run, resumed


@contextlib.contextmanager
def _env(ray_env, home: Path):
    """A quiet raycv process of its own: no cluster to join, no tracker settings of this
    machine's (W&B offline, whatever keys are set here), W&B's own folders in ``home``."""
    with ray_env() as env:
        unset = ("RAY_ADDRESS", "RAY_DEDUP_LOGS_SKIP_REGEX", "RAYCV_LOG_LEVEL")
        env = {
            k: v
            for k, v in env.items()
            if k not in unset and not k.startswith(("WANDB_", "MLFLOW_"))
        }
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            env[name] = str(home / name.lower())
        yield env


def _raycv(env: dict, cwd: Path, *args: str) -> tuple[Path, str]:
    """(the run folder, all it printed) of a raycv command that must succeed."""
    done = subprocess.run(
        [sys.executable, "-m", "raycv", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-4000:]
    return Path(done.stdout.strip().splitlines()[-1]), printed


def _mlflow_store(uri: str) -> dict:
    """What the MLflow store holds, read back with MlflowClient."""
    from mlflow.tracking import MlflowClient

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name("smoke")
        runs = client.search_runs([experiment.experiment_id])
        found = {"runs": len(runs)}
        run = runs[0]
        found |= {
            "id": run.info.run_id,
            "status": run.info.status,
            "params": run.data.params,
            "tags": run.data.tags,
            "history": {
                key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
                for key in ("val_acc", "train_loss", "best_val_acc")
            },
            "artifacts": [a.path for a in client.list_artifacts(run.info.run_id, "plots")],
        }
    return found


def _wandb_records(path: Path):
    """The records of a W&B transaction log (``run-ID.wandb``): a header, then LevelDB-log
    style chunks (crc, length, type) in 32 KiB blocks, each record a protobuf."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or a record's last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _wandb_run(folder: Path, run_id: str) -> dict:
    """What the run folder's offline W&B files hold for ``run_id``, over every process
    that logged to it (each adds an offline-run-* folder)."""
    logs = sorted((folder / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    found: dict = {"logs": len(logs), "epochs": [], "config": {}, "summary": {}, "files": []}
    for path in logs:
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
                found["epochs"].append(int(items["epoch"]))
            elif kind == "run":
                found["config"] |= {
                    u.key: json.loads(u.value_json) for u in record.run.config.update
                }
            elif kind == "summary":
                found["summary"] |= {
                    u.key: json.loads(u.value_json) for u in record.summary.update if u.key
                }
            elif kind == "files":
                found["files"] += [f.path for f in record.files.files]
    return found


def _tb_events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Each event file in ``folder`` (by name) with its val_acc scalars as (step, value):
    TFRecords (length, its crc, an Event protobuf, its crc), read with tensorboardX's proto."""
    from tensorboardX.proto import event_pb2

    found = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos, scalars = path.read_bytes(), 0, []
        while pos < len(data):
            length = int.from_bytes(data[pos : pos + 8], "little")
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 16 + length
            values = event.summary.value
            scalars += [(event.step, v.simple_value) for v in values if v.tag == "val_acc"]
        found[path.name] = scalars
    return found


def _snapshot(run: Path, uri: str, printed: str) -> dict:
    state = json.loads((run / "trackers.json").read_text())
    return {
        "printed": printed,
        "state": state,
        "tensorboard": _tb_events(run / "tb"),
        "best": json.loads((run / "manifest.json").read_text())["metrics"]["best"],
        "mlflow": _mlflow_store(uri),
        "wandb": _wandb_run(run, state["wandb"]["id"]) if HAS_WANDB else None,
    }


@pytest.fixture(scope="module")
def tracked(ray_env, tmp_path_factory):
    """One 2-epoch run with all three loggers, then the same run resumed to 3 epochs: what
    the trackers held after each (snapshots, so that the tests need no order)."""
    home = tmp_path_factory.mktemp("trackers")
    uri = (home / "mlruns").as_uri()
    args = [*TINY, f"run.storage={home / 'runs'}", ALL, f"run.mlflow.tracking_uri={uri}"]
    with _env(ray_env, home) as env:
        run, printed = _raycv(env, home, "train", str(SMOKE), *args)
        first = _snapshot(run, uri, printed)
        again, printed = _raycv(env, home, "train", str(SMOKE), *args, "--resume", "train.epochs=3")
        assert again == run
        resumed = _snapshot(run, uri, printed)
    return {"run": run, "uri": uri, "first": first, "resumed": resumed}


@pytest.mark.slow
def test_an_mlflow_file_store_holds_the_runs_params_and_one_metric_row_per_epoch(tracked):
    store = tracked["first"]["mlflow"]
    assert store["runs"] == 1 and store["status"] == "FINISHED"
    params = store["params"]
    assert params["model.name"] == "resnet18" and params["train.epochs"] == "2"
    assert params["data.shapes.num_images"] == "96" and params["experiment"] == "smoke"
    for key in ("val_acc", "train_loss"):
        assert [step for step, _ in store["history"][key]] == [1, 2], key
    rows = [
        json.loads(line) for line in (tracked["run"] / "metrics.jsonl").read_text().splitlines()
    ]
    assert [value for _, value in store["history"]["val_acc"]] == [r["val_acc"] for r in rows[:2]]


@pytest.mark.slow
def test_tensorboard_writes_one_event_file_per_process_with_every_epoch(tracked):
    rows = [
        json.loads(line) for line in (tracked["run"] / "metrics.jsonl").read_text().splitlines()
    ]
    first, resumed = tracked["first"]["tensorboard"], tracked["resumed"]["tensorboard"]
    assert len(first) == 1  # not a file per epoch
    (scalars,) = first.values()
    assert scalars == [(r["epoch"], pytest.approx(r["val_acc"])) for r in rows[:2]]
    assert len(resumed) == 2  # the resumed run's process adds its own
    assert sorted(step for file in resumed.values() for step, _ in file) == [1, 2, 3]


@pytest.mark.slow
def test_the_mlflow_run_names_the_best_checkpoint_and_holds_the_plots(tracked):
    store, run = tracked["first"]["mlflow"], tracked["run"]
    tags = store["tags"]
    assert tags["best_checkpoint"] == str(run / "best")
    assert (run / "best" / "checkpoint.pt").is_file()
    assert tags["raycv.run_folder"] == str(run) and tags["raycv.kind"] == "train"
    assert tags["mlflow.runName"] == run.name
    best = tracked["first"]["best"]  # the manifest after 2 epochs (the resume rewrites it)
    assert store["history"]["best_val_acc"] == [(best["epoch"], best["val_acc"])]
    assert store["artifacts"] == ["plots/curves.png"]
    assert tracked["first"]["state"]["mlflow"]["run_id"] == store["id"]


@pytest.mark.slow
@needs_wandb
def test_wandb_offline_writes_its_run_into_the_run_folder_with_each_epoch(tracked):
    wandb = tracked["first"]["wandb"]
    assert wandb["logs"] >= 1  # under <run>/wandb/offline-run-*-<id>/
    assert sorted(wandb["epochs"]) == [1, 2]
    assert wandb["config"]["model"]["name"] == "resnet18"
    assert wandb["config"]["train"]["epochs"] == 2
    assert wandb["summary"]["best_checkpoint"] == str(tracked["run"] / "best")
    assert "plots/curves.png" in wandb["files"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("which", "said"),
    [
        ("first", ("MLflow: run ", "W&B: offline run ")),
        ("resumed", ("MLflow: continuing run ", "W&B: continuing offline run ")),
    ],
)
def test_a_quiet_run_prints_one_line_per_tracker_and_none_of_theirs(
    tracked, ray_noise, which, said
):
    printed = tracked[which]["printed"]
    assert not ray_noise(printed), "\n".join(ray_noise(printed))
    assert "Traceback" not in printed, printed[-3000:]
    lines = printed.splitlines()
    theirs = [line for line in lines if "wandb" in line.lower() or "mlflow" in line.lower()]
    said = said[: len(LOGGERS) - 1]  # a line for MLflow, and for W&B where it is installed
    ours = [line for line in theirs if line.startswith(said)]
    assert len(ours) == len(said) and theirs == ours, "\n".join(theirs)
    if HAS_WANDB:
        assert f"upload it with: wandb sync {tracked['run']}/wandb/offline-run-*" in ours[1]


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_tracker_runs_with_epoch_3_only(tracked):
    first, resumed = tracked["first"], tracked["resumed"]
    assert resumed["state"] == first["state"]  # the same MLflow run and W&B run ids
    store = resumed["mlflow"]
    assert store["runs"] == 1 and store["id"] == first["mlflow"]["id"]
    for key in ("val_acc", "train_loss"):
        assert [step for step, _ in store["history"][key]] == [1, 2, 3], key
        assert store["history"][key][:2] == first["mlflow"]["history"][key]  # not relogged
    assert store["status"] == "FINISHED"
    # Params never change in MLflow: the new train.epochs is a tag.
    assert store["params"]["train.epochs"] == "2" and store["tags"]["resumed.train.epochs"] == "3"
    if HAS_WANDB:
        wandb = resumed["wandb"]
        assert sorted(wandb["epochs"]) == [1, 2, 3] and wandb["logs"] > first["wandb"]["logs"]
