"""The ``raycv`` command: parses arguments, builds the config, calls one stage function."""

from __future__ import annotations

import argparse
import logging
import sys

from raycv import verbosity
from raycv.config import PIPELINE_STAGES, ConfigError, load_config, load_given, validate
from raycv.errors import BadImageError, DataError, RunFailedError
from raycv.resume import given_keys

log = logging.getLogger("raycv")

OVERRIDES_HELP = "dotted config overrides, e.g. train.epochs=3 model.name=resnet34"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        verbosity.configure(args.verbose)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ours = not _ray_running()  # a Ray this command starts is stopped; a caller's is left alone
    try:
        run = args.handler(args)
    except KeyboardInterrupt:
        print(
            "interrupted: finished epochs and trials are saved; add --resume to continue",
            file=sys.stderr,
        )
        return 130
    except _USER_ERRORS as e:
        _stop_ray(ours)  # first: a worker's late traceback must not print after the error line
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 2
    except RunFailedError as e:
        _stop_ray(ours)
        print(f"error: {e}", file=sys.stderr)
        return 1
    _stop_ray(ours)  # before the last line: Ray forwards its workers' late log lines to stdout
    if run is not None:  # doctor makes no run folder: its report was its output
        print(run.path)  # the last line of every command: where its results are
    return 0


def _ray_running() -> bool:
    ray = sys.modules.get("ray")  # not imported by commands that fail before Ray starts
    return ray is not None and ray.is_initialized()


def _stop_ray(ours: bool) -> None:
    if ours and _ray_running():
        sys.modules["ray"].shutdown()


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Options may stand anywhere among the ``key=value`` overrides."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if isinstance(getattr(args, "resume", None), str) and "=" in args.resume:
        extra.insert(0, args.resume)  # --resume takes an optional RUN; that was an override
        args.resume = True
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(
            f"unrecognized arguments: {' '.join(unknown or extra)} (see raycv COMMAND --help)"
        )
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


