"""Every registered model trains at its smallest valid size: forward, loss, backward, and
a finite gradient for every parameter; heads are replaced per family; sizes are checked."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from raycv.config import ConfigError, from_dict
from raycv.models import (
    INCEPTION_AUX_MIN_SIZE,
    MODELS,
    check_input_size,
    create_model,
    replace_heads,
)
from raycv.tasks import build_task, total
from raycv.tasks.classification import AUX_LOSS_WEIGHT

NUM_CLASSES = 5
# Several seconds each for a forward and backward pass on two shared CPU cores (the VGGs
# initialise and differentiate a 100 M-parameter classifier even at 32 px).
SLOW = {
    "convnext_tiny",
    "efficientnet_b0",
    "inception_v3",
    "mobilenet_v3_large",
    "resnet50",
    "vgg11_bn",
    "vgg16_bn",
    "vit_b_16",
    "deeplabv3_resnet50",
    "fcn_resnet50",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
    "ssd300_vgg16",
}


def by_cost(names) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def task_for(name: str, **train):
    """The task of ``name``'s registry entry, built from a config of that model."""
    spec = MODELS.get(name)
    model = {"name": name, "image_size": smallest_size(name)}
    raw = {"task": spec.task, "model": model, "train": {"batch_size": 2, **train}}
    cfg = from_dict(raw)
    background = ["background"] if spec.task == "segmentation" else []
    return build_task(cfg, background + [f"c{i}" for i in range(NUM_CLASSES - len(background))])


def random_batch(task_name: str, size: int) -> dict[str, torch.Tensor]:
    if task_name == "detection":  # a box of the last class on each image, one padding row
        boxes = torch.tensor([[[2.0, 2.0, size / 2, size / 2], [0.0, 0.0, 0.0, 0.0]]] * 2)
        labels = torch.tensor([[NUM_CLASSES - 1, -1]] * 2)
        return {"image": torch.randn(2, 3, size, size), "boxes": boxes, "labels": labels}
    if task_name == "segmentation":
        mask = torch.randint(0, NUM_CLASSES, (2, size, size), dtype=torch.uint8)
        return {"image": torch.randn(2, 3, size, size), "mask": mask}
    return {"image": torch.randn(2, 3, size, size), "label": torch.tensor([0, NUM_CLASSES - 1])}


def smallest_size(name: str) -> int:
    """The spec's minimum, rounded up to the patch (ViT) or to 32."""
    spec = MODELS.get(name)
    step = spec.patch or 32
    return math.ceil(spec.min_size / step) * step


def head(model: nn.Module, path: str) -> nn.Linear:
    layer = model.get_submodule(path)
    assert isinstance(layer, nn.Linear), f"{path} is {type(layer).__name__}, not Linear"
    return layer


def test_slow_list_names_registered_models():
    assert set(MODELS.names()) >= SLOW
    assert set(MODELS.names()) - SLOW, "keep a few models in the fast set"


@pytest.mark.parametrize("name", by_cost(MODELS.names()))
def test_forward_backward_gives_every_parameter_a_gradient(name):
    torch.manual_seed(0)
    size = smallest_size(name)
    check_input_size(name, size)  # the size the test picks is a valid one
    model = create_model(name, num_classes=NUM_CLASSES, image_size=size).train()
    task = task_for(name)
    batch = random_batch(MODELS.get(name).task, size)

    outputs = task.forward(model, batch)
    loss = total(task.loss(outputs, batch))
    loss.backward()

    if "boxes" not in batch:  # a detector's training output is its losses alone
        logits = task.logits(outputs)
        assert logits.shape[:2] == (2, NUM_CLASSES)
    if "mask" in batch:  # segmentation: a score map per pixel
        assert logits.shape[2:] == batch["image"].shape[2:]
    assert loss.ndim == 0 and torch.isfinite(loss)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params
    missing = [n for n, p in params if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    not_finite = [n for n, p in params if not torch.isfinite(p.grad).all()]
    assert not not_finite, f"non-finite gradient for {not_finite[:5]}"
    assert sum(p.grad.abs().sum().item() for _, p in params) > 0
    if MODELS.get(name).built_heads:
        return  # a detector's class layers come built for the class count, in several shapes
    for path in MODELS.get(name).heads:
        try:
            layer = model.get_submodule(path)
        except AttributeError:  # Inception's auxiliary head, absent below 299 px
            assert name == "inception_v3" and size < INCEPTION_AUX_MIN_SIZE
            continue
        outputs = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        assert outputs == NUM_CLASSES


def test_inception_below_299_has_no_aux_head():
    model = create_model("inception_v3", num_classes=NUM_CLASSES, image_size=96)
    assert model.aux_logits is False and model.AuxLogits is None


@pytest.mark.slow
def test_inception_at_299_trains_with_its_aux_logits():
    torch.manual_seed(0)
    size = INCEPTION_AUX_MIN_SIZE
    model = create_model("inception_v3", num_classes=NUM_CLASSES, image_size=size).train()
    assert model.aux_logits is True
    labels = torch.tensor([1, 3])
    outputs = model(torch.randn(2, 3, size, size))

    assert outputs.logits.shape == outputs.aux_logits.shape == (2, NUM_CLASSES)
    task = task_for("inception_v3")
    loss = total(task.loss(outputs, {"label": labels}))
    main = F.cross_entropy(outputs.logits, labels)
    aux = F.cross_entropy(outputs.aux_logits, labels)
    assert task.logits(outputs) is outputs.logits
    assert not torch.isclose(loss, main)
    torch.testing.assert_close(loss, main + AUX_LOSS_WEIGHT * aux)

    loss.backward()
    aux_head = head(model, "AuxLogits.fc")
    assert aux_head.weight.grad is not None and aux_head.weight.grad.abs().sum() > 0

    with torch.no_grad():
        eval_out = model.eval()(torch.randn(1, 3, size, size))
    assert isinstance(eval_out, torch.Tensor) and eval_out.shape == (1, NUM_CLASSES)


def test_classification_loss_of_plain_logits_is_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    labels = torch.tensor([0, 2])
    task = task_for("resnet18")
    loss = total(task.loss(logits, {"label": labels}))
    assert task.logits(logits) is logits
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    smoothed = total(task_for("resnet18", label_smoothing=0.1).loss(logits, {"label": labels}))
    torch.testing.assert_close(smoothed, F.cross_entropy(logits, labels, label_smoothing=0.1))
    assert not torch.isclose(smoothed, loss)


# ------------------------------------------------------------------ input sizes


@pytest.mark.parametrize(
    ("name", "size", "weights", "message"),
    [
        (
            "inception_v3",
            74,
            None,
            "model.image_size=74 is too small for inception_v3; use at least 75",
        ),
        ("resnet18", 16, None, "model.image_size=16 is too small for resnet18; use at least 32"),
        ("vit_b_16", 8, None, "model.image_size=8 is too small for vit_b_16; use at least 16"),
        ("vit_b_16", 40, None, "model.image_size=40 must be a multiple of 16 for vit_b_16"),
        ("vit_b_16", 64, "DEFAULT", "model.image_size=64: vit_b_16 weights need 224 px inputs"),
    ],
)
def test_check_input_size_errors(name, size, weights, message):
    with pytest.raises(ValueError) as info:
        check_input_size(name, size, weights)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("name", "size", "weights"),
    [
        ("inception_v3", 75, None),
        ("resnet18", 32, None),
        ("vit_b_16", 48, None),
        ("vit_b_16", 224, "DEFAULT"),
        ("resnet18", 64, "DEFAULT"),  # only ViT weights fix the size
        ("not_a_model", 1, None),  # the registry check reports unknown names
    ],
)
def test_check_input_size_accepts(name, size, weights):
    assert check_input_size(name, size, weights) is None


