"""What each compression method buys: ResNet-18 on the built-in shapes, compressed by
each method with ``raycv compress``, every variant measured the same way.

The baseline is trained first. On the ``easy`` setting (the default) that is one run;
on ``medium`` or ``hard`` (``--difficulty``) it is pretrained on ``easy`` and then
fine-tuned there. Measured on 2 cores: ResNet-18 at 64 px pretrained 4 epochs on easy
(79.5 %) and fine-tuned 6 epochs on ``hard`` (3000 images) stays at chance (18 % for 6
classes), so accuracy changes on ``hard`` in a CPU budget would rank noise; the default
is ``easy``. Then, each from that baseline, in one process, one after the other:

- channel pruning, 50 %, L1 importance, then fine-tuned;
- the same with Taylor importance;
- the same with L1 importance, fine-tuned with knowledge distillation from the baseline
  (the pruned model as the student);
- L1 unstructured pruning, 50 %, then fine-tuned (expected: no speed-up on dense kernels);
- int8 post-training quantization (PT2E, torchao's x86 quantizer), then one epoch of
  quantization-aware fine-tuning;
- a MobileNetV3-small student trained with distillation from the baseline, and the same
  student trained alone for as many epochs.

Every ``raycv compress`` run times its original and its variants side by side (median
latency after warm-up, ``--threads`` torch threads, inductor runtime: ``torch.compile``
with freezing, which int8 needs for its kernels), so each speed-up is a ratio measured
within one run. Accuracy is top-1 on the validation split of the hard setting.

Goals (2-core x86 CPU): channel 50 % -> latency speed-up >= 1.8x with an accuracy loss
<= 1 point after fine-tuning; int8 -> speed-up >= 1.5x with a loss <= 1 point;
unstructured 50 % reported as measured (about 1.0x); distillation -> the student's gain
over the same student trained alone.

Run by hand, not in CI (about 20 minutes on 2 cores):

    python scripts/bench/compress_methods.py
    python scripts/bench/compress_methods.py --baseline runs/bench-compress/train-...  # reuse
    python scripts/bench/compress_methods.py --num-images 800 --epochs 2 --finetune-epochs 1
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import results

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parents[2]
GOALS = {"channel": (1.8, 0.01), "int8": (1.5, 0.01)}  # (min speed-up at batch 1, max loss)

# name -> (settings of raycv compress: dotted key -> value; whether the baseline teaches)
METHODS: dict[str, tuple[dict[str, Any], bool]] = {
    "channel 50% l1": ({"compress.prune.ratio": 0.5}, False),
    "channel 50% taylor": (
        {"compress.prune.ratio": 0.5, "compress.prune.importance": "taylor"},
        False,
    ),
    "channel 50% l1 + distillation": ({"compress.prune.ratio": 0.5}, True),
    "unstructured 50%": (
        {"compress.prune.ratio": 0.5, "compress.prune.method": "l1_unstructured"},
        False,
    ),
    "int8": ({"compress.quantize": "int8", "compress.qat_epochs": 1}, False),
    "student mobilenet_v3_small + distillation": (
        {"compress.student": "mobilenet_v3_small"},
        True,
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = results.parser(__file__, __doc__, "every row (and the machine)")
    p.add_argument("--num-images", type=int, default=3000, help="images, train + val (3000)")
    p.add_argument("--image-size", type=int, default=64, help="model input side (64)")
    p.add_argument(
        "--difficulty", default="easy", help="shapes setting: easy (default), medium, hard"
    )
    p.add_argument(
        "--pretrain-epochs", type=int, default=4, help="epochs on easy first (medium, hard: 4)"
    )
    p.add_argument("--epochs", type=int, default=8, help="baseline epochs (8)")
    p.add_argument(
        "--finetune-epochs",
        type=int,
        default=3,
        help="fine-tuning epochs after pruning, and the students' epochs x 2 (3)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads while timing (1)")
    p.add_argument("--baseline", type=Path, help="a trained baseline to reuse (skips training)")
    p.add_argument("--storage", type=Path, help="run folders (default: a temp dir)")
    return p.parse_args(argv)


def base_overrides(args: argparse.Namespace, storage: Path, difficulty: str) -> list[str]:
    return [
        "experiment=bench-compress",
        f"run.storage={storage}",
        f"data.shapes.num_images={args.num_images}",
        f"data.shapes.image_size={round(args.image_size * 1.25)}",
        f"data.shapes.difficulty={difficulty}",
        "data.shapes.num_classes=6",
        "data.val_fraction=0.2",
        "model.name=resnet18",
        f"model.image_size={args.image_size}",
        "optimizer.name=adamw",
        "optimizer.lr=2.0e-3",
        "optimizer.weight_decay=0.05",
        "scheduler.name=cosine",
        "scheduler.warmup_epochs=0.5",
        "train.batch_size=64",
        "train.label_smoothing=0.1",
        "augment.scale=[0.6,1.0]",
        "checkpoint.keep=1",
        "scaling.num_workers=1",
    ]


def train_baseline(args: argparse.Namespace, storage: Path) -> Path:
    """ResNet-18 on ``--difficulty``; pretrained on easy shapes first unless it is easy."""
    from raycv.config import load_config
    from raycv.train import run_train

    smoke = REPO / "configs" / "smoke.yaml"
    target = [*base_overrides(args, storage, args.difficulty), f"train.epochs={args.epochs}"]
    if args.difficulty == "easy":
        return run_train(load_config(smoke, target), local=True).path
    easy = [*base_overrides(args, storage, "easy"), f"train.epochs={args.pretrain_epochs}"]
    pretrained = run_train(load_config(smoke, easy), local=True)
    tuned = [*target, f"finetune.source={pretrained.path}", "optimizer.lr=1.0e-3"]
    return run_train(load_config(smoke, tuned), local=True, stage="finetune").path


def compress(args: argparse.Namespace, baseline: Path, name: str) -> dict[str, Any]:
    from raycv.compress.run import compress_config, run_compress

    settings, distilled = METHODS[name]
    student = "compress.student" in settings
    epochs = args.finetune_epochs * (2 if student else 1)
    settings = {
        **settings,
        "compress.epochs": epochs,
        "compress.latency.threads": args.threads,
        "distill.teacher": str(baseline) if distilled else None,
    }
    started = time.perf_counter()
    run = run_compress(baseline, compress_config(baseline, [], settings), local=True)
    rows = results_rows(run.path)
    return {"method": name, "folder": str(run.path), "wall_s": round(time.perf_counter() - started),
            "original": rows[0], "final": rows[-1], "rows": rows}  # fmt: skip


def results_rows(folder: Path) -> list[dict[str, Any]]:
    import json

    return json.loads((folder / "compression.json").read_text())


def student_alone(args: argparse.Namespace, baseline: Path) -> dict[str, Any]:
    """The distilled student's recipe without the teacher: same model, data and epochs."""
    from raycv.artifacts import load_trained
    from raycv.config import validate
    from raycv.train import run_train

    raw = load_trained(baseline).config.model_dump(mode="json")
    raw["model"] |= {"name": "mobilenet_v3_small", "weights": None}
    raw["finetune"] = {}
    raw["train"]["epochs"] = args.finetune_epochs * 2
    run = run_train(validate(raw), local=True)
    return {"val_acc": load_best_acc(run.path), "folder": str(run.path)}


