"""run.storage on object storage: a run trains against a real S3 server on localhost (moto's),
is killed, and resumes from what the bucket holds alone."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from raycv import checkpoint
from raycv import storage as remote
from raycv.config import ConfigError, validate
from raycv.doctor import run_doctor
from raycv.runs import MetricsRecorder, RunFolder, read_metrics
from raycv.sweep.run import run_tune
from raycv.train import run_train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BUCKET = "raycv-test"
# Dummy credentials: moto accepts any; a real key never belongs in a test or a config.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no wait on a metadata server that is not there
}


@pytest.fixture(scope="module")
def s3_storage():
    """``(run.storage URI, its pyarrow file system, the path in it)`` on a moto S3 server
    with one empty bucket; the credentials are in os.environ for subprocesses too."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    with pytest.MonkeyPatch.context() as env:
        for key, value in AWS_ENV.items():
            env.setenv(key, value)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = {"endpoint_override": f"{host}:{port}", "scheme": "http"}
            pafs.S3FileSystem(**endpoint, allow_bucket_creation=True).create_dir(BUCKET)
            uri = f"s3://{BUCKET}/runs?endpoint_override={host}:{port}&scheme=http"
            fs, base = pafs.FileSystem.from_uri(uri)
            yield uri, fs, base
        finally:
            server.stop()


@pytest.mark.parametrize(
    "start", [lambda cfg: run_train(cfg, local=True), run_tune], ids=["train --local", "tune"]
)
def test_what_writes_through_local_paths_refuses_a_uri_before_ray_starts(
    s3_storage, shapes_cfg, start
):
    import ray

    uri, fs, base = s3_storage
    with pytest.raises(ConfigError, match=r"through local paths, not to s3://.*run\.storage=PATH"):
        start(validate({**shapes_cfg, "run": {"storage": uri}}))
    assert not ray.is_initialized()
    assert fs.get_file_info(pafs.FileSelector(f"{base}/unit", allow_not_found=True)) == []


def _train_command(storage: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "raycv", "train", str(REPO / "configs" / "smoke.yaml"),
        f"run.storage={storage}", "train.epochs=4", "scaling.num_workers=1",
        "data.shapes.num_images=400", *extra,
    ]  # fmt: skip


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_file(path) as f:
        return f.read()


def _metrics_in_bucket(fs: pafs.FileSystem, base: str) -> dict[str, list[dict]]:
    """Run folder path in the bucket -> the epochs its metrics.jsonl holds."""
    found = fs.get_file_info(
        pafs.FileSelector(f"{base}/smoke", recursive=True, allow_not_found=True)
    )
    return {
        i.path.rsplit("/", 1)[0]: [json.loads(line) for line in _read(fs, i.path).splitlines()]
        for i in found
        if i.base_name == "metrics.jsonl"
    }