def test_unknown_model_lists_the_registered_ones():
    with pytest.raises(KeyError, match="unknown model 'resnet9'; choose one of: convnext_tiny"):
        create_model("resnet9", num_classes=3)


# ------------------------------------------------------------------ replace_heads

FAMILIES = [
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "convnext_tiny",
    pytest.param("vgg11_bn", marks=pytest.mark.slow),  # 129 M parameters to initialise
    pytest.param("vit_b_16", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name", FAMILIES)
def test_replace_heads_resizes_every_head(name):
    spec = MODELS.get(name)
    model = torchvision.models.get_model(spec.builder, weights=None, num_classes=1000)
    before = {path: head(model, path) for path in spec.heads}
    assert all(layer.out_features == 1000 for layer in before.values())

    replace_heads(model, spec, 7)

    for path, old in before.items():
        new = head(model, path)
        assert new is not old
        assert (new.in_features, new.out_features) == (old.in_features, 7)


def test_replace_heads_resizes_both_inception_heads():
    spec = MODELS.get("inception_v3")
    model = torchvision.models.get_model(
        spec.builder, weights=None, num_classes=1000, aux_logits=True, init_weights=False
    )
    replace_heads(model, spec, 7)
    assert head(model, "fc").out_features == 7
    assert head(model, "AuxLogits.fc").out_features == 7


def test_replace_heads_skips_a_missing_aux_head():
    spec = MODELS.get("inception_v3")
    model = torchvision.models.get_model(
        spec.builder, weights=None, num_classes=1000, aux_logits=False, init_weights=False
    )
    replace_heads(model, spec, 7)
    assert head(model, "fc").out_features == 7 and model.AuxLogits is None


def test_replace_heads_keeps_a_head_that_already_fits():
    spec = MODELS.get("resnet18")
    model = torchvision.models.get_model(spec.builder, weights=None, num_classes=7)
    fc = model.fc
    replace_heads(model, spec, 7)
    assert model.fc is fc


def test_model_with_replaced_head_predicts_the_new_classes():
    spec = MODELS.get("resnet18")
    model = torchvision.models.get_model(spec.builder, weights=None, num_classes=1000).eval()
    replace_heads(model, spec, 7)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_torchvision_weights_load_offline_from_the_torch_home_cache(tmp_path, monkeypatch):
    """The real torchvision loading path, fed by a weights file written where torchvision's
    cache expects it (no download): backbone weights arrive, the head is replaced."""

    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    source = torchvision.models.resnet18(num_classes=1000)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(source.state_dict(), cache / weights.url.rsplit("/", 1)[-1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    model = create_model("resnet18", num_classes=5, weights="IMAGENET1K_V1", image_size=64)

    assert model.fc.out_features == 5
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)


def test_unknown_weights_name_is_refused_before_ray_starts():
    with pytest.raises(ConfigError, match=r"model\.weights='NOPE'.*IMAGENET1K_V1"):
        from_dict({"model": {"name": "resnet18", "weights": "NOPE"}})
