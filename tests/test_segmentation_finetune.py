"""Fine-tuning segmenters: from torchvision's segmentation weights (read from a weights file
written where torchvision's cache expects it: no download), and from a raycv
classification run's backbone into a U-Net encoder or a DeepLab backbone."""

from __future__ import annotations

import pytest
import torch
import torchvision

from raycv.config import ConfigError, from_dict
from raycv.finetune.sources import apply_source
from raycv.loop import build_model

SEG_CLASSES = 3


def seg_config(tmp_path, **model) -> dict:
    return {
        "task": "segmentation",
        "model": {"image_size": 64, **model},
        "train": {"batch_size": 4},
        "run": {"storage": str(tmp_path / "runs")},
    }


def test_torchvision_segmentation_weights_from_the_torch_home_cache(tmp_path, monkeypatch):
    weights = torchvision.models.segmentation.LRASPP_MobileNet_V3_Large_Weights.DEFAULT
    torch.manual_seed(0)
    published = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        num_classes=len(weights.meta["categories"]), weights_backbone=None
    )
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(published.state_dict(), cache / weights.url.rsplit("/", 1)[-1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    raw = seg_config(tmp_path, name="lraspp_mobilenet_v3_large")
    raw["finetune"] = {"source": "DEFAULT"}
    cfg = apply_source(from_dict(raw))
    assert cfg.finetune.source == "LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1"
    assert cfg.model.image_size == 64  # a segmentation preset has no crop size to impose

    model = build_model(cfg, SEG_CLASSES)
    own = model.state_dict()
    assert torch.equal(own["backbone.0.0.weight"], published.state_dict()["backbone.0.0.weight"])
    for head in ("classifier.low_classifier", "classifier.high_classifier"):
        layer = model.get_submodule(head)
        assert layer.out_channels == SEG_CLASSES  # the heads were replaced for our classes
    out = model.eval()(torch.randn(2, 3, 64, 64))["out"]
    assert out.shape == (2, SEG_CLASSES, 64, 64)


@pytest.fixture
def resnet18_run(tmp_path, smoke, briefly_trained, save_checkpoint):
    cfg = from_dict(smoke())
    model = briefly_trained(cfg, lambda p: torch.optim.SGD(p, lr=0.05), steps=2)
    file = save_checkpoint(tmp_path / "cls" / "best", cfg, model, {"epoch": 1})
    return file, model


def test_classification_backbone_fills_a_unet_encoder(tmp_path, resnet18_run):
    file, classifier = resnet18_run
    raw = seg_config(tmp_path, name="unet", encoder="resnet18")
    raw["finetune"] = {"source": str(file)}
    cfg = apply_source(from_dict(raw))
    assert cfg.model.name == "unet"  # a classifier's name does not replace the segmenter's

    model = build_model(cfg, SEG_CLASSES)
    own, trained = model.state_dict(), classifier.state_dict()
    for key in ("conv1.weight", "layer4.1.conv2.weight", "layer2.0.bn1.running_mean"):
        assert torch.equal(own[f"encoder.{key}"], trained[key]), key
    assert model.segmentation_head[0].out_channels == SEG_CLASSES
    fresh = build_model(from_dict(seg_config(tmp_path, name="unet")), SEG_CLASSES).state_dict()
    decoder = [k for k in own if k.startswith("decoder.")]
    assert decoder and all(torch.equal(own[k], fresh[k]) for k in decoder)  # left as built


def test_a_classifier_of_another_architecture_is_refused_in_one_line(tmp_path, resnet18_run):
    file, _ = resnet18_run
    raw = seg_config(tmp_path, name="unet", encoder="resnet34")
    raw["finetune"] = {"source": str(file)}
    with pytest.raises(ConfigError) as info:
        apply_source(from_dict(raw))
    assert str(info.value) == (
        "finetune.source is a resnet18 classifier; unet's backbone is resnet34: "
        "train a resnet34 classifier first"
    )


def test_mobilenet_classifier_fills_a_deeplab_backbone(tmp_path, smoke, save_checkpoint):
    """MobileNet keeps its trunk under ``features.``, DeepLab under ``backbone.``."""
    cfg = from_dict(smoke(model={"name": "mobilenet_v3_large", "image_size": 32}))
    torch.manual_seed(3)
    classifier = build_model(cfg, 4)
    file = save_checkpoint(tmp_path / "mobile" / "best", cfg, classifier, {"epoch": 1})
    raw = seg_config(tmp_path, name="deeplabv3_mobilenet_v3_large")
    raw["finetune"] = {"source": str(file)}
    model = build_model(apply_source(from_dict(raw)), SEG_CLASSES)
    own, trained = model.state_dict(), classifier.state_dict()
    assert torch.equal(own["backbone.16.0.weight"], trained["features.16.0.weight"])
    assert model.classifier[4].out_channels == SEG_CLASSES
