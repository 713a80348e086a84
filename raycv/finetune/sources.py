"""Where pretrained weights come from (``finetune.source``) and how they go into a model
built for the target classes.

A source is a torchvision weights name (read through torchvision's own cache, so it
works offline once the file is there), a raycv artifact (run folder or checkpoint), or a
state-dict file (``.pt``, ``.pth``, ``.safetensors``). Its weights fill the backbone; the
heads (``ModelSpec.heads``) are always fresh layers for the target classes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.parse import urlparse

import torch
from torch import nn

from raycv import checkpoint
from raycv.config import Config, ConfigError, validate
from raycv.models import MODELS, create_model, replace_heads
from raycv.pruning import fit_to_state_dict
from raycv.registry import Registry

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
_SHOWN = 5  # layer names quoted in an error


@dataclass(frozen=True)
class Preprocessing:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int | None  # the crop the model sees (None: segmentation presets have none)
    resize: int | None  # the side images are resized to before that crop


@dataclass
class Source:
    ref: str  # what the config keeps: a weights name or an absolute file path
    state_dict: StateDict
    model_name: str | None = None  # the architecture it was trained as, when known
    class_names: list[str] | None = None
    preprocessing: Preprocessing | None = None


# file suffix -> loader of a state-dict file
FILE_LOADERS: Registry[Callable[[Path], Source]] = Registry("weights file type")


def resolve_source(text: str, model_name: str) -> Source:
    """Read the weights ``text`` names for a ``model_name`` model."""
    path = Path(text).expanduser()
    if path.is_dir():
        from raycv.artifacts import checkpoint_file

        return _raycv_checkpoint(checkpoint_file(path).resolve())
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in FILE_LOADERS:
            raise ConfigError(
                f"finetune.source={text!r}: unknown file type {suffix!r}; use one of: "
                f"{', '.join(FILE_LOADERS)}"
            )
        return FILE_LOADERS.get(suffix)(path.resolve())
    if "/" in text or path.suffix.lower() in FILE_LOADERS:
        raise FileNotFoundError(f"finetune.source={text!r}: no such file or folder")
    return _torchvision(text, model_name)


def _raycv_checkpoint(path: Path, saved: dict[str, Any] | None = None) -> Source:
    saved = saved if saved is not None else checkpoint.load(path)
    cfg = saved["config"]
    return Source(
        ref=str(path),
        state_dict=saved["model"],
        model_name=cfg["model"]["name"],
        class_names=list(saved["class_names"]),
        preprocessing=Preprocessing(
            tuple(cfg["augment"]["mean"]),
            tuple(cfg["augment"]["std"]),
            cfg["model"]["image_size"],
            cfg["data"]["working_size"],
        ),
    )


@FILE_LOADERS.register(".pt")
@FILE_LOADERS.register(".pth")
def _torch_file(path: Path) -> Source:
    saved = checkpoint.load(path)  # checksum checked when recorded; never runs pickled code
    if isinstance(saved, dict) and {"model", "config", "class_names"} <= saved.keys():
        return _raycv_checkpoint(path, saved)  # one of ours, with its config
    for key in ("state_dict", "model"):  # common wrappers of a plain state dict
        if isinstance(saved, dict) and isinstance(saved.get(key), dict):
            saved = saved[key]
    return Source(str(path), _tensors_only(saved, path))


@FILE_LOADERS.register(".safetensors")
def _safetensors_file(path: Path) -> Source:
    from safetensors.torch import load_file

    return Source(str(path), load_file(str(path), device="cpu"))


def _tensors_only(saved: Any, path: Path) -> StateDict:
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise ConfigError(f"finetune.source={str(path)!r} holds no state dict of tensors")
    return saved


def _torchvision(name: str, model_name: str) -> Source:
    import torchvision

    enum = torchvision.models.get_model_weights(MODELS.get(model_name).builder)
    enum_name, _, member = name.rpartition(".")
    if enum_name not in ("", enum.__name__) or member not in enum.__members__:
        names = ", ".join(f"{enum.__name__}.{m}" for m in enum.__members__)
        raise ConfigError(
            f"finetune.source={name!r} is not a file, a folder or a weights name of "
            f"{model_name}; weights names: {names}"
        )
    weights = enum[member]  # DEFAULT resolves to the recommended weights
    preset = weights.transforms()
    # A detector's weights normalise inside the model (ImageNet's, as raycv's presets do)
    # and take any size: nothing for the config to follow.
    preprocessing = None
    if hasattr(preset, "mean"):
        preprocessing = Preprocessing(
            tuple(preset.mean),
            tuple(preset.std),
            preset.crop_size[0] if hasattr(preset, "crop_size") else None,
            preset.resize_size[0] if hasattr(preset, "crop_size") else None,
        )
    return Source(
        ref=f"{enum.__name__}.{weights.name}",
        state_dict=_cached_download(weights.url),
        model_name=model_name,
        class_names=list(weights.meta.get("categories") or []) or None,
        # Segmentation presets resize only (to 520 px): the config's own size stays.
        preprocessing=preprocessing,
    )


def _cached_download(url: str) -> StateDict:
    """torchvision's own cache (``$TORCH_HOME/hub/checkpoints``): read when there, else
    downloaded into it."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=not cached.exists(), weights_only=True
        )
    except (URLError, OSError) as e:
        raise FileNotFoundError(
            f"could not download {url} ({e}); offline, copy the file to {cached} "
            "(torchvision's cache under TORCH_HOME)"
        ) from e