def load_best_acc(folder: Path) -> float:
    from raycv.artifacts import read_manifest

    return read_manifest(folder)["metrics"]["best"]["val_acc"]


def summarise(runs: dict[str, dict[str, Any]], alone: dict[str, Any]) -> list[list[Any]]:
    """The original once, then every variant of every run against its own run's original."""
    first = next(iter(runs.values()))["original"]
    table = [["original", "resnet18", 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, _pct(first["val_acc"]), 0.0]]
    for name, r in runs.items():
        o = r["original"]
        for row in r["rows"][1:]:
            table.append(
                [
                    name,
                    row["variant"],
                    row["params"] / o["params"],
                    row["nonzero_params"] / o["params"],
                    row["macs"] / o["macs"],
                    row["file_bytes"] / o["file_bytes"],
                    o["latency_ms"]["1"] / row["latency_ms"]["1"],
                    o["latency_ms"]["32"] / row["latency_ms"]["32"],
                    _pct(row["val_acc"]),
                    _pct(row["val_acc"] - o["val_acc"]),
                ]
            )
    student = "mobilenet_v3_small alone"
    table.append(["student alone", student, *[None] * 6, _pct(alone["val_acc"]), None])
    return table


def _pct(share: float) -> str:
    return f"{100 * share:.1f}"  # one decimal: 99.7 and 100.0 must not both read "100"


