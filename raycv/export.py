"""``raycv export``: a trained model as files that load without raycv's training code, each
checked against PyTorch before it ships, with a model card saying how to feed it.

The export run folder holds:

* ``model.pt``: ``{"model": state_dict, "class_names", "config", "metrics"}``, readable with
  ``torch.load(..., weights_only=True)`` and by ``raycv.artifacts.load_trained(folder)``
  (which restores a pruned model's narrower layers).
* ``model.torchscript.pt``: the model traced on one (1, 3, S, S) image.
* ``model.onnx``: input ``image`` float32, one output shaped as the task says
  (``Task.export_spec``): a classifier's ``logits`` (batch, 3, S, S) -> (batch, C), a
  segmenter's (batch, 3, height, width) -> (batch, C, height, width), a detector's
  ``detections`` (batch, anchors, 4 + C) before NMS. The batch dimension is dynamic,
  and a segmenter's height and width too.
* ``model_card.json`` / ``model_card.md``: classes, the exact preprocessing, metrics,
  lineage, file sizes, the export checks and how to load each file.
* ``manifest.json`` (kind ``export``), written last: status ``finished`` only when both
  exports match PyTorch within the task's atol + ``RTOL`` x |logit| at every size it checks
  (two for dynamic sides).

Both files hold the model as ``Task.exportable`` wraps it: one tensor out (a torchvision
segmenter's ``out`` map, not its ``{"out", "aux"}`` dict; a detector's boxes and scores
before NMS, whose settings the card gives).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raycv import checkpoint
from raycv.artifacts import load_trained, read_manifest
from raycv.config import Config, dump_config
from raycv.data.augment import EvalPreset, build_preset
from raycv.models import MODELS
from raycv.runs import RunFolder, code_version, write_json, write_manifest
from raycv.tasks import TASKS, build_task
from raycv.tasks.base import ExportSpec

log = logging.getLogger(__name__)

STATE_DICT_FILE = "model.pt"
TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
INPUT_NAME = "image"

# An export ships only if every logit satisfies |export - pytorch| <= atol + RTOL * |pytorch|,
# atol the task's (``ExportSpec.atol``, 1e-4 for logits).
RTOL = 1e-3
CHECK_BATCH = 4
CHECK_SEED = 0
# ONNX files are one protobuf, capped at 2 GiB; larger weights go to model.onnx.data.
ONNX_SINGLE_FILE_BYTES = 1 << 30
# The source checkpoint file sits at most this deep below its run folder
# (a sweep's: trials/<trial>/checkpoints/epoch_NNNN/checkpoint.pt).
_RUN_FOLDER_DEPTH = 5
# Source metrics shown in the model card, in this order, when the checkpoint has them.
CARD_METRICS = (
    "epoch",
    "val_acc",
    "val_acc5",
    "val_miou",
    "val_pixel_acc",
    "val_map",
    "val_map50",
    "val_loss",
    "params",
    "nonzero_params",
    "macs",
    "latency_ms",
    "latency_threads",
)


def run_export(artifact: str | Path, run: RunFolder | None = None) -> RunFolder:
    """Export the model of ``artifact`` (any run folder, checkpoint folder or checkpoint file)
    as a state dict, TorchScript and ONNX, verified against PyTorch; returns the run folder."""
    trained = load_trained(artifact)
    cfg, model = trained.config, trained.model
    task = build_task(cfg, trained.class_names)
    exported = task.exportable(model).eval()  # refuses a model it cannot export, first
    if run is None:
        run = RunFolder.create(cfg.run.storage, cfg.experiment, "export")
    if not run.config.is_file():
        run.config.write_text(dump_config(cfg))
    source_run = run_folder_of(trained.checkpoint)
    parent = str((source_run or trained.checkpoint).resolve())
    source_metrics = {
        k: v
        for k, v in trained.metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }

    state = {
        "model": model.state_dict(),
        "class_names": trained.class_names,
        "config": cfg.model_dump(mode="json"),
        "metrics": trained.metrics,
    }
    checkpoint.save(run.path, state, STATE_DICT_FILE)
    model_spec = MODELS.get(cfg.model.name)
    spec = task.export_spec(cfg.model.image_size, model_spec.patch, model_spec.dynamic_sides)
    started = time.perf_counter()
    try:
        export_torchscript(exported, spec, run.path / TORCHSCRIPT_FILE)
        export_onnx(exported, spec, run.path / ONNX_FILE)
        export_s = time.perf_counter() - started
        diffs = verify(exported, run.path / TORCHSCRIPT_FILE, run.path / ONNX_FILE, spec)
    except Exception as e:  # the folder says it failed; a mismatching file never looks shipped
        error = {"error": f"{type(e).__name__}: {e}"}
        write_manifest(run, cfg, "failed", error, kind="export", parent=parent)
        raise

    paths = {"state_dict": STATE_DICT_FILE, "torchscript": TORCHSCRIPT_FILE, "onnx": ONNX_FILE}
    if (run.path / f"{ONNX_FILE}.data").is_file():
        paths["onnx_data"] = f"{ONNX_FILE}.data"
    sizes = {key: _size_mb(run.path / name) for key, name in paths.items()}
    card = model_card(
        cfg, trained.class_names, trained.metrics, trained.checkpoint, source_run, spec
    )
    if hasattr(exported, "postprocess"):  # a detector's NMS, outside the files
        card["postprocess"] = exported.postprocess
    card["files"] = {key: {"path": paths[key], "size_mb": sizes[key]} for key in paths}
    checked = check_shapes(spec.check_sides, spec.fixed_batch)
    shapes = ", ".join(str(tuple(shape)) for shape in checked)
    card["checks"] = {
        **diffs,
        "atol": spec.atol,
        "rtol": RTOL,
        "inputs": f"seeded standard-normal inputs of shapes {shapes}",
    }
    write_json(run.path / CARD_JSON, card)
    (run.path / CARD_MD).write_text(card_markdown(card))
    write_manifest(
        run,
        cfg,
        "finished",
        {
            "paths": {**paths, "model_card": CARD_MD, "model_card_json": CARD_JSON},
            "metrics": {**diffs, "size_mb": sizes, **source_metrics},
            "source_checkpoint": str(trained.checkpoint.resolve()),
            "export_s": round(export_s, 1),
        },
        kind="export",
        parent=parent,
    )
    log.info(
        "exported %s (%d classes) in %.1f s to %s\n  %s\n  max |%s diff| vs PyTorch: "
        "TorchScript %.2g, ONNX %.2g",
        cfg.model.name,
        len(trained.class_names),
        export_s,
        run.path,
        ", ".join(f"{paths[k]} {mb:.1f} MB" for k, mb in sizes.items()),
        spec.output_name,
        diffs["torchscript_max_abs_diff"],
        diffs["onnx_max_abs_diff"],
    )
    return run


# ---------------------------------------------------------------- writing the files


def _example(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(CHECK_SEED))


@contextlib.contextmanager
def _quiet_torchscript() -> Iterator[None]:
    """TorchScript is deprecated in torch 2.14 and every trace, save and load warns so
    (FutureWarning). It is still what libtorch (C++) and older serving stacks load, so we
    export it anyway and keep that warning out of the user's log; other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        # A trace records the input's sizes as constants, and says so wherever code reads
        # them (a detector's grid, torchvision's box clipping): the check at those sizes
        # is what vouches for the file.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="To copy construct from a tensor")
        yield