# ---------------------------------------------------------------- into the target model


def transplant(model: nn.Module, model_name: str, num_classes: int, state_dict: StateDict) -> None:
    """Load ``state_dict`` into ``model`` (built for ``num_classes``), then give it fresh
    heads. A channel-pruned source resizes the model's layers to its widths. Raises
    ConfigError naming the layers when the weights do not belong to this architecture."""
    spec = MODELS.get(model_name)
    heads = tuple(f"{h}." for h in spec.heads)
    own = model.state_dict()
    # An optional head's whole branch (Inception's AuxLogits, dropped below 299 px) may be
    # in the source and not in the model: it is a head, not a mismatch.
    branches = tuple(f"{h.split('.')[0]}." for h in spec.heads if "." in h)
    source = {k: v for k, v in state_dict.items() if k in own or not k.startswith(branches)}
    body = {k: v for k, v in source.items() if not k.startswith(heads)}
    # BatchNorm's step counter is absent from FrozenBatchNorm weights (torchvision's detectors)
    # and matters only without a momentum: not a layer the source lacks.
    counters = "num_batches_tracked"
    missing = [
        k for k in own if k not in source and not k.startswith(heads) and not k.endswith(counters)
    ]
    unexpected = [k for k in body if k not in own]
    larger = [k for k in body if k in own and _grows(body[k].shape, own[k].shape)]
    for names, problem in (
        (missing, "lacks layers of {model}"),
        (unexpected, "has layers {model} lacks"),
        (larger, "has layers wider than {model}'s"),
    ):
        if names:
            raise ConfigError(
                f"finetune.source does not fit {model_name}: it "
                f"{problem.format(model=model_name)}: {_listed(names)}; was it trained as "
                "another model? set model.name to that model"
            )
    if spec.built_heads:  # the heads stay as built for num_classes: fresh, and shaped right
        fit_to_state_dict(model, {**own, **body})
        return
    fit_to_state_dict(model, {**own, **source})  # pruned widths, the source's head shapes
    replace_heads(model, spec, num_classes, fresh=True)


def is_backbone_transfer(source: Source, cfg: Config) -> bool:
    """A classifier's weights going into a model of another task (a segmenter's encoder)."""
    known = source.model_name in MODELS
    return known and MODELS.get(source.model_name).task != MODELS.get(cfg.model.name).task