# Every command takes --verbose: a parent parser, so that it shows in each command's --help.
VERBOSE = argparse.ArgumentParser(add_help=False)
VERBOSE.add_argument(
    "-v",
    "--verbose",
    action="store_true",
    help="also print Ray's own start-up warnings and internal notices, and raycv's debug "
    f"lines (the same as {verbosity.ENV}=debug)",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raycv", description="Train, evaluate and inspect vision models on Ray."
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    for add in (
        _add_train,
        _add_tune,
        _add_finetune,
        _add_compress,
        _add_pipeline,
        _add_export,
        _add_predict,
    ):
        add(sub)
    _add_eval(sub)
    _add_data(sub)
    _add_doctor(sub)
    return parser


def _add_config(parser: argparse.ArgumentParser, config_help: str) -> None:
    parser.add_argument("config", help=config_help)
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def _add_local(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--local", action="store_true", help=help_text)


def _add_resume(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument(
        "--resume", nargs="?", const=True, default=None, metavar="RUN", help=help_text
    )


def _add_train(sub) -> None:
    train = sub.add_parser(
        "train",
        parents=[VERBOSE],
        help="one Ray Train run",
        description="Train a model with Ray Train.",
    )
    _add_config(train, "YAML config, e.g. configs/smoke.yaml")
    _add_local(train, "run the loop in this process (no worker processes; breakpoints work)")
    _add_resume(
        train,
        "continue a run from its last checkpoint: the newest train run of "
        "this experiment, or the run folder/name given",
    )
    train.set_defaults(handler=_train)


def _add_tune(sub) -> None:
    tune = sub.add_parser(
        "tune",
        parents=[VERBOSE],
        help="a Ray Tune sweep whose trials are Ray Train runs",
        description="Search the config keys under tune.space (batch size, learning rate, "
        "pruning ratio, ...) with Ray Tune; each trial is a Ray Train run. Writes "
        "trials.csv/parquet, best.yaml, plots and summary.md into the sweep folder.",
    )
    _add_config(tune, "YAML config with a tune section, e.g. configs/sweep.yaml")
    _add_resume(
        tune,
        "continue an interrupted sweep (finished trials are not run again): the "
        "newest tune run of this experiment, or the sweep folder/name given",
    )
    tune.set_defaults(handler=_tune)


def _add_finetune(sub) -> None:
    finetune = sub.add_parser(
        "finetune",
        parents=[VERBOSE],
        help="transfer learning from pretrained weights",
        description="Fine-tune pretrained weights on the config's data: the heads are "
        "replaced for the target classes, preprocessing follows the source unless the "
        "config sets it, and finetune.strategy (full, linear_probe, gradual), "
        "finetune.backbone_lr_factor / finetune.layer_decay and finetune.freeze_bn choose "
        "what trains and how fast.",
    )
    _add_config(finetune, "YAML config of the target task")
    finetune.add_argument(
        "--from",
        dest="source",
        metavar="SOURCE",
        help="torchvision weights name (ResNet50_Weights.IMAGENET1K_V2, or DEFAULT for "
        "model.name's recommended weights; read from torchvision's cache offline), a raycv "
        "run folder (train, tune, finetune or pipeline: its best model) or checkpoint, or a "
        ".pt/.pth/.safetensors state dict (default: finetune.source of the config)",
    )
    _add_local(finetune, "run the loop in this process")
    _add_resume(finetune, "continue the newest (or the named) finetune run")
    finetune.set_defaults(handler=_finetune)


def _add_compress(sub) -> None:
    compress = sub.add_parser(
        "compress",
        parents=[VERBOSE],
        help="prune, quantize and distil a trained model, each variant measured",
        description="Make a trained model smaller and faster: train a distilled student "
        "(--student), prune it and fine-tune again (--prune; compress.steps rounds, "
        "compress.epochs epochs each, compress.prune.importance l1/l2/taylor), then "
        "quantize it (--quantize). Every variant is saved under variants/ and measured: "
        "params, MACs, file size, CPU latency per batch size (compress.latency.*) and val "
        "accuracy, written to compression.csv/json/md and plots/compression.png.",
    )
    compress.add_argument(
        "artifact", help="the model to compress: a run folder (its best model) or checkpoint"
    )
    compress.add_argument(
        "overrides",
        nargs="*",
        help="overrides of the artifact's config, e.g. compress.steps=3 compress.epochs=4 "
        "compress.prune.importance=taylor data.folder.root=PATH",
    )
    compress.add_argument(
        "--prune",
        metavar="METHOD:RATIO",
        help="channel:0.5 removes half the channels (smaller and faster); l1_unstructured:0.5 "
        "zeroes half the weights (same speed on dense hardware)",
    )
    compress.add_argument(
        "--quantize",
        metavar="METHOD",
        help="int8: post-training static quantization for x86 CPUs, calibrated on training "
        "images; compress.qat_epochs=N adds quantization-aware fine-tuning",
    )
    compress.add_argument(
        "--distill-from",
        metavar="TEACHER",
        help="a raycv run folder or checkpoint whose soft targets guide every fine-tuning "
        "(distill.temperature, distill.weight)",
    )
    compress.add_argument(
        "--student",
        metavar="MODEL",
        help="first train this smaller registered model, distilled from --distill-from "
        "(default: from the artifact)",
    )
    _add_local(compress, "run the fine-tuning in this process")
    _add_resume(compress, "continue the newest (or the named) compress run")
    compress.set_defaults(handler=_compress)


def _add_pipeline(sub) -> None:
    pipeline = sub.add_parser(
        "pipeline",
        parents=[VERBOSE],
        help="the whole chain: pretrain, sweep, fine-tune, compress, export, report",
        description="Run pretrain (pipeline.pretrain) -> sweep (tune.space) -> final "
        "fine-tune with the best config, and the same budget from scratch -> compression "
        "(the compress section) -> export -> report, each stage a run folder inside the "
        "pipeline folder. --resume skips finished stages and continues the interrupted one.",
    )
    _add_config(pipeline, "YAML config, e.g. configs/quickstart.yaml")
    _add_local(
        pipeline, "run the training stages in this process (sweep trials still use Ray Train)"
    )
    pipeline.add_argument(
        "--until",
        choices=PIPELINE_STAGES,
        metavar="STAGE",
        help=f"stop after this stage ({', '.join(PIPELINE_STAGES)}); --resume goes on from there",
    )
    _add_resume(pipeline, "continue the newest (or the named) pipeline run")
    pipeline.set_defaults(handler=_pipeline)


def _add_export(sub) -> None:
    export = sub.add_parser(
        "export",
        parents=[VERBOSE],
        help="TorchScript, ONNX and a model card",
        description="Export a trained model as TorchScript and ONNX (both checked against "
        "PyTorch, ONNX with onnxruntime), plus its state dict and a model card. A "
        "segmentation model takes any height and width (checked at two sizes).",
    )
    export.add_argument("artifact", help="a run folder (its best model) or checkpoint")
    export.set_defaults(handler=_export)


def _add_predict(sub) -> None:
    predict = sub.add_parser(
        "predict",
        parents=[VERBOSE],
        help="batch inference over images or folders",
        description="Predict with Ray Data (an actor pool; GPU when the cluster has one): "
        "the top classes per image (classification), or a mask PNG, an overlay and the class "
        "areas per image (segmentation). Writes predictions.csv and .parquet; unreadable "
        "files are reported, not fatal.",
    )
    predict.add_argument("artifact", help="a run folder, export folder or checkpoint")
    predict.add_argument("paths", nargs="+", help="image files or folders")
    predict.add_argument(
        "--top-k", type=int, default=5, help="classification: classes kept per image (5)"
    )
    predict.add_argument("--batch-size", type=int, default=64, help="images per batch (64)")
    predict.set_defaults(handler=_predict)


def _add_eval(sub) -> None:
    ev = sub.add_parser(
        "eval",
        parents=[VERBOSE],
        help="evaluate a checkpoint",
        description="Score a checkpoint on the validation split of a dataset: accuracy, "
        "per-class accuracy and a confusion matrix (classification); mIoU, pixel accuracy, "
        "per-class IoU, a confusion matrix and the worst images drawn (segmentation).",
    )
    ev.add_argument(
        "checkpoint", help="a run folder (its best checkpoint) or a checkpoints/epoch_* folder"
    )
    ev.add_argument(
        "overrides",
        nargs="*",
        help="overrides of the checkpoint's own config, e.g. data.folder.root=PATH",
    )
    ev.set_defaults(handler=_eval)


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="inspect data", description="Inspect a config's data.")
    data_sub = data.add_subparsers(required=True, metavar="ACTION")
    preview = data_sub.add_parser(
        "preview",
        parents=[VERBOSE],
        help="PNG grid of augmented training samples",
        description="Write a PNG grid of augmented training samples, titled with their "
        "labels, or with their masks drawn over them (segmentation).",
    )
    _add_config(preview, "YAML config")
    preview.add_argument("--count", type=int, default=32, help="number of samples (default 32)")
    preview.set_defaults(handler=_preview)


def _add_doctor(sub) -> None:
    doctor = sub.add_parser(
        "doctor",
        parents=[VERBOSE],
        help="check that a config fits a cluster before running it",
        description="Check a config against a Ray cluster: whether its workers fit the "
        "nodes (scaling.*, placement strategy) with a CPU left for Ray Data, whether "
        "run.storage is writable from every node and shared between them, and whether "
        "torch, CUDA and NCCL agree across nodes. Prints a table with one fix per problem; "
        "exits 1 when the run cannot work.",
    )
    _add_config(doctor, "YAML config to check, e.g. configs/smoke.yaml")
    doctor.add_argument(
        "--address",
        help="the Ray cluster (GCS address, e.g. 10.0.0.1:6379, or auto); default: "
        "$RAY_ADDRESS (set inside `ray job submit`), else a local Ray as `raycv train` starts",
    )
    doctor.set_defaults(handler=_doctor)


# Each handler validates its config before importing its stage (Ray Train, Tune): a bad
# config then fails in about the time torch takes to import, not Ray as well.


def _train(args):
    cfg = load_config(args.config, args.overrides)
    from raycv.train import run_train

    return run_train(cfg, local=args.local, resume=args.resume, keys=given_keys(args.overrides))


def _tune(args):
    cfg = load_config(args.config, args.overrides)
    from raycv.sweep.run import run_tune

    return run_tune(cfg, resume=args.resume, keys=given_keys(args.overrides))


def _finetune(args):
    given = load_given(args.config, args.overrides)
    if args.source:  # set as given: a path must not be parsed as YAML
        given.setdefault("finetune", {})["source"] = args.source
    cfg = validate(given)
    from raycv.train import run_train

    keys = [*given_keys(args.overrides), *(["finetune.source"] if args.source else [])]
    return run_train(cfg, local=args.local, resume=args.resume, stage="finetune", keys=keys)


def _compress(args):
    from raycv.compress.run import compress_config, resume_folder, run_compress

    settings = {
        "compress.quantize": args.quantize,
        "distill.teacher": args.distill_from,
        "compress.student": args.student,
    }
    if args.prune:
        method, _, ratio = args.prune.partition(":")
        try:
            settings |= {"compress.prune.method": method, "compress.prune.ratio": float(ratio)}
        except ValueError:
            raise ConfigError(
                f"--prune takes METHOD:RATIO, e.g. channel:0.5 (got {args.prune!r})"
            ) from None
    given = {k: v for k, v in settings.items() if v is not None}
    cfg = compress_config(args.artifact, args.overrides, given)
    at = resume_folder(cfg, args.resume) if args.resume else None
    return run_compress(args.artifact, cfg, local=args.local, at=at)


def _pipeline(args):
    given = load_given(args.config, args.overrides)
    cfg = validate(given)
    from raycv.pipeline import run_pipeline

    keys = given_keys(args.overrides)
    return run_pipeline(
        given, cfg, resume=args.resume, local=args.local, until=args.until, keys=keys
    )


def _export(args):
    from raycv.export import run_export

    return run_export(args.artifact)


def _predict(args):
    from raycv.predict import run_predict

    return run_predict(args.artifact, args.paths, top_k=args.top_k, batch_size=args.batch_size)


def _eval(args):
    from raycv.evaluate import run_eval

    return run_eval(args.checkpoint, args.overrides)


def _preview(args):
    from raycv.evaluate import run_preview

    if args.count < 1:
        raise ConfigError(f"--count must be at least 1 (got {args.count})")
    cfg = load_config(args.config, args.overrides)
    return run_preview(cfg, args.count)


def _doctor(args) -> None:
    from raycv.doctor import format_report, run_doctor

    cfg = load_config(args.config, args.overrides)
    report = run_doctor(cfg, address=args.address)
    print(format_report(report))
    if not report.ok:
        raise RunFailedError(f"doctor found {len(report.errors)} problem(s); fixes above")


def _first_line(e: BaseException) -> str:
    e = getattr(e, "cause", None) or e  # a Ray task error carries the user's error as cause
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


_USER_ERRORS = (ConfigError, DataError, BadImageError, FileNotFoundError)

if __name__ == "__main__":
    sys.exit(main())