def verdicts(runs: dict[str, dict[str, Any]], alone: dict[str, Any]) -> dict[str, Any]:
    def met(name: str, goal: tuple[float, float], variant: str = "") -> dict[str, Any]:
        o = runs[name]["original"]
        f = next(r for r in reversed(runs[name]["rows"]) if r["variant"].startswith(variant))
        speedup = o["latency_ms"]["1"] / f["latency_ms"]["1"]
        loss = o["val_acc"] - f["val_acc"]
        return {"speedup_b1": round(speedup, 2), "loss_points": round(100 * loss, 2),
                "goal_met": speedup >= goal[0] and loss <= goal[1]}  # fmt: skip

    pruned_kd = runs["channel 50% l1 + distillation"]["final"]["val_acc"]
    pruned = runs["channel 50% l1"]["final"]["val_acc"]
    student = runs["student mobilenet_v3_small + distillation"]["rows"][1]["val_acc"]
    return {
        "channel 50% l1": met("channel 50% l1", GOALS["channel"]),
        "int8": met("int8", GOALS["int8"], "int8 post-training"),
        "int8 qat": met("int8", GOALS["int8"], "int8 quantization-aware"),
        "distillation_gain_pruned_points": round(100 * (pruned_kd - pruned), 2),
        "distillation_gain_student_points": round(100 * (student - alone["val_acc"]), 2),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results.setup_logging()
    info = results.machine()
    storage = args.storage or Path(tempfile.mkdtemp(prefix="bench-compress-"))
    started = time.perf_counter()
    baseline = args.baseline or train_baseline(args, storage)
    runs = {name: compress(args, baseline, name) for name in METHODS}
    alone = student_alone(args, baseline)
    verdict = verdicts(runs, alone)
    columns = ["method", "variant", "params", "nonzero", "MACs", "file", "speed-up b1",
               "speed-up b32", "val acc %", "change pts"]  # fmt: skip
    print(results.header(f"Compression methods on ResNet-18, shapes {args.difficulty}", info))
    print(
        f"{args.num_images} images at {args.image_size} px; fine-tuning {args.finetune_epochs} "
        f"epochs (students {2 * args.finetune_epochs}); latency: median after warm-up, "
        f"{args.threads} thread(s), torch.compile (inductor, freezing); params, MACs, file "
        "size as ratios to the original; speed-ups timed within each run"
    )
    print(results.table(columns, summarise(runs, alone)))
    print(verdict_lines(verdict))
    results.write(
        args.out,
        {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "baseline":
         str(baseline), "runs": runs, "student_alone": alone, "verdict": verdict,
         "wall_s": round(time.perf_counter() - started)},
    )  # fmt: skip


def verdict_lines(v: dict[str, Any]) -> str:
    c, q, a = v["channel 50% l1"], v["int8"], v["int8 qat"]
    return "\n".join(
        [
            f"channel 50%: {c['speedup_b1']:.2f}x at batch 1, {-c['loss_points']:+.1f} points "
            f"(goal >= 1.8x, >= -1 point): {'met' if c['goal_met'] else 'NOT met'}",
            f"int8: {q['speedup_b1']:.2f}x at batch 1, {-q['loss_points']:+.1f} points "
            f"(goal >= 1.5x, >= -1 point): {'met' if q['goal_met'] else 'NOT met'}; after one "
            f"epoch of QAT: {a['speedup_b1']:.2f}x, {-a['loss_points']:+.1f} points",
            f"distillation gain: pruned student {v['distillation_gain_pruned_points']:+.1f} "
            f"points, mobilenet_v3_small student {v['distillation_gain_student_points']:+.1f} "
            "points over the same student trained alone",
        ]
    )


if __name__ == "__main__":
    main()
