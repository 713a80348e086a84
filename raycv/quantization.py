"""Post-training int8 quantization by name: ``QUANTIZERS`` maps a method to the quantizer
that marks what an exported graph computes in int8; ``quantize`` is the one entry point
(export, prepare, calibrate, convert); ``save_quantized`` / ``load_quantized`` keep the
result as a ``torch.export`` archive (``.pt2``) that loads without unpickling code.

The flow is PyTorch 2 Export (PT2E) quantization from torchao
(``torchao.quantization.pt2e``). torch 2.14 no longer ships ``torch.ao.quantization``'s
``quantize_pt2e`` or its quantizers: they moved to torchao, and what is left of
``torch.ao.quantization`` (eager and FX quantization) is deprecated. torchao is their
supported home, the one PyTorch's own migration notes point to.

The converted model computes with quantize -> dequantize -> fp32 op chains: its weights are
stored in int8 (about 4x smaller), but run eagerly it is slower than fp32. Only
``torch.compile`` (inductor, with freezing) fuses those chains into oneDNN int8 kernels.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import Quantizer
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    X86InductorQuantizer,
    get_default_x86_inductor_quantization_config,
)

from raycv.registry import Registry

QUANTIZERS: Registry[Callable[[], Quantizer]] = Registry("quantizer")

QUANTIZED_FILE = "model.int8.pt2"
# Exported graphs take any batch size; an example batch of 2 keeps export from
# specialising the batch dimension to 1.
_BATCH = torch.export.Dim("batch", min=1)
_EXAMPLE_BATCH = 2


@QUANTIZERS.register("int8")
def x86_int8() -> Quantizer:
    """Static int8 for x86 CPUs (oneDNN kernels through inductor): activations uint8 per
    tensor from histograms of the calibration batches, weights int8 per output channel
    (symmetric); conv, linear, pooling and flatten quantized, BatchNorm folded first."""
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config())
    return quantizer


def quantize(
    model: nn.Module,
    calibration: Iterable[torch.Tensor],
    image_size: int,
    method: str = "int8",
) -> nn.Module:
    """``model`` quantized by ``method`` after observing ``calibration`` batches (float32
    (N, 3, S, S), preprocessed as for evaluation); ``model`` itself is left unchanged.

    The result is an inference-only graph module on the CPU: it takes any batch size, and
    its ``train()``/``eval()`` raise, as for every module ``torch.export`` makes.
    """
    quantizer = QUANTIZERS.get(method)()
    model = _on_cpu(model)
    was_training = model.training
    try:
        with torch.no_grad():
            graph = _export(model.eval(), _example(image_size)).module()
            prepared = prepare_pt2e(graph, quantizer)
            batches = 0
            for images in calibration:
                prepared(images.cpu())
                batches += 1
            if batches == 0:
                raise ValueError(
                    f"{method} quantization needs calibration batches to set its activation "
                    "ranges; pass a few batches of evaluation-preprocessed images"
                )
            return convert_pt2e(prepared)
    finally:
        model.train(was_training)


def save_quantized(model: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a quantized ``model`` to ``path`` (``.pt2``: graph as JSON, weights as raw
    tensor bytes), exported on ``example`` with a dynamic batch dimension."""
    path = Path(path)
    program = _export(model, example)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.export.save(program, f)
    os.replace(tmp, path)  # a crash mid-write never leaves a half file under the real name
    return path


def load_quantized(path: str | os.PathLike) -> nn.Module:
    """The quantized model saved at ``path``. Archives holding pickled objects are refused
    before anything is unpickled (our rule, as ``torch.load(weights_only=True)``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no quantized model at {path}; write one with save_quantized")
    _check_no_pickles(path)
    return torch.export.load(path).module()


def _export(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    return torch.export.export(model, (example,), dynamic_shapes=({0: _BATCH},))


def _example(image_size: int) -> torch.Tensor:
    return torch.zeros(_EXAMPLE_BATCH, 3, image_size, image_size)


def _on_cpu(model: nn.Module) -> nn.Module:
    # x86 kernels: a model trained elsewhere is quantized from a CPU copy, left in place.
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    return model if on_cpu else copy.deepcopy(model).cpu()


def _check_no_pickles(path: Path) -> None:
    """Raise ValueError if loading ``path`` would unpickle anything. ``torch.export.load``
    stores plain tensors as raw bytes but unpickles tensor subclasses, custom objects,
    legacy ``.pt`` weight files and, should ``weights_only=True`` fail on them, the sample
    inputs; an archive from ``save_quantized`` holds none of these."""
    with zipfile.ZipFile(path) as archive:
        # Records sit under one top-level folder named after the archive.
        records = {name.partition("/")[2]: name for name in archive.namelist()}
        if archive.read(records["archive_format"]).decode() != "pt2":
            raise ValueError(f"{path} is not a torch.export .pt2 archive")
        for record, name in records.items():
            folder, _, file = record.rpartition("/")
            if folder in ("data/weights", "data/constants") and file.endswith("config.json"):
                entries = json.loads(archive.read(name))["config"].values()
                pickled = [e["path_name"] for e in entries if e["use_pickle"]]
                pickled += [e["path_name"] for e in entries if not e["tensor_meta"]]
            elif folder in ("data/weights", "data/constants") and file.endswith(".pt"):
                pickled = [file]
            elif folder == "data/sample_inputs":
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                    pickled = []
                except pickle.UnpicklingError:
                    pickled = [file]
            else:
                continue
            if pickled:
                raise ValueError(
                    f"{path} holds pickled objects ({', '.join(sorted(set(pickled)))}) that "
                    "loading would run as code; only archives of plain tensors load "
                    "(write them with raycv.quantization.save_quantized)"
                )
