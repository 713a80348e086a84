"""Post-training int8 quantization by name (``raycv.quantizers.QUANTIZERS``); ``quantize`` is
the one entry point
(export, prepare, calibrate, convert); ``save_quantized`` / ``load_quantized`` keep the
result as a ``torch.export`` archive (``.pt2``) that loads without unpickling code.

The flow is PyTorch 2 Export (PT2E) quantization from torchao
(``torchao.quantization.pt2e``). torch 2.14 no longer ships ``quantize_pt2e`` or the
quantizers in ``torch.ao.quantization``, and what is left there (eager and FX
quantization) is deprecated in favour of torchao, PyTorch's own migration path.

The converted model stores its conv and linear weights in int8 (the ``.pt2`` is about 4x
smaller than the fp32 state dict) but computes with quantize -> dequantize -> fp32 op
chains: run eagerly it is slower than fp32 (ResNet-18, one thread, batch 1: 12x at 32 px,
2.6x at 224 px). Its speed needs oneDNN's int8 kernels, which ``torch.compile`` swaps in
only with inductor's freezing on (``torch._inductor.config.freezing = True``): 224 px,
batch 32, one thread, 83 ms against 1304 ms for fp32 eager and 762 ms for fp32 compiled
(a Xeon with AVX-512 VNNI and AMX).
"""

from __future__ import annotations

import copy
import io
import json
import os
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from torchao.quantization.pt2e import (
    allow_exported_model_train_eval,
    move_exported_model_to_eval,
)
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e

from raycv.quantizers import QUANTIZERS

# Exported graphs take any batch size; an example batch of 2 keeps export from
# specialising the batch dimension to 1.
_BATCH = torch.export.Dim("batch", min=1)
_EXAMPLE_BATCH = 2


def quantize(
    model: nn.Module,
    calibration: Iterable[torch.Tensor],
    image_size: int,
    method: str = "int8",
) -> torch.fx.GraphModule:
    """``model`` quantized by ``method`` after observing ``calibration`` batches (float32
    (N, 3, S, S) with S = ``image_size``, preprocessed as for evaluation); ``model`` itself
    is left unchanged.

    The result is an inference-only graph module on the CPU that takes any batch size;
    ``eval()`` and ``train()`` are accepted (and change nothing: BatchNorm is folded), so
    code written for ordinary modules runs it.
    """
    quantizer = QUANTIZERS.get(method)(False)
    model = _on_cpu(model)
    was_training = model.training
    try:
        with torch.no_grad():
            graph = _export(model.eval(), _example(image_size), strict=True).module()
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
            return allow_exported_model_train_eval(_without_unused_tensors(convert_pt2e(prepared)))
    finally:
        model.train(was_training)


def quantize_aware(
    model: nn.Module,
    batches: Callable[[], Iterable[dict[str, torch.Tensor]]],
    loss_of: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    image_size: int,
    epochs: int,
    lr: float,
    method: str = "int8",
) -> torch.fx.GraphModule:
    """``model`` fine-tuned with int8 fake quantization in the forward pass (QAT) for
    ``epochs`` passes over ``batches()`` (training-augmented batches, their loss the task's
    ``loss_of(model, batch)``), then
    converted like ``quantize``'s result; ``model`` itself is left unchanged.

    Runs in this process: PT2E's prepared graph is a training export of the whole model,
    and DDP cannot wrap it the way Ray Train's ``prepare_model`` wraps a module."""
    quantizer = QUANTIZERS.get(method)(True)
    # strict export: torch 2.14's non-strict one splits conv-BN-add so that the x86
    # quantizer's QAT patterns ("more than one output node") refuse ResNet blocks.
    graph = _export(copy.deepcopy(model).cpu().train(), _example(image_size), strict=True)
    prepared = prepare_qat_pt2e(graph.module(), quantizer)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        for batch in batches():
            loss = loss_of(prepared, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    move_exported_model_to_eval(prepared)  # BatchNorm to running statistics
    with torch.no_grad():
        return allow_exported_model_train_eval(_without_unused_tensors(convert_pt2e(prepared)))


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


def load_quantized(path: str | os.PathLike) -> torch.fx.GraphModule:
    """The quantized model saved at ``path``. Archives holding pickled objects are refused
    before anything is unpickled (our rule, as ``torch.load(weights_only=True)``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no quantized model at {path}; write one with save_quantized")
    _check_no_pickles(path)
    return allow_exported_model_train_eval(torch.export.load(path).module())


def _export(
    model: nn.Module, example: torch.Tensor, strict: bool = False
) -> torch.export.ExportedProgram:
    return torch.export.export(model, (example,), dynamic_shapes=({0: _BATCH},), strict=strict)


def _example(image_size: int) -> torch.Tensor:
    return torch.zeros(_EXAMPLE_BATCH, 3, image_size, image_size)


def _on_cpu(model: nn.Module) -> nn.Module:
    # x86 kernels: a model trained elsewhere is quantized from a CPU copy, left in place.
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    return model if on_cpu else copy.deepcopy(model).cpu()


def _without_unused_tensors(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    # The converted graph reads int8 copies of the weights (and biases with BatchNorm folded
    # in) but still holds the fp32 originals, which export would save too.
    used = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    for name, _ in [*graph_module.named_parameters(), *graph_module.named_buffers()]:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(graph_module.get_submodule(owner), attr)
    graph_module.delete_all_unused_submodules()
    return graph_module


def _check_no_pickles(path: Path) -> None:
    """Raise ValueError if loading ``path`` would unpickle anything. ``torch.export.load``
    reads plain tensors as raw bytes and the graph as JSON, but unpickles tensor subclasses,
    custom objects, legacy ``.pt`` weight files, archives in torch 2.7's format and, should
    ``weights_only=True`` fail on them, the sample inputs. ``save_quantized`` writes none."""
    try:
        with zipfile.ZipFile(path) as archive:
            # Records sit under one top-level folder named after the archive.
            records = {name.partition("/")[2]: name for name in archive.namelist()}
            if "archive_format" not in records or not any(r.startswith("models/") for r in records):
                raise ValueError(f"{path} is not a .pt2 archive written by torch.export.save")
            pickled = [r for r, name in records.items() if _is_pickled(r, archive, name)]
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a .pt2 archive written by torch.export.save") from e
    if pickled:
        raise ValueError(
            f"{path} holds pickled objects ({', '.join(pickled)}) that loading would run as "
            "code; only archives of plain tensors load (write them with save_quantized)"
        )


def _is_pickled(record: str, archive: zipfile.ZipFile, name: str) -> bool:
    folder, _, file = record.rpartition("/")
    if folder in ("data/weights", "data/constants"):
        if file.endswith("config.json"):  # one entry per tensor: raw bytes or pickled
            entries = json.loads(archive.read(name))["config"].values()
            return any(entry["use_pickle"] for entry in entries)
        return file.endswith(".pt")  # the legacy format: one pickled state dict
    if folder == "data/sample_inputs":
        try:
            torch.load(io.BytesIO(archive.read(name)), weights_only=True)
        except Exception:  # torch.export.load would retry with weights_only=False
            return True
    return False
