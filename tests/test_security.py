"""Security: checkpoints never run pickled code; run and artifact names cannot lead out of
their folders; secret-like config values are redacted in everything raycv writes; the
dashboard of a local Ray listens on this machine only."""

from __future__ import annotations

import ast
import copy
import json
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from raycv import checkpoint
from raycv.artifacts import checkpoint_file, load_trained
from raycv.cli import main
from raycv.config import Config, ConfigError, dump_config, from_dict
from raycv.redact import is_secret, redact, unredact
from raycv.runs import RunFolder, write_manifest
from raycv.sweep.space import flatten

PACKAGE = Path(__file__).resolve().parents[1] / "raycv"


def _calls(attribute: str) -> list[tuple[str, ast.Call]]:
    """Every call ``module.function(...)`` (e.g. ``torch.load``) in the package source."""
    module, function = attribute.split(".")
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            func = getattr(node, "func", None)
            if (
                isinstance(node, ast.Call)
                and isinstance(func, ast.Attribute)
                and func.attr == function
                and isinstance(func.value, ast.Name)
                and func.value.id == module
            ):
                found.append((f"{path.relative_to(PACKAGE.parent)}:{node.lineno}", node))
    return found


def _keyword(call: ast.Call, name: str):
    value = next((k.value for k in call.keywords if k.arg == name), None)
    return value.value if isinstance(value, ast.Constant) else value


# ------------------------------------------------------------------ pickled code


def test_every_torch_load_in_the_package_is_weights_only():
    calls = _calls("torch.load")
    assert len(calls) >= 2, "the walk must find raycv's own torch.load calls"
    unsafe = [where for where, call in calls if _keyword(call, "weights_only") is not True]
    assert unsafe == [], f"torch.load without weights_only=True at {unsafe}"
    assert _calls("pickle.load") == [] and _calls("pickle.loads") == []