def transplant_backbone(model: nn.Module, cfg: Config, source: Source) -> None:
    """Fill ``model``'s backbone (its registry entry's ``backbone``) from a classifier's
    weights; the decoder and heads stay as built. Raises ConfigError in one line when the
    classifier is not the backbone's architecture or leaves part of it unfilled."""
    spec = MODELS.get(cfg.model.name)
    wanted = spec.backbone and (spec.backbone.model or cfg.model.encoder or spec.encoder)
    if not wanted or source.model_name != wanted:
        fix = f"train a {wanted} classifier first" if wanted else "it has no backbone to fill"
        raise ConfigError(
            f"finetune.source is a {source.model_name} classifier; {cfg.model.name}'s backbone "
            f"is {wanted or 'not a classifier'}: {fix}"
        )
    b, own = spec.backbone, model.state_dict()
    moved = {
        b.target_prefix + k.removeprefix(b.source_prefix): v
        for k, v in source.state_dict.items()
        if k.startswith(b.source_prefix)
    }
    moved = {k: v for k, v in moved.items() if k in own}  # the classifier's head, unused stages
    unfilled = [k for k in own if k.startswith(b.target_prefix) and k not in moved]
    if unfilled:
        raise ConfigError(
            f"finetune.source does not fill {cfg.model.name}'s backbone: it lacks "
            f"{_listed(unfilled)}"
        )
    fit_to_state_dict(model, {**own, **moved})  # a channel-pruned source keeps its widths
    log.info("backbone of %s filled from %s (%d tensors)", cfg.model.name, source.ref, len(moved))


def _grows(source: torch.Size, target: torch.Size) -> bool:
    return len(source) != len(target) or any(s > t for s, t in zip(source, target))


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def load_source_weights(model: nn.Module, cfg: Config, num_classes: int) -> None:
    """On a worker: fill ``model`` from ``cfg.finetune.source`` (already resolved)."""
    source = resolve_source(cfg.finetune.source, cfg.model.name)
    if is_backbone_transfer(source, cfg):
        transplant_backbone(model, cfg, source)
    else:
        transplant(model, cfg.model.name, num_classes, source.state_dict)


def apply_source(cfg: Config) -> Config:
    """On the driver, before Ray starts: resolve ``finetune.source``, take the model name
    and preprocessing (mean, std, input size, resize side) from it where the config does
    not set them, and check that the weights fit, so that a bad source fails in one line
    and early."""
    if not cfg.finetune.source:
        return cfg
    source = resolve_source(cfg.finetune.source, cfg.model.name)
    raw = cfg.model_dump(mode="json")
    raw["finetune"]["source"] = source.ref
    if is_backbone_transfer(source, cfg):
        return _backbone_source(cfg, source, raw)
    if source.model_name and source.model_name != cfg.model.name:
        if "name" in cfg.model.model_fields_set:
            raise ConfigError(
                f"finetune.source was trained as {source.model_name}, but model.name="
                f"{cfg.model.name}; set model.name={source.model_name} or leave it out"
            )
        raw["model"]["name"] = source.model_name
    pre = source.preprocessing
    if pre:
        for section, key, value in (
            ("augment", "mean", list(pre.mean)),
            ("augment", "std", list(pre.std)),
            ("model", "image_size", pre.image_size),
            ("data", "working_size", pre.resize),
        ):
            if value is not None and key not in getattr(cfg, section).model_fields_set:
                raw[section][key] = value
    resolved = validate(raw)
    m = resolved.model
    probe = create_model(m.name, 2, None, m.image_size, m.encoder)
    transplant(probe, resolved.model.name, 2, source.state_dict)
    log.info("fine-tuning from %s", source.ref)
    return resolved


def _backbone_source(cfg: Config, source: Source, raw: dict[str, Any]) -> Config:
    """A classifier into a segmenter: its normalisation where the config sets none (its
    input size suits classification, not this task), and a probe that the weights fit."""
    pre = source.preprocessing
    for key, value in (("mean", pre and pre.mean), ("std", pre and pre.std)):
        if value is not None and key not in cfg.augment.model_fields_set:
            raw["augment"][key] = list(value)
    resolved = validate(raw)
    m = resolved.model
    transplant_backbone(create_model(m.name, 2, None, m.image_size, m.encoder), resolved, source)
    log.info("fine-tuning %s's backbone from %s", m.name, source.ref)
    return resolved