def export_torchscript(model: nn.Module, spec: ExportSpec, path: Path) -> None:
    """The model traced on one image of the first checked size; sizes are traced as the
    input's own, so a segmenter's TorchScript takes other sizes (``verify`` checks it)."""
    with _quiet_torchscript(), torch.no_grad():
        traced = torch.jit.trace(model, _example((1, 3, *spec.check_sides[0])))
        tmp = path.with_suffix(".tmp")
        torch.jit.save(traced, str(tmp))
    os.replace(tmp, path)


def export_onnx(model: nn.Module, spec: ExportSpec, path: Path) -> None:
    """ONNX with the dynamic dimensions of ``spec`` (the batch, a segmenter's height and
    width), through the torch.export-based (dynamo) exporter.

    Measured on 2 CPU cores (torch 2.14.1, onnxscript 0.7.2, 32 px inputs): resnet18 takes
    2.4-2.9 s with ``dynamo=True`` and 0.25 s with the legacy ``dynamo=False`` exporter;
    mobilenet_v3_small 6 s vs 0.2 s. We still use dynamo: the legacy exporter warns that it
    "will be removed", and an export runs once per model, so seconds are cheap."""
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    try:
        if spec.traced_onnx:
            _traced_onnx(model, spec, path)
            return
        torch.onnx.export(
            model,
            # Batch 2, not 1: torch.export may specialise a size-1 dimension to a constant.
            (_example((2, 3, *spec.check_sides[0])),),
            str(path),
            dynamo=True,
            verbose=False,  # no per-phase progress lines
            input_names=[INPUT_NAME],
            output_names=[spec.output_name],
            dynamic_shapes=({i: torch.export.Dim(name) for i, name in spec.dynamic.items()},),
            external_data=weight_bytes > ONNX_SINGLE_FILE_BYTES,
        )
    except Exception as e:  # the exporter raises many types, all meaning "cannot export"
        raise RuntimeError(
            f"ONNX export of {type(model).__name__} failed ({type(e).__name__}: {e}); "
            "the state dict and TorchScript files are still usable"
        ) from e