class _Payload:
    """Would create ``marker`` when unpickled, if unpickling ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant(folder: Path, marker: Path) -> Path:
    """A checkpoint with the payload inside, and a checksum that matches it: the checksum
    guards against damage, not against a file written on purpose."""
    state = {"model": {"fc.weight": _Payload(marker)}, "class_names": ["a"], "config": {}}
    folder.mkdir(parents=True)
    return checkpoint.save(folder, state)


def test_planted_pickle_is_refused_by_checkpoint_load(tmp_path):
    marker = tmp_path / "pwned"
    path = _plant(tmp_path / "ckpt", marker)
    assert checkpoint.verify(path) is True
    with pytest.raises(Exception, match="Weights only load failed"):
        checkpoint.load(path)
    assert not marker.exists()


def test_planted_pickle_is_refused_by_load_trained_from_a_run_folder(tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    _plant(run / "best", marker)
    (run / "manifest.json").write_text(
        json.dumps({"kind": "train", "paths": {"best_checkpoint": "best"}})
    )
    for artifact in (run, run / "best", run / "best" / "checkpoint.pt"):
        with pytest.raises(Exception, match="Weights only load failed"):
            load_trained(artifact)
    assert not marker.exists()


# ------------------------------------------------------------------ names and paths


BAD_NAMES = ["..", ".", "", "a/b", "../x", "/etc", "a\\b", "a\x00b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_run_folder_refuses_an_experiment_that_is_not_a_plain_name(tmp_path, name):
    storage = tmp_path / "runs"
    with pytest.raises(ConfigError) as info:
        RunFolder.create(str(storage), name, "train")
    assert "is not a plain name" in str(info.value) and "\n" not in str(info.value)
    assert not storage.exists()


@pytest.mark.parametrize("name", ["../x", "/etc", "a/b", "a\x00b"])
def test_config_refuses_an_experiment_that_is_not_a_plain_name(name):
    with pytest.raises(ConfigError, match="experiment"):
        from_dict({"experiment": name})


def test_plain_names_stay_inside_the_storage_root(tmp_path):
    run = RunFolder.create(str(tmp_path), "exp.v1-a..b", "train")
    assert run.path.parent == tmp_path / "exp.v1-a..b"


@pytest.mark.parametrize("name", ["../x", "../../etc", "/nonexistent/run", "a/b", "a\x00b"])
def test_resume_refuses_a_name_that_leads_out_of_the_experiment(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # relative names are checked against this empty folder
    with pytest.raises(ConfigError) as info:
        RunFolder.find(str(tmp_path / "runs"), "exp", "train", name)
    assert "no such folder, and not a run name" in str(info.value)
    assert "\n" not in str(info.value)


def test_resume_takes_a_run_folder_given_as_a_path_or_a_plain_name(tmp_path):
    run = RunFolder.create(str(tmp_path / "runs"), "exp", "train")
    run.config.write_text("{}\n")
    assert RunFolder.find(str(tmp_path / "runs"), "exp", "train", str(run.path)) == run
    assert RunFolder.find(str(tmp_path / "runs"), "exp", "train", run.path.name) == run


def test_cli_resume_with_a_path_out_of_the_storage_is_one_line(tmp_path, shapes_cfg, capsys):
    raw = {**shapes_cfg, "run": {"storage": str(tmp_path / "runs")}}
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config), "--local", "--resume", "../../etc/passwd"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume '../../etc/passwd': no such folder") and "\n" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("manifest", "what"),
    [
        ({"kind": "train", "paths": {"best_checkpoint": "../outside"}}, "best_checkpoint"),
        ({"kind": "train", "paths": {"best_checkpoint": "OUTSIDE"}}, "best_checkpoint"),
        ({"kind": "pipeline", "final_model": "../outside"}, "final_model"),
        ({"kind": "tune", "best_trial": "../../outside"}, "best_trial"),
        ({"kind": "export", "paths": {"state_dict": "../outside/checkpoint.pt"}}, "state_dict"),
    ],
)
def test_manifest_paths_cannot_lead_out_of_the_artifact(tmp_path, manifest, what):
    outside = tmp_path / "outside"
    outside.mkdir()
    checkpoint.save(outside, {"model": {}, "class_names": ["a"], "config": {}})
    run = tmp_path / "run"
    run.mkdir()
    text = json.dumps(manifest).replace("OUTSIDE", str(outside))  # an absolute path
    (run / "manifest.json").write_text(text)
    with pytest.raises(ConfigError, match=f"{what}=.*leads out of its folder"):
        checkpoint_file(run)


# ------------------------------------------------------------------ secrets


@pytest.mark.parametrize(
    "name",
    [
        *("api_key", "access_key", "AWS_SECRET_ACCESS_KEY", "apiKey", "storage_token", "HFToken"),
        *("password", "db_passwd", "secret", "secrets", "credentials", "run.storage_token", "key"),
    ],
)
def test_secret_like_names(name):
    assert is_secret(name)


@pytest.mark.parametrize(
    "name",
    [
        *("keep", "metric", "key_file", "keys", "max_tokens", "tokenizer", "monkey", "mode"),
        *("storage", "checkpoint", "best_checkpoint", "source", "teacher", "name", "space"),
    ],
)
def test_harmless_names(name):
    assert not is_secret(name)


def test_every_key_of_the_config_tree_is_harmless():
    """Redaction must never hide a real setting: none of today's keys looks secret."""
    keys = list(flatten(Config().model_dump(mode="json")))
    assert "checkpoint.keep" in keys and "checkpoint.metric" in keys
    assert [k for k in keys if is_secret(k)] == []


def test_redact_walks_mappings_and_lists_and_unredact_restores():
    raw = {
        "pipeline": {"pretrain": {"storage_token": "abc123", "train.epochs": 2}},
        "sinks": [{"url": "s3://b", "secret": {"id": "x"}}, {"password": None}],
        "checkpoint": {"keep": 2, "metric": "val_acc"},
    }
    redacted = redact(raw)
    assert redacted["pipeline"]["pretrain"] == {"storage_token": "***", "train.epochs": 2}
    assert redacted["sinks"] == [{"url": "s3://b", "secret": "***"}, {"password": None}]
    assert redacted["checkpoint"] == raw["checkpoint"]
    assert raw["pipeline"]["pretrain"]["storage_token"] == "abc123"  # a copy, input unchanged
    assert unredact(redacted, raw) == raw


def _secret_config(tmp_path: Path, shapes_cfg: dict) -> dict:
    raw = copy.deepcopy(shapes_cfg)
    raw["run"] = {"storage": str(tmp_path / "runs")}
    raw["pipeline"] = {"pretrain": {"storage_token": "abc123", "train.epochs": 1}}
    return raw


