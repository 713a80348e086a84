"""Transfer learning: weight sources (torchvision cache offline, raycv artifacts, state-dict
files), head replacement for every registered model, and what each strategy trains."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from safetensors.torch import save_file

from raycv import checkpoint
from raycv.config import ConfigError, from_dict, validate
from raycv.finetune.sources import apply_source, resolve_source, transplant
from raycv.finetune.strategies import FineTuning
from raycv.models import MODELS, create_model
from raycv.optim import build_optimizer
from raycv.pruning import prune_model
from raycv.runs import read_metrics

SOURCE_CLASSES = ["a", "b", "c", "d", "e", "f", "g"]


def _size(name: str) -> int:
    return {"inception_v3": 299, "vit_b_16": 224}.get(name, 32)


def _heads(name: str) -> tuple[str, ...]:
    return tuple(f"{h}." for h in MODELS.get(name).heads)


def _save_source(folder: Path, cfg_raw: dict, model: torch.nn.Module) -> Path:
    """A raycv checkpoint of ``model`` as a source task would leave it."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "class_names": SOURCE_CLASSES,
        "config": validate(cfg_raw).model_dump(mode="json"),
        "metrics": {"val_acc": 0.9},
        "epoch": 3,
    }
    return checkpoint.save(folder, state)


# ------------------------------------------------------------------ sources, offline


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def _cache_resnet18_weights(torch_home: Path) -> dict[str, torch.Tensor]:
    """Write a state dict where torchvision caches ResNet18_Weights.IMAGENET1K_V1."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / Path(weights.url).name)
    return state


def test_torchvision_weights_read_from_the_cache_offline(torch_home):
    state = _cache_resnet18_weights(torch_home)
    for name in ("ResNet18_Weights.IMAGENET1K_V1", "DEFAULT", "IMAGENET1K_V1"):
        source = resolve_source(name, "resnet18")
        assert source.ref == "ResNet18_Weights.IMAGENET1K_V1"
        assert all(torch.equal(source.state_dict[k], v) for k, v in state.items())
        assert len(source.class_names) == 1000
        assert source.preprocessing.image_size == 224


def test_source_preprocessing_applies_unless_the_config_sets_it(torch_home, shapes_cfg):
    _cache_resnet18_weights(torch_home)
    shapes_cfg["finetune"] = {"source": "DEFAULT"}
    shapes_cfg["augment"] = {"mean": [0.5, 0.5, 0.5]}  # set by the user: kept
    shapes_cfg["model"] = {"name": "resnet18"}  # image_size left out: the weights' 224
    cfg = apply_source(validate(shapes_cfg))
    assert cfg.finetune.source == "ResNet18_Weights.IMAGENET1K_V1"
    assert cfg.augment.mean == (0.5, 0.5, 0.5)
    assert cfg.augment.std == pytest.approx((0.229, 0.224, 0.225))
    assert cfg.model.image_size == 224
    assert cfg.working_size == 256  # torchvision resizes ResNet-18's inputs to 256, then crops


def test_weights_of_another_model_name_the_choices(torch_home):
    with pytest.raises(ConfigError, match=r"weights names: ResNet18_Weights.IMAGENET1K_V1"):
        resolve_source("ResNet50_Weights.IMAGENET1K_V2", "resnet18")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        resolve_source(str(tmp_path / "nope.pth"), "resnet18")


def test_state_dict_files_pt_pth_safetensors(tmp_path):
    model = create_model("resnet18", 5)
    state = model.state_dict()
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    torch.save(state, tmp_path / "plain.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    for file in ("wrapped.pth", "plain.pt", "w.safetensors"):
        loaded = resolve_source(str(tmp_path / file), "resnet18").state_dict
        assert all(torch.equal(loaded[k], v) for k, v in state.items()), file


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match=r"Weights only load failed|Unsupported"):
        resolve_source(str(tmp_path / "evil.pt"), "resnet18")
    assert not (tmp_path / "pwned").exists()


def test_raycv_checkpoint_source_brings_its_model_and_preprocessing(tmp_path, shapes_cfg):
    raw = copy.deepcopy(shapes_cfg)
    raw["model"] = {"name": "mobilenet_v3_small", "image_size": 48}
    raw["augment"] = {"mean": [0.1, 0.2, 0.3], "std": [0.3, 0.3, 0.3]}
    file = _save_source(tmp_path / "src", raw, create_model("mobilenet_v3_small", 7))
    target = copy.deepcopy(shapes_cfg)
    del target["model"]  # model and preprocessing follow the source
    target["finetune"] = {"source": str(tmp_path / "src")}
    cfg = apply_source(validate(target))
    assert cfg.model.name == "mobilenet_v3_small"
    assert cfg.model.image_size == 48
    assert cfg.augment.mean == (0.1, 0.2, 0.3)
    assert cfg.finetune.source == str(file.resolve())
    # A model named explicitly that differs from the source's is an error, not a guess.
    target["model"] = {"name": "resnet18", "image_size": 32}
    with pytest.raises(ConfigError, match="trained as mobilenet_v3_small"):
        apply_source(validate(target))


# ------------------------------------------------------------------ head replacement


# Detectors keep their heads as built for the class count (box predictors, whose widths
# follow it in several layers): tests/test_detection.py checks them.
TRANSPLANTABLE = [n for n in MODELS.names() if MODELS.get(n).task != "detection"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TRANSPLANTABLE)
def test_head_replaced_backbone_kept_for_every_model(name):
    torch.manual_seed(0)
    source = create_model(name, 7, image_size=_size(name)).state_dict()
    target_size = 75 if name == "inception_v3" else _size(name)  # Inception: aux head dropped
    model = create_model(name, 3, image_size=target_size)
    transplant(model, name, 3, source)
    own = model.state_dict()
    heads = _heads(name)
    body = [k for k in own if not k.startswith(heads)]
    assert body and all(torch.equal(own[k], source[k]) for k in body)
    for head in MODELS.get(name).heads:
        try:
            layer = model.get_submodule(head)
        except AttributeError:
            continue  # Inception's auxiliary head, left out below 299 px
        width = layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels
        assert width == 3
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, target_size, target_size))
    out = out["out"] if isinstance(out, dict) else out  # torchvision's segmenters
    assert out.shape[:2] == (1, 3)


def test_wrong_architecture_names_the_layers():
    source = create_model("resnet18", 7).state_dict()
    with pytest.raises(ConfigError, match=r"lacks layers of resnet34: layer1\.2\.conv1\.weight"):
        transplant(create_model("resnet34", 3), "resnet34", 3, source)
    wide = create_model("resnet18", 7).state_dict()
    wide["conv1.weight"] = torch.zeros(128, 3, 7, 7)
    with pytest.raises(ConfigError, match=r"wider than resnet18's: conv1\.weight"):
        transplant(create_model("resnet18", 3), "resnet18", 3, wide)


def test_channel_pruned_source_loads_with_its_widths(shapes_cfg):
    pruned = prune_model(
        create_model("resnet18", 7),
        "resnet18",
        from_dict({"prune": {"ratio": 0.5}}).prune,
        32,
    )
    model = create_model("resnet18", 3)
    transplant(model, "resnet18", 3, pruned.state_dict())
    assert model.conv1.out_channels == pruned.conv1.out_channels < 64
    assert model.fc.in_features == pruned.fc.in_features and model.fc.out_features == 3


# ------------------------------------------------------------------ strategies


def _plan(strategy: str, **finetune) -> tuple[FineTuning, torch.nn.Module]:
    cfg = from_dict(
        {
            "finetune": {"source": "DEFAULT", "strategy": strategy, **finetune},
            "train": {"epochs": 3},
        }
    )
    return FineTuning(cfg), create_model("resnet18", 4)


def test_linear_probe_trains_only_the_head():
    plan, model = _plan("linear_probe")
    assert plan.frozen(1) and plan.frozen(3)
    plan.set_trainable(model, plan.frozen(1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    plan.train_mode(model, frozen=True)
    assert not model.bn1.training and not model.layer4[1].bn2.training
    assert model.training


def test_gradual_unfreezes_after_k_epochs():
    plan, model = _plan("gradual", freeze_epochs=2)
    assert [plan.frozen(e) for e in (1, 2, 3)] == [True, True, False]
    plan.set_trainable(model, False)
    assert all(p.requires_grad for p in model.parameters())
    plan.train_mode(model, frozen=False)
    assert model.bn1.training


def test_freeze_bn_keeps_statistics_but_trains_weights():
    plan, model = _plan("full", freeze_bn=True)
    plan.set_trainable(model, plan.frozen(1))
    assert all(p.requires_grad for p in model.parameters())
    plan.train_mode(model, frozen=False)
    assert not model.bn1.training


def test_discriminative_learning_rates():
    plan, model = _plan("full", backbone_lr_factor=0.1)
    optimizer = build_optimizer(model, plan.cfg.optimizer, 0.01, plan.lr_scales(model))
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lr_of[id(model.fc.weight)] == pytest.approx(0.01)
    assert lr_of[id(model.layer4[1].conv2.weight)] == pytest.approx(0.001)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # the head's comes first

    plan, model = _plan("full", layer_decay=0.5)
    scales = plan.lr_scales(model)
    # resnet18 blocks: conv1, bn1, layer1..4 below the head; decay grows with depth.
    assert scales["fc.weight"] == 1.0
    assert scales["layer4.0.conv1.weight"] == 0.5
    assert scales["layer1.0.conv1.weight"] == 0.5**4
    assert scales["conv1.weight"] == 0.5**6


def test_strategy_config_checks():
    with pytest.raises(ConfigError, match=r"finetune.strategy=linear_probe freezes"):
        from_dict({"finetune": {"strategy": "linear_probe"}})
    with pytest.raises(ConfigError, match=r"finetune.freeze_epochs=3 leaves no epoch"):
        from_dict(
            {
                "finetune": {"source": "x", "strategy": "gradual", "freeze_epochs": 3},
                "train": {"epochs": 3},
            }
        )
    with pytest.raises(ConfigError, match=r"finetune.strategy='nope' is unknown"):
        from_dict({"finetune": {"strategy": "nope"}})


# ------------------------------------------------------------------ real fine-tune runs


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, smoke_at):
    """A raycv checkpoint of a 7-class ResNet-18, as a pretraining stage leaves it."""
    folder = tmp_path_factory.mktemp("source")
    torch.manual_seed(1)
    model = create_model("resnet18", 7)
    model.train()
    with torch.no_grad():  # give BatchNorm statistics that differ from the defaults
        model(torch.randn(8, 3, 32, 32) * 2 + 1)
    return _save_source(folder / "best", smoke_at(folder), model), model.state_dict()


def _finetune(smoke, source: Path, local: bool = True, **finetune):
    from raycv.train import run_train

    raw = smoke(finetune={"source": str(source), **finetune}, checkpoint={"keep": 2})
    return run_train(validate(raw), local=local, stage="finetune")


def _changed(saved: dict, source: dict, prefix_filter=lambda k: True) -> set[str]:
    return {
        k
        for k, v in saved.items()
        if prefix_filter(k) and k in source and v.shape == source[k].shape
        if not torch.equal(v, source[k])
    }


def _epoch_state(run, epoch: int) -> dict:
    return checkpoint.load(run.checkpoints / checkpoint.epoch_dir_name(epoch))["model"]


@pytest.mark.slow
def test_linear_probe_run_changes_only_the_head(ray_local, smoke, source_run):
    file, source = source_run
    run = _finetune(smoke, file, strategy="linear_probe")
    first, saved = _epoch_state(run, 1), _epoch_state(run, 2)
    assert not _changed(saved, source)  # the whole backbone, BatchNorm statistics included
    assert saved["fc.weight"].shape[0] == 4  # smoke has 4 classes, the source 7
    assert _changed(saved, first) == {"fc.weight", "fc.bias"}  # the new head trains
    manifest = (run.path / "manifest.json").read_text()
    assert '"kind": "finetune"' in manifest and str(file.resolve()) in manifest


def test_freeze_bn_step_keeps_running_statistics():
    """A real training step with freeze_bn: weights (BatchNorm's too) move, statistics don't."""
    plan, model = _plan("full", freeze_bn=True)
    plan.set_trainable(model, plan.frozen(1))
    before = copy.deepcopy(model.state_dict())
    optimizer = build_optimizer(model, plan.cfg.optimizer, 0.1, plan.lr_scales(model))
    plan.train_mode(model, frozen=False)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.arange(8) % 4)
    loss.backward()
    optimizer.step()
    changed = _changed(model.state_dict(), before)
    assert "layer1.0.conv1.weight" in changed and "bn1.weight" in changed
    assert not {k for k in changed if "running_" in k or "num_batches" in k}


@pytest.mark.slow
def test_gradual_unfreezing_with_two_ddp_workers(ray_local, smoke, source_run):
    """Epoch 1 trains the head only; epoch 2 the whole model, through a DDP wrapper
    rebuilt for the newly trainable parameters (both workers stay in step)."""
    file, source = source_run
    run = _finetune(smoke, file, local=False, strategy="gradual", freeze_epochs=1)
    first, second = _epoch_state(run, 1), _epoch_state(run, 2)
    assert _changed(first, source) <= {"fc.weight", "fc.bias"}
    assert "layer1.0.conv1.weight" in _changed(second, source)
    assert "layer1.0.bn1.running_mean" in _changed(second, source)
    history = read_metrics(run.metrics)
    assert [m["epoch"] for m in history] == [1, 2]
    assert len(history[-1]["worker_nodes"]) == 2


@pytest.mark.slow
def test_finetune_from_a_torchvision_weights_name_offline(ray_local, smoke, torch_home):
    """The weights come from the TORCH_HOME cache; a linear probe keeps them as they are."""
    from raycv.train import run_train

    cached = _cache_resnet18_weights(torch_home)
    raw = smoke(
        finetune={"source": "IMAGENET1K_V1", "strategy": "linear_probe"},
        model={"name": "resnet18", "image_size": 32},  # set: not the weights' 224
        train={"epochs": 1},
    )
    run = run_train(validate(raw), local=True, stage="finetune")
    saved = _epoch_state(run, 1)
    assert not _changed(saved, cached)  # every backbone tensor is the cached one
    assert saved["fc.weight"].shape == (4, 512)
    config = yaml.safe_load(run.config.read_text())
    assert config["finetune"]["source"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert config["augment"]["std"] == pytest.approx([0.229, 0.224, 0.225])


def test_cli_bad_source_is_one_line_before_ray(tmp_path):
    storage = tmp_path / "runs"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "raycv",
            "finetune",
            str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"),
            "--from",
            str(tmp_path / "missing weights.pth"),
            f"run.storage={storage}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: finetune.source={str(tmp_path / 'missing weights.pth')!r}: no such file or folder"
    ]
    assert not storage.exists()