def _traced_onnx(model: nn.Module, spec: ExportSpec, path: Path) -> None:
    """The TorchScript-based exporter, which torchvision's two-stage detectors support: it
    records NMS as ONNX's NonMaxSuppression, and the output's named dimensions stay dynamic
    (the number of detections)."""
    dynamic = {i: name for i, name in enumerate(spec.output_shape) if isinstance(name, str)}
    with _quiet_torchscript(), torch.no_grad():
        torch.onnx.export(
            model,
            (_example((spec.fixed_batch or 1, 3, *spec.check_sides[0])),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=[INPUT_NAME],
            output_names=[spec.output_name],
            dynamic_axes={spec.output_name: dynamic},
        )


# ---------------------------------------------------------------- checking the files


def check_shapes(
    sides: Sequence[tuple[int, int]], fixed_batch: int | None = None
) -> list[tuple[int, int, int, int]]:
    """The inputs ``verify`` feeds: a batch of ``CHECK_BATCH`` at each (height, width), and
    one image at the last (a dimension of 1 is where exporters specialise by mistake); a
    file that takes a fixed batch, that batch at each size."""
    if fixed_batch:
        return [(fixed_batch, 3, h, w) for h, w in sides]
    return [(CHECK_BATCH, 3, h, w) for h, w in sides] + [(1, 3, *sides[-1])]


def verify(model: nn.Module, torchscript: Path, onnx: Path, spec: ExportSpec) -> dict[str, float]:
    """Max absolute difference of each saved file's output against ``model``'s on seeded
    random inputs at each (height, width) of ``spec.check_sides``; raises RuntimeError if
    either exceeds ``spec.atol`` (plus RTOL of the value)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    with _quiet_torchscript():
        scripted = torch.jit.load(str(torchscript), map_location="cpu").eval()
    diffs = {"torchscript_max_abs_diff": 0.0, "onnx_max_abs_diff": 0.0}
    for shape in check_shapes(spec.check_sides, spec.fixed_batch):
        batch = _example(shape)
        with torch.no_grad():
            expected = model(batch).numpy()
            with _quiet_torchscript():
                from_script = scripted(batch).numpy()
        from_onnx = session.run([spec.output_name], {INPUT_NAME: batch.numpy()})[0]
        for key, what, actual in (
            ("torchscript_max_abs_diff", "TorchScript", from_script),
            ("onnx_max_abs_diff", "ONNX", from_onnx),
        ):
            diffs[key] = max(diffs[key], _checked_diff(what, shape, actual, expected, spec.atol))
    return diffs


def _checked_diff(
    what: str, shape: tuple[int, ...], actual: np.ndarray, expected: np.ndarray, atol: float
) -> float:
    if actual.shape != expected.shape:
        raise RuntimeError(
            f"the {what} export returns logits of shape {actual.shape} for an input of "
            f"{shape}, PyTorch {expected.shape}; the export is not shipped (manifest status: "
            "failed)"
        )
    if expected.size == 0:  # a detector that found nothing, in both
        return 0.0
    diff = np.abs(actual.astype(np.float64) - expected)
    excess = diff - RTOL * np.abs(expected)
    if not np.all(excess <= atol):  # also catches NaN
        raise RuntimeError(
            f"the {what} export differs from PyTorch by up to {np.nanmax(diff):.3g} in a logit "
            f"for an input of {shape} (allowed: {atol:g} + {RTOL:g} x |logit|); the export is "
            "not shipped (manifest status: failed)"
        )
    return float(diff.max())


def _size_mb(path: Path) -> float:
    return round(path.stat().st_size / 1e6, 3)


# ---------------------------------------------------------------- the model card


def run_folder_of(path: Path) -> Path | None:
    """The nearest folder at or above ``path`` that holds a manifest.json, if any."""
    path = Path(path).resolve()
    start = path if path.is_dir() else path.parent
    for folder in [start, *start.parents][:_RUN_FOLDER_DEPTH]:
        if (folder / "manifest.json").is_file():
            return folder
    return None


def lineage(source_run: Path | None, checkpoint: Path, cfg: Config) -> list[dict[str, Any]]:
    """The artifacts this model came from, nearest first: the source run folder, then each
    manifest's ``parent`` while it is a local folder with a manifest, then the fine-tune
    source named in the config."""
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    node: Path | None = source_run
    if node is None:
        chain.append({"path": str(checkpoint.resolve()), "kind": "checkpoint"})
        seen.add(chain[-1]["path"])
    while node is not None and str(node) not in seen:
        seen.add(str(node))
        manifest = read_manifest(node) or {}
        chain.append(
            {
                "path": str(node),
                "kind": manifest.get("kind"),
                "status": manifest.get("status"),
                "model": manifest.get("model"),
                "code_version": manifest.get("code_version"),
            }
        )
        parent = manifest.get("parent")
        if not parent:
            break
        node = run_folder_of(Path(parent)) if "://" not in parent else None
        if node is None and parent not in seen:  # not local, or no manifest: named, not followed
            chain.append({"path": parent, "kind": None})
            seen.add(parent)
    # The finetune section is new; configs from before it have none.
    source = getattr(getattr(cfg, "finetune", None), "source", None)
    if source and str(source) not in seen:
        chain.append({"path": str(source), "kind": "finetune source"})
    return chain


# whole_frame -> how a file becomes the working-size square: (raycv.data.images function,
# the step in words, the resize in short)
_FIT = {
    False: (
        "decode",
        "resize the shorter side to {w} px (bilinear) and centre-crop to {w}x{w} "
        "(PIL ImageOps.fit)",
        "shorter side to the working size, then centre crops",
    ),
    True: (
        "decode_whole",
        "resize the whole image to {w}x{w} (bilinear; its aspect ratio is not kept)",
        "the whole image squeezed to the working size, then to the input size",
    ),
}


def preprocessing(cfg: Config, fit: str | None = None) -> dict[str, Any]:
    """The evaluation path (``raycv.data.images.decode``, or ``decode_whole`` where the task
    scores whole frames, then the eval preset), in words and numbers, so another runtime
    can feed the model the same pixels; ``fit``: the task's words for how the file becomes
    the input square (``ExportSpec.fit``), instead of the preset's resize and crop."""
    working, size = cfg.working_size, cfg.model.image_size
    whole = TASKS.get(cfg.task).whole_frame
    decode, squeeze, resize = _FIT[whole]
    preset = build_preset(cfg.augment.eval_preset, cfg.augment, size, whole_frame=whole)
    steps = [
        "decode the file with PIL, apply its EXIF orientation, convert to RGB "
        "(palette, greyscale and CMYK converted; transparency composited on white)",
        squeeze.format(w=working),
    ]
    if fit is not None:
        steps[-1:] = [fit, *_scaling_steps(cfg.augment)]
    elif isinstance(preset, EvalPreset):
        steps += _eval_preset_steps(preset, working)
    else:
        steps.append(f"apply the {cfg.augment.eval_preset!r} preset of raycv.data.augment")
    steps.append(f"stack as float32 NCHW (N, 3, {size}, {size}), channels in RGB order")
    return {
        "input_size": size,
        "working_size": working,
        "resize": resize,
        "crop": None if whole else size,
        "mean": list(cfg.augment.mean),
        "std": list(cfg.augment.std),
        "layout": "NCHW float32 RGB",
        "steps": steps,
        "code": (
            f"raycv.data.images.{decode}(bytes, path, working_size), then "
            "raycv.data.augment.build_preset(cfg.augment.eval_preset, cfg.augment, "
            f"input_size, whole_frame={whole}) on the batch, then "
            "raycv.data.augment.normalize(torch.from_numpy(batch['image']), cfg.augment)"
        ),
    }


def _eval_preset_steps(preset: EvalPreset, working: int) -> list[str]:
    """The eval preset on a working-size square: a resize where the sizes differ, the
    centre crop unless it shows the whole frame, then the scaling."""
    size, cfg = preset.image_size, preset.cfg
    resized = size if preset.whole_frame else preset.resize_to
    steps = []
    if resized != working:
        steps.append(
            f"resize to {resized}x{resized} (bilinear, antialiased, "
            "torchvision transforms.v2.Resize)"
        )
    if not preset.whole_frame:
        steps.append(f"centre-crop to {size}x{size}")
    return [*steps, *_scaling_steps(cfg)]


def _scaling_steps(cfg) -> list[str]:
    return [
        "scale to float32 in [0, 1]",
        f"normalise per channel: (x - mean) / std with mean {list(cfg.mean)} "
        f"and std {list(cfg.std)}",
    ]


def model_card(
    cfg: Config,
    class_names: list[str],
    metrics: dict[str, Any],
    checkpoint: Path,
    source_run: Path | None,
    spec: ExportSpec,
) -> dict[str, Any]:
    return {
        "model": cfg.model.name,
        "experiment": cfg.experiment,
        "task": cfg.task,
        "num_classes": len(class_names),
        "classes": list(class_names),
        "input": {"name": INPUT_NAME, "shape": list(spec.input_shape), "dtype": "float32"},
        "output": {
            "name": spec.output_name,
            "shape": list(spec.output_shape),
            "meaning": spec.output_meaning,
        },
        "preprocessing": preprocessing(cfg, spec.fit),
        "metrics": {k: metrics[k] for k in CARD_METRICS if metrics.get(k) is not None},
        "trained_on": {"source": cfg.data.source},
        "source_checkpoint": str(checkpoint.resolve()),
        "lineage": lineage(source_run, checkpoint, cfg),
        "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def card_markdown(card: dict[str, Any]) -> str:
    pre, files, checks = card["preprocessing"], card["files"], card["checks"]
    shape_in, shape_out = _shape(card["input"]["shape"]), _shape(card["output"]["shape"])
    out = card["output"]["name"]
    lines = [
        f"# {card['model']}: {card['experiment']}",
        "",
        f"{card['task']} into {card['num_classes']} classes, exported by raycv "
        f"{card['code_version']} on {card['created']}.",
        "",
        "## Classes",
        "",
        "Output index: class name.",
        "",
        *[f"{i}. {name}" for i, name in enumerate(card["classes"])],
        "",
        "## Preprocessing",
        "",
        f"Input `{INPUT_NAME}`: float32 {shape_in}; output `{out}`: {shape_out}, "
        f"{card['output']['meaning']}.",
        "",
        *[f"{i}. {step}" for i, step in enumerate(pre["steps"], 1)],
        "",
        f"In raycv: `{pre['code']}`.",
        "",
        *_postprocess_lines(card.get("postprocess")),
        "## Metrics (source checkpoint)",
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {k} | {_fmt(v)} |" for k, v in card["metrics"].items()],
        "",
        "## Files",
        "",
        f"| file | size (MB) | max abs diff of `{out}` vs PyTorch |",
        "| --- | --- | --- |",
    ]
    diff_of = {
        "torchscript": checks["torchscript_max_abs_diff"],
        "onnx": checks["onnx_max_abs_diff"],
    }
    for key, entry in files.items():
        diff = f"{diff_of[key]:.2g}" if key in diff_of else "(the reference)"
        lines.append(f"| `{entry['path']}` | {entry['size_mb']:.2f} | {diff} |")
    lines += [
        "",
        f"Checked on {checks['inputs']}: every value of `{out}` within {checks['atol']:g} "
        f"+ {checks['rtol']:g} x |value| of PyTorch.",
        "",
        "## Lineage",
        "",
        f"Source checkpoint: `{card['source_checkpoint']}`",
        "",
        *[
            f"- `{entry['path']}` ({entry.get('kind') or 'no manifest'}"
            + (f", {entry['status']}" if entry.get("status") else "")
            + ")"
            for entry in card["lineage"]
        ],
        "",
        "## Loading",
        "",
        "State dict (rebuilds the model, pruned layer shapes included):",
        "",
        "```python",
        "from raycv.artifacts import load_trained",
        "",
        "trained = load_trained('path/to/this/folder')  # .model in eval mode, .class_names",
        "```",
        "",
        "TorchScript (no raycv needed):",
        "",
        "```python",
        "import torch",
        "",
        f"model = torch.jit.load('{files['torchscript']['path']}').eval()",
        f"{out} = model(images)  # float32 {shape_in}, preprocessed as above",
        "```",
        "",
        "ONNX (onnxruntime):",
        "",
        "```python",
        "import onnxruntime as ort",
        "",
        f"session = ort.InferenceSession('{files['onnx']['path']}', "
        "providers=['CPUExecutionProvider'])",
        f"{out} = session.run(['{out}'], {{'{INPUT_NAME}': images}})[0]  "
        f"# numpy float32 {shape_in}",
        "```",
        "",
    ]
    return "\n".join(lines)


def _postprocess_lines(settings: dict[str, Any] | None) -> list[str]:
    """A detector's steps after the exported output, as raycv takes them."""
    if not settings:
        return []
    return [
        "## Postprocess (not in the files)",
        "",
        "From each image's rows to its detections, as raycv evaluates the model:",
        "",
        "| setting | value |",
        "| --- | --- |",
        *[f"| {k} | {_fmt(v)} |" for k, v in settings.items()],
        "",
        "```python",
        "import torch, torchvision",
        "",
        "boxes, scores = detections[i, :, :4], detections[i, :, 4:]  # one image",
        "anchor, label = (scores > score_threshold).nonzero().unbind(1)",
        "score = scores[anchor, label]",
        "top = score.topk(min(pre_nms_top_k, len(score))).indices",
        "anchor, label, score = anchor[top], label[top], score[top]",
        "kept = torchvision.ops.batched_nms(boxes[anchor], score, label, nms_iou)",
        "kept = kept[:max_detections]  # boxes[anchor[kept]], score[kept], label[kept]",
        "```",
        "",
    ]


def _shape(dims: list[int | str]) -> str:
    return f"({', '.join(map(str, dims))})"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