def test_secrets_stay_out_of_config_yaml_manifest_and_checkpoint(tmp_path, shapes_cfg):
    cfg = from_dict(_secret_config(tmp_path, shapes_cfg))
    assert "abc123" not in dump_config(cfg)
    assert yaml.safe_load(dump_config(cfg))["pipeline"]["pretrain"]["storage_token"] == "***"

    run = RunFolder.create(cfg.run.storage, cfg.experiment, "train")
    extra = {"storage": {"access_key": "AKIA123"}, "keep": 2, "metric": "val_acc"}
    write_manifest(run, cfg, "running", extra)
    manifest = json.loads(run.manifest.read_text())
    assert manifest["storage"] == {"access_key": "***"}
    assert (manifest["keep"], manifest["metric"]) == (2, "val_acc")

    path = checkpoint.save(run.path, {"model": {}, "config": cfg.model_dump(mode="json")})
    assert b"abc123" not in path.read_bytes()
    saved = torch.load(path, weights_only=True)["config"]
    assert saved["pipeline"]["pretrain"]["storage_token"] == "***"
    assert isinstance(from_dict(saved), Config)  # load_trained can still rebuild it


def test_resume_takes_redacted_secrets_from_the_config_given_again(tmp_path, shapes_cfg):
    from raycv.train import prepare_run

    raw = _secret_config(tmp_path, shapes_cfg)
    cfg, run = prepare_run(from_dict(raw), "train", resume=None)
    assert "abc123" not in run.config.read_text()
    resumed, same = prepare_run(from_dict(raw), "train", resume=True)
    assert same == run
    assert resumed.pipeline.pretrain["storage_token"] == "abc123"
    assert resumed.model_dump() == cfg.model_dump()

    del raw["pipeline"]["pretrain"]["storage_token"]
    with pytest.raises(ConfigError) as info:
        prepare_run(from_dict(raw), "train", resume=True)
    message = str(info.value)
    assert message.startswith("pipeline.pretrain.storage_token was saved as *** in ")
    assert "give it again" in message and "\n" not in message


def test_pipeline_given_yaml_is_redacted_and_restored_on_resume(tmp_path, shapes_cfg):
    from raycv.pipeline import GIVEN_FILE, start

    given = _secret_config(tmp_path, shapes_cfg)
    p = start(given, from_dict(given), resume=None)
    for name in (GIVEN_FILE, "config.yaml"):
        assert "abc123" not in (p.run.path / name).read_text()
    resumed = start(given, from_dict(given), resume=True)
    assert resumed.run == p.run
    assert resumed.given["pipeline"]["pretrain"]["storage_token"] == "abc123"


def test_config_errors_do_not_echo_secret_values():
    for raw, overrides in (
        ({}, ["run.api_key=[abc123"]),  # not valid YAML
        ({}, ["train.epochs.storage_token=abc123"]),  # not a section
        ({"tune": {"space": {"api_token": "abc123"}}}, []),  # wrong type
    ):
        with pytest.raises(ConfigError) as info:
            from_dict(raw, overrides)
        assert "abc123" not in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "storage",
    [
        "s3://bucket/runs?access_key=AKIA1&secret_key=abc123",
        "s3://AKIA1:abc123@bucket/runs",
        "gs://bucket/runs?access_token=abc123",
    ],
)
def test_a_storage_uri_with_a_credential_is_refused_without_echoing_it(storage):
    """Every run folder keeps its config and the run's URI is logged: keys come from the
    environment only."""
    with pytest.raises(ConfigError, match="set it in the environment") as info:
        from_dict({"run": {"storage": storage}})
    assert "abc123" not in str(info.value), str(info.value)


def test_a_storage_uri_without_credentials_is_accepted():
    uri = "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert from_dict({"run": {"storage": uri}}).run.storage == uri


# ------------------------------------------------------------------ the dashboard


def test_every_ray_init_that_starts_ray_sets_the_dashboard_host():
    calls = _calls("ray.init")
    assert calls, "the walk must find raycv's ray.init calls"
    # ray.init() without arguments, or with an address, joins a cluster: it starts nothing.
    starting = [
        (where, call)
        for where, call in calls
        if (call.args or call.keywords) and _keyword(call, "address") is None
    ]
    assert starting
    assert [where for where, call in starting if _keyword(call, "dashboard_host") is None] == []
    assert Config().run.dashboard_host == "127.0.0.1"


def test_local_ray_dashboard_listens_on_this_machine_only(monkeypatch):
    import ray

    from raycv.session import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths
    monkeypatch.setenv("RAY_TMPDIR", temp_dir)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        ensure_ray(Config(), num_cpus=1)
        # No public getter for the URL of a cluster this process started.
        host, port = ray._private.worker.get_dashboard_url().rsplit(":", 1)
        assert host == "127.0.0.1"
        socket.create_connection((host, int(port)), timeout=5).close()
        outside = ray.util.get_node_ip_address()
        if outside == "127.0.0.1":
            pytest.skip("this machine has no address but loopback to try the dashboard on")
        with pytest.raises(OSError):  # the machine's own address reaches nothing
            socket.create_connection((outside, int(port)), timeout=5).close()
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
