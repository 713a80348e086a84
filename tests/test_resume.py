"""--resume with overrides: the keys it may change are applied, every other is refused in one
line before Ray starts, never accepted and then ignored; a finished run trains on for the
epochs added."""

from __future__ import annotations

import json

import pytest
import yaml

from raycv import checkpoint
from raycv.cli import main
from raycv.config import ConfigError, from_dict
from raycv.resume import LOCATORS, TRAINING, resumed_config
from raycv.runs import MetricsRecorder, RunFolder, read_metrics
from raycv.train import prepare_run, run_train


def test_keys_it_may_change_are_applied_and_others_refused():
    saved = from_dict({"train": {"epochs": 5}, "model": {"name": "resnet18"}})
    given = from_dict({"train": {"epochs": 8}, "model": {"name": "resnet34"}})
    longer = resumed_config(saved, given, ["train.epochs"], TRAINING, "runs/x")
    assert longer.train.epochs == 8 and longer.model.name == "resnet18"
    with pytest.raises(ConfigError) as info:
        resumed_config(saved, given, ["train.epochs", "model.name"], TRAINING, "runs/x")
    message = str(info.value)
    assert "cannot change model.name (saved 'resnet18', given 'resnet34')" in message
    assert "raycv finetune CONFIG --from runs/x" in message and "\n" not in message


def test_a_key_given_again_with_its_saved_value_is_no_change():
    cfg = from_dict({"model": {"name": "resnet34"}, "optimizer": {"lr": 0.01}})
    same = resumed_config(cfg, cfg, ["model.name", "optimizer.lr"], LOCATORS, "runs/x")
    assert same == cfg


def test_fewer_epochs_are_refused():
    saved, given = from_dict({"train": {"epochs": 5}}), from_dict({"train": {"epochs": 3}})
    with pytest.raises(ConfigError, match=r"can add epochs, not remove them: train.epochs=3 is"):
        resumed_config(saved, given, ["train.epochs"], TRAINING, "runs/x")


def test_sweeps_and_pipelines_take_only_where_the_run_is():
    saved, given = from_dict({"train": {"epochs": 5}}), from_dict({"train": {"epochs": 8}})
    with pytest.raises(ConfigError, match=r"cannot change train.epochs .* may change experiment"):
        resumed_config(saved, given, ["train.epochs"], LOCATORS, "runs/x")


def test_secrets_stay_out_of_the_refusal():
    saved = from_dict({"pipeline": {"pretrain": {"storage_token": "abc123"}}})
    given = from_dict({"pipeline": {"pretrain": {"storage_token": "xyz789"}}})
    with pytest.raises(ConfigError) as info:
        resumed_config(saved, given, ["pipeline.pretrain"], TRAINING, "runs/x")
    assert "abc123" not in str(info.value) and "xyz789" not in str(info.value)
    assert "pipeline.pretrain" in str(info.value)


def test_cli_refuses_another_model_before_ray_starts(tmp_path, shapes_cfg, capsys):
    import ray

    raw = {**shapes_cfg, "run": {"storage": str(tmp_path / "runs")}}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    _, run = prepare_run(from_dict(raw), "train", resume=None)  # a run to resume
    code = main(["train", str(config), "--resume", "model.name=resnet34", "train.epochs=4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith(f"error: --resume goes on with the config saved in {run.path}")
    assert "cannot change model.name (saved 'resnet18', given 'resnet34')" in err
    assert "train.epochs" not in err.split("may change")[0]  # more epochs are fine
    if not ray.is_initialized():  # (another module's Ray may be up in this process)
        assert yaml.safe_load(run.config.read_text())["train"]["epochs"] == 1


@pytest.mark.slow
def test_a_finished_run_trains_on_for_the_epochs_added(ray_local, tmp_path, shapes_cfg):
    raw = {**shapes_cfg, "run": {"storage": str(tmp_path / "runs")}}
    raw["train"] = {**raw["train"], "epochs": 2}
    run = run_train(from_dict(raw))
    assert [m["epoch"] for m in read_metrics(run.metrics)] == [1, 2]
    raw["train"]["epochs"] = 3
    again = run_train(from_dict(raw), resume=True, keys=["train.epochs"])
    assert again.path == run.path
    assert [m["epoch"] for m in read_metrics(run.metrics)] == [1, 2, 3]  # 1-2 not retrained
    saved = checkpoint.checkpoint_epochs(run.checkpoints)
    assert max(saved) == 3 and checkpoint.load(saved[3])["epoch"] == 3
    assert yaml.safe_load(run.config.read_text())["train"]["epochs"] == 3  # for the next resume
    assert json.loads(run.manifest.read_text())["status"] == "finished"


def test_an_epoch_saved_but_never_recorded_gets_its_row_from_its_checkpoint(tmp_path):
    """A driver killed after a worker saved epoch 3 but before epoch 3's row was written: the
    resumed run starts at epoch 4, and the history still holds every epoch once."""
    run = RunFolder(tmp_path / "run")
    recorder = MetricsRecorder(run, epochs=5, keep=5, metric="val_acc", mode="max")

    def saved(epoch: int) -> str:
        folder = run.checkpoints / checkpoint.epoch_dir_name(epoch)
        folder.mkdir(parents=True)
        metrics = {"epoch": epoch, "val_acc": epoch / 10, "node": "n0"}
        checkpoint.save(folder, {"epoch": epoch, "metrics": metrics})
        return str(folder)

    for epoch in (1, 2):
        recorder.record([{"epoch": epoch, "val_acc": epoch / 10, "node": "n0"}], saved(epoch))
    saved(3)  # ... and the driver was killed here
    recorder.record([{"epoch": 4, "val_acc": 0.4, "node": "n1"}], saved(4))
    rows = read_metrics(run.metrics)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[2] == {"epoch": 3, "val_acc": 0.3, "worker_nodes": ["n0"], "recovered": True}
    assert "recovered" not in rows[3] and rows[3]["worker_nodes"] == ["n1"]
    # A gap whose checkpoint is gone (checkpoint.keep) stays a gap: nothing is invented.
    recorder.record([{"epoch": 6, "val_acc": 0.6, "node": "n1"}], None)
    assert [r["epoch"] for r in read_metrics(run.metrics)] == [1, 2, 3, 4, 6]


def test_an_unrecorded_epoch_that_was_the_best_is_kept_in_best(tmp_path):
    """The killed driver never copied epoch 3 to best/; when its recovered row is the best,
    the resumed run copies its checkpoint there."""
    run = RunFolder(tmp_path / "run")
    recorder = MetricsRecorder(run, epochs=4, keep=4, metric="val_acc", mode="max")
    scores = {1: 0.1, 2: 0.2, 3: 0.5, 4: 0.3}

    def saved(epoch: int) -> str:
        folder = run.checkpoints / checkpoint.epoch_dir_name(epoch)
        folder.mkdir(parents=True)
        metrics = {"epoch": epoch, "val_acc": scores[epoch], "node": "n0"}
        checkpoint.save(folder, {"epoch": epoch, "metrics": metrics})
        return str(folder)

    for epoch in (1, 2):
        recorder.record([{"epoch": epoch, "val_acc": scores[epoch], "node": "n0"}], saved(epoch))
    saved(3)
    recorder.record([{"epoch": 4, "val_acc": scores[4], "node": "n0"}], saved(4))
    assert checkpoint.load(run.best)["epoch"] == 3