def test_a_run_killed_mid_way_resumes_from_the_bucket_alone(
    s3_storage, tmp_path, ray_env, kill_when
):
    """Kill the driver's process group once epoch 2 is in the bucket, delete the local
    mirror, and --resume: the epochs before the kill are not trained again, and the run
    finishes with its checkpoints, metrics and manifest in the bucket."""
    uri, fs, base = s3_storage
    cache = tmp_path / "cache"  # XDG_CACHE_HOME: where the local mirror of the run lives

    def two_epochs() -> tuple[str, list[dict]] | None:
        runs = _metrics_in_bucket(fs, base)
        return next(((run, rows) for run, rows in runs.items() if len(rows) >= 2), None)

    with ray_env() as env:
        env["XDG_CACHE_HOME"] = str(cache)
        # keep=2: the kill may land after epoch 3's checkpoint and before its metrics row;
        # the resumed run fills that row from the checkpoint while Ray still keeps it.
        command = _train_command(uri, "checkpoint.keep=2")
        run, before = kill_when(command, env, tmp_path / "first.log", two_epochs)
        assert before[-1]["epoch"] < 4
        mirror = cache / "raycv" / "s3" / BUCKET / "runs" / "smoke" / run.rsplit("/", 1)[1]
        assert (mirror / "metrics.jsonl").is_file()
        assert not (mirror / "checkpoints").exists()  # Ray Train wrote those to the bucket
        shutil.rmtree(cache)  # the resume can only come from the bucket
        resumed = subprocess.run(
            [*command, "--resume"], env=env, capture_output=True, text=True, timeout=600
        )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert Path(resumed.stdout.strip().splitlines()[-1]) == mirror

    after = _metrics_in_bucket(fs, base)[run]
    assert [m["epoch"] for m in after] == [1, 2, 3, 4]
    for old, new in zip(before, after):  # recorded before the kill: not trained again
        assert old["epoch_started_at"] == new["epoch_started_at"]
    manifest = json.loads(_read(fs, f"{run}/manifest.json"))
    assert manifest["status"] == "finished"
    assert manifest["paths"]["latest_checkpoint"] == "checkpoints/epoch_0004"
    assert json.loads((mirror / "manifest.json").read_text()) == manifest

    latest = tmp_path / "epoch_0004"
    latest.mkdir()
    pafs.copy_files(
        f"{run}/checkpoints/epoch_0004", str(latest), source_filesystem=fs, chunk_size=64 << 20
    )
    assert checkpoint.load(latest)["epoch"] == 4  # checks the SHA-256 recorded beside it
    best = max(after, key=lambda m: m["val_acc"])["epoch"]
    assert checkpoint.load(mirror / "best")["epoch"] == best


def test_doctor_probes_the_bucket_from_every_node(s3_storage, shapes_cfg, ray_local):
    uri, fs, base = s3_storage
    report = run_doctor(validate({**shapes_cfg, "run": {"storage": uri}}))
    storage = [f for f in report.findings if f.check == "storage"]
    assert [f.level for f in storage] == ["ok"], storage
    assert not [i for i in fs.get_file_info(pafs.FileSelector(base)) if "doctor" in i.path]
    missing = uri.replace(BUCKET, "no-such-bucket")
    report = run_doctor(validate({**shapes_cfg, "run": {"storage": missing}}))
    assert [f.level for f in report.findings if f.check == "storage"] == ["error"]


def test_an_unrecorded_best_epoch_is_copied_to_best_within_the_bucket(
    s3_storage, tmp_path, monkeypatch
):
    """A driver killed after epoch 3's checkpoint reached the bucket but before its row:
    the resumed run recovers the row, and since epoch 3 was the best, copies its
    checkpoint to best/ inside the bucket (from its path there, not from its URI)."""
    uri, fs, _ = s3_storage
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = RunFolder.create(uri, "recovered", "train")
    recorder = MetricsRecorder(run, epochs=4, keep=4, metric="val_acc", mode="max")
    scores = {1: 0.1, 2: 0.2, 3: 0.5, 4: 0.3}

    def saved(epoch: int) -> str:
        """Epoch's checkpoint written into the bucket, as Ray Train reports it."""
        local = tmp_path / checkpoint.epoch_dir_name(epoch)
        local.mkdir()
        metrics = {"epoch": epoch, "val_acc": scores[epoch], "node": "n0"}
        checkpoint.save(local, {"epoch": epoch, "metrics": metrics})
        target = remote.filesystem(remote.join(run.uri, "checkpoints", local.name))[1]
        pafs.copy_files(str(local), target, pafs.LocalFileSystem(), fs)
        return target

    for epoch in (1, 2):
        recorder.record([{"epoch": epoch, "val_acc": scores[epoch], "node": "n0"}], saved(epoch))
    saved(3)  # ... and the driver was killed here
    recorder.record([{"epoch": 4, "val_acc": scores[4], "node": "n0"}], saved(4))
    assert [r["epoch"] for r in read_metrics(run.metrics)] == [1, 2, 3, 4]
    assert checkpoint.load(run.best)["epoch"] == 3  # the mirror's copy
    best = remote.filesystem(remote.join(run.uri, "best"))[1]
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(best))]
    assert checkpoint.CHECKPOINT_FILE in names
