"""Config errors stop before Ray starts, each as one line naming the key, the value and
the valid choices; overrides are YAML-typed; resolved configs round-trip; the CLI agrees."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raycv.cli import build_parser, main
from raycv.config import Config, ConfigError, dump_config, from_dict, load_config, validate
from raycv.models import MODELS

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def config_error(raw: dict, overrides: list[str] = ()) -> str:
    """The message of the ConfigError that ``raw`` plus ``overrides`` must raise."""
    with pytest.raises(ConfigError) as info:
        from_dict(raw, list(overrides))
    message = str(info.value)
    assert "\n" not in message, f"config errors are one line, got {message!r}"
    return message


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------ unknown keys, types


def test_unknown_top_level_key_lists_the_valid_keys():
    message = config_error({"bogus": 1})
    assert message.startswith("bogus is not a config key")
    assert "valid keys: experiment, task, seed, data, augment, model" in message


def test_unknown_nested_key_suggests_the_close_one():
    message = config_error({"train": {"epoch": 3}})
    assert message.startswith("train.epoch is not a config key")
    assert "did you mean 'epochs'?" in message
    assert "batch_size" in message


def test_unknown_key_two_levels_down_names_its_full_path():
    message = config_error({}, ["data.shape.num_images=10"])
    assert message.startswith("data.shape is not a config key; did you mean 'shapes'?")
    message = config_error({"data": {"shapes": {"num_image": 10}}})
    assert message.startswith("data.shapes.num_image is not a config key")
    assert "did you mean 'num_images'?" in message


def test_unknown_key_without_a_close_match_gives_no_hint():
    message = config_error({}, ["train.lr=0.1"])  # lr lives in optimizer, not train
    assert message.startswith("train.lr is not a config key; valid keys: epochs, ")
    assert "did you mean" not in message


def test_wrong_type_names_key_and_value():
    assert config_error({"train": {"epochs": "many"}}) == (
        "train.epochs: Input should be a valid integer, unable to parse string as an integer "
        "(got 'many')"
    )
    assert config_error({}, ["train.epochs=3.5"]).endswith("(got 3.5)")
    assert config_error({"train": 3}) == (
        "train: Input should be a valid dictionary or instance of TrainConfig (got 3)"
    )


def test_choice_outside_a_literal_lists_the_choices():
    message = config_error({}, ["train.precision=fp8"])
    assert message == "train.precision: Input should be 'fp32', 'bf16' or 'fp16' (got 'fp8')"


# ------------------------------------------------------------------ value checks


@pytest.mark.parametrize("lr", ["0", "-1", "-0.5"])
def test_learning_rate_must_be_positive(lr):
    message = config_error({}, [f"optimizer.lr={lr}"])
    assert message.startswith("optimizer.lr: Input should be greater than 0")
    assert message.endswith(f"(got {yaml.safe_load(lr)!r})")


@pytest.mark.parametrize(("batch", "workers"), [(3, 4), (30, 4), (7, 2)])
def test_batch_size_must_be_a_multiple_of_the_workers(batch, workers):
    message = config_error({}, [f"train.batch_size={batch}", f"scaling.num_workers={workers}"])
    assert message == (
        "train.batch_size must be a positive multiple of scaling.num_workers "
        f"(got {batch} for {workers} workers)"
    )


def test_batch_size_that_divides_evenly_is_accepted():
    cfg = from_dict({}, ["train.batch_size=32", "scaling.num_workers=4"])
    assert (cfg.train.batch_size, cfg.scaling.num_workers) == (32, 4)


def test_elastic_worker_range_passes_through_with_restarts_allowed():
    from raycv.train import max_failures, scaling_config

    cfg = from_dict({}, ["scaling.num_workers=[1, 4]", "train.batch_size=6"])
    assert cfg.scaling.elastic and (cfg.scaling.min_workers, cfg.scaling.max_workers) == (1, 4)
    assert scaling_config(cfg, local=False).num_workers == (1, 4)
    assert max_failures(cfg) == 3  # Ray Train resizes by restarting: the default allows it
    assert max_failures(from_dict({}, ["scaling.num_workers=2"])) == 0
    dumped = yaml.safe_load(dump_config(cfg))
    assert dumped["scaling"]["num_workers"] == [1, 4]  # the saved config reloads as it was
    assert from_dict(dumped).scaling.num_workers == (1, 4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["scaling.num_workers=[3, 2]"], "scaling: num_workers must be at least 1, or [min, max]"),
        (["scaling.num_workers=[0, 2]"], "scaling: num_workers must be at least 1, or [min, max]"),
        (["scaling.num_workers=[1, 2, 3]"], "scaling.num_workers: give a number or [min, max]"),
        (
            ["scaling.num_workers=[1, 8]", "train.batch_size=4"],
            "train.batch_size=4 is smaller than the most workers of scaling.num_workers=[1, 8]",
        ),
        (
            ["scaling.num_workers=[1, 2]", "run.max_failures=0"],
            "an elastic scaling.num_workers range needs run.max_failures > 0 (or -1)",
        ),
    ],
)
def test_a_bad_elastic_range_names_the_fix(overrides, message):
    assert config_error({}, overrides).startswith(message)


def test_unknown_model_lists_every_registered_model():
    message = config_error({}, ["model.name=resnet9"])
    assert message == (
        f"model.name='resnet9' is unknown; choose one of: {', '.join(MODELS.names())}"
    )


def test_unknown_data_source_lists_the_sources():
    message = config_error({}, ["data.source=imagenet"])
    known = "coco, folder, mask_folder, shapes, voc, yolo"
    assert message == f"data.source='imagenet' is unknown; choose one of: {known}"


def test_folder_source_needs_an_existing_root(tmp_path):
    message = config_error({}, ["data.source=folder"])
    assert message == "data.folder.root is required when data.source=folder"
    missing = tmp_path / "nowhere"
    message = config_error({}, ["data.source=folder", f"data.folder.root={missing}"])
    assert message == (
        f"data.folder.root={str(missing)!r} is not a folder; point it at an ImageFolder"
    )
    cfg = from_dict({}, ["data.source=folder", f"data.folder.root={tmp_path}"])
    assert cfg.data.folder.root == str(tmp_path)


def test_image_size_too_small_for_inception_names_the_minimum():
    message = config_error({}, ["model.name=inception_v3", "model.image_size=64"])
    assert message == "model.image_size=64 is too small for inception_v3; use at least 75"
    assert from_dict({}, ["model.name=inception_v3", "model.image_size=75"]).model.image_size == 75


def test_vit_size_must_be_a_multiple_of_the_patch():
    message = config_error({}, ["model.name=vit_b_16", "model.image_size=40"])
    assert message == "model.image_size=40 must be a multiple of 16 for vit_b_16"
    message = config_error(
        {}, ["model.name=vit_b_16", "model.image_size=64", "model.weights=DEFAULT"]
    )
    assert message == "model.image_size=64: vit_b_16 weights need 224 px inputs"


def test_fp16_needs_a_gpu():
    message = config_error({}, ["train.precision=fp16"])
    assert message == "train.precision=fp16 needs scaling.use_gpu=true; use bf16 on CPU"
    cfg = from_dict({}, ["train.precision=fp16", "scaling.use_gpu=true"])
    assert cfg.train.precision == "fp16"


def test_compile_needs_a_gpu():
    message = config_error({}, ["train.compile=true"])
    assert message.startswith("train.compile=true needs scaling.use_gpu=true")
    assert message.endswith("drop train.compile on CPU")
    assert from_dict({}, ["train.compile=true", "scaling.use_gpu=true"]).train.compile


# ------------------------------------------------------------------ YAML files and overrides


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: 3\n   batch_size: 4\nmodel: {}\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line 3, column \d+: mapping"):
        load_config(path)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- model\n")
    with pytest.raises(ConfigError, match=r"list.yaml must hold a mapping .*got list$"):
        load_config(path)


def test_empty_yaml_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(path) == Config()


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"config file '{re.escape(str(path))}' not found"):
        load_config(path, ["train.epochs=1"])


@pytest.mark.parametrize("item", ["train.epochs", "=3", "train..epochs=3", "train epochs=3"])
def test_malformed_override(item):
    message = config_error({}, [item])
    assert message == f"override {item!r} must look like section.key=value, e.g. train.epochs=3"


def test_override_with_invalid_yaml_value():
    assert config_error({}, ["train.epochs=[1"]) == (
        "override 'train.epochs=[1': value is not valid YAML"
    )


def test_override_into_a_value_set_in_the_yaml():
    message = config_error({"train": {"epochs": 3}}, ["train.epochs.x=1"])
    assert message == "override 'train.epochs.x=1': epochs is a value, not a section"


def test_override_into_a_default_value_names_the_key():
    # train.epochs is not in the YAML here: the override builds {"epochs": {"x": 1}}
    # and the type check reports it (without the offending value).
    message = config_error({}, ["train.epochs.x=1"])
    assert message.startswith("train.epochs: Input should be a valid integer")


def test_overrides_are_yaml_typed_and_win_over_the_file(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"train": {"epochs": 8, "batch_size": 16}})
    cfg = load_config(
        path,
        [
            "train.epochs=3",
            "augment.scale=[0.5,1.0]",
            "scaling.use_gpu=false",
            "model.weights=null",
            "experiment=exp-1",
        ],
    )
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
    assert cfg.train.batch_size == 16  # untouched keys keep the file's value
    assert cfg.augment.scale == (0.5, 1.0)
    assert cfg.scaling.use_gpu is False
    assert cfg.model.weights is None
    assert cfg.experiment == "exp-1"


def test_later_override_wins():
    assert from_dict({}, ["train.epochs=2", "train.epochs=5"]).train.epochs == 5


def test_from_dict_does_not_modify_its_input():
    raw = {"train": {"epochs": 2}}
    from_dict(raw, ["train.epochs=4", "model.image_size=48"])
    assert raw == {"train": {"epochs": 2}}


def test_augment_range_checks():
    assert config_error({}, ["augment.scale=[0.5,2]"]) == (
        "augment: scale must lie in (0, 1], got (0.5, 2.0)"
    )
    message = config_error({}, ["augment.ratio=[1.5,1.0]"])
    assert message.startswith("augment: ratio must be (low, high) with 0 < low <= high")


def test_resolved_config_round_trips(tmp_path, shapes_cfg):
    cfg = from_dict(shapes_cfg, ["augment.scale=[0.5,1.0]", "scheduler.warmup_epochs=0.5"])
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(cfg))
    again = load_config(saved)
    assert again == cfg
    assert dump_config(again) == dump_config(cfg)
    assert yaml.safe_load(saved.read_text())["augment"]["scale"] == [0.5, 1.0]


# Recipes for a user's own data leave its place to the command line.
USER_DATA = {
    "folder.yaml": "data.folder.root",
    "seg_folder.yaml": "data.mask_folder.root",
    "det_folder.yaml": "data.voc.root",
}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path, tmp_path):
    overrides = []
    if path.name in USER_DATA:
        key = USER_DATA[path.name]
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)} is required"):
            load_config(path)
        overrides = [f"{key}={tmp_path}"]
    cfg = load_config(path, overrides)
    assert cfg.experiment == path.stem
    assert cfg.train.batch_size % cfg.scaling.num_workers == 0


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {
        "quickstart.yaml",
        "smoke.yaml",
        "seg_smoke.yaml",
        "seg_folder.yaml",
        "seg_quickstart.yaml",
        "det_smoke.yaml",
        "det_folder.yaml",
        "det_quickstart.yaml",
        "det_pipeline_smoke.yaml",
    }


def test_config_errors_do_not_start_ray():
    import ray

    if ray.is_initialized():
        pytest.skip("another module's Ray is still running")
    config_error({}, ["optimizer.lr=-1"])
    assert not ray.is_initialized()


# ------------------------------------------------------------------ the CLI


def raycv(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "raycv", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_config_error_is_one_line_and_creates_no_run(tmp_path, shapes_cfg):
    cfgfile = write_yaml(tmp_path / "cfg.yaml", shapes_cfg)
    storage = tmp_path / "runs"
    result = raycv("train", str(cfgfile), "train.lr=-1", f"run.storage={storage}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: train.lr is not a config key; valid keys: epochs")
    assert result.stdout == ""
    assert not storage.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]


def subparsers(parser: argparse.ArgumentParser | None = None, prefix: str = "") -> dict:
    """The leaf commands, e.g. {"train": parser, "eval": parser, "data preview": parser}."""
    found = {}
    for action in (parser or build_parser())._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(subparsers(sub, f"{prefix}{name} ") or {f"{prefix}{name}": sub})
    return found


COMMANDS = [
    "compress", "data preview", "doctor", "eval", "export", "finetune", "pipeline", "predict",
    "train", "tune",
]  # fmt: skip


def test_cli_commands_are_the_documented_ones():
    assert sorted(subparsers()) == COMMANDS
    readme = (REPO / "README.md").read_text()
    for command in COMMANDS:
        assert f"`raycv {command}" in readme, f"raycv {command} is not in README.md"


@pytest.mark.parametrize("command", COMMANDS)
def test_cli_help_mentions_every_option(command, tmp_path):
    result = raycv(*command.split(), "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: raycv {command} ")
    text = " ".join(result.stdout.split())  # help lines wrap at the terminal width
    actions = [a for a in subparsers()[command]._actions if a.dest != "help"]
    assert actions
    for action in actions:
        for name in action.option_strings or [action.dest]:
            assert name in text, f"{name} missing from `raycv {command} --help`"
        assert " ".join(action.help.split()) in text


def test_cli_in_process_reports_the_value_and_exits_2(tmp_path, shapes_cfg, capsys):
    cfgfile = write_yaml(tmp_path / "cfg.yaml", shapes_cfg)
    storage = tmp_path / "runs"
    assert main(["train", str(cfgfile), "optimizer.lr=-1", f"run.storage={storage}"]) == 2
    assert main(["data", "preview", str(cfgfile), "--count", "0"]) == 2
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "error: optimizer.lr: Input should be greater than 0 (got -1)",
        "error: --count must be at least 1 (got 0)",
        f"error: config file '{tmp_path / 'missing.yaml'}' not found; "
        "pass a YAML file such as configs/smoke.yaml",
    ]
    assert not storage.exists()


def test_cli_unknown_flag_exits_2(tmp_path):
    result = raycv("train", "cfg.yaml", "--bogus", cwd=tmp_path)
    assert result.returncode == 2
    assert "unrecognized arguments: --bogus" in result.stderr
    assert result.stderr.rstrip().endswith("(see raycv COMMAND --help)")
    assert list(tmp_path.iterdir()) == []


def test_the_task_picks_its_model_and_metric_when_the_config_names_none():
    cfg = from_dict({"task": "segmentation"})
    assert cfg.model.name == "unet"
    assert (cfg.checkpoint.metric, cfg.checkpoint.mode) == ("val_miou", "max")
    assert (cfg.tune.objective.metric, cfg.tune.objective.mode) == ("val_miou", "max")
    given = from_dict({"task": "segmentation", "checkpoint": {"metric": "val_loss"}})
    assert given.checkpoint.mode == "min"  # a loss falls as models improve


def test_a_model_of_another_task_is_refused_naming_the_task_s_models():
    message = config_error({}, ["task=segmentation", "model.name=resnet18"])
    assert message.startswith("model.name=resnet18 is a classification model, the task is ")
    assert "unet" in message and "deeplabv3_mobilenet_v3_large" in message
    message = config_error({}, ["task=segmentation", "model.encoder=resnet19"])
    assert message.startswith("model.encoder='resnet19' is unknown; e.g. resnet")
    message = config_error({}, ["model.encoder=resnet18"])
    assert message == "model.encoder is for unet, pspnet, deeplabv3plus and yolo_*, not resnet18"


def test_a_config_saved_before_a_key_moved_still_loads_with_its_value():
    """pipeline.distill became compress.distill: run folders and checkpoints written before
    keep loading (load_trained validates their saved config)."""
    cfg = validate({"pipeline": {"distill": False, "sweep": False}})
    assert cfg.compress.distill is False and cfg.pipeline.sweep is False
    both = validate({"pipeline": {"distill": False}, "compress": {"distill": True}})
    assert both.compress.distill is True  # the new key, where a config has it, wins
