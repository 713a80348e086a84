"""The ``raycv`` command: parses arguments, builds the config, calls one stage function."""

from __future__ import annotations

import argparse
import logging
import sys

from raycv.config import ConfigError, load_config
from raycv.errors import BadImageError, DataError, RunFailedError

log = logging.getLogger("raycv")

OVERRIDES_HELP = "dotted config overrides, e.g. train.epochs=3 model.name=resnet34"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run = args.handler(args)
    except KeyboardInterrupt:
        print(
            "interrupted: finished epochs and trials are saved; add --resume to continue",
            file=sys.stderr,
        )
        return 130
    except _USER_ERRORS as e:
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 2
    except RunFailedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(run.path)  # the last line of every command: where its results are
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raycv", description="Train, evaluate and inspect vision models on Ray."
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train", help="one Ray Train run", description="Train a model with Ray Train."
    )
    train.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    train.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    train.add_argument(
        "--local",
        action="store_true",
        help="run the loop in this process (no worker processes; breakpoints work)",
    )
    _add_resume(
        train,
        "continue a run from its last checkpoint: the newest train run of "
        "this experiment, or the run folder/name given",
    )
    train.set_defaults(handler=_train)

    tune = sub.add_parser(
        "tune",
        help="a Ray Tune sweep whose trials are Ray Train runs",
        description="Search the config keys under tune.space (batch size, learning rate, "
        "pruning ratio, ...) with Ray Tune; each trial is a Ray Train run. Writes "
        "trials.csv/parquet, best.yaml, plots and summary.md into the sweep folder.",
    )
    tune.add_argument("config", help="YAML config with a tune section, e.g. configs/sweep.yaml")
    tune.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    _add_resume(
        tune,
        "continue an interrupted sweep (finished trials are not run again): the "
        "newest tune run of this experiment, or the sweep folder/name given",
    )
    tune.set_defaults(handler=_tune)

    ev = sub.add_parser(
        "eval",
        help="evaluate a checkpoint",
        description="Accuracy, per-class accuracy and a confusion matrix of a "
        "checkpoint on the validation split of a dataset.",
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

    data = sub.add_parser("data", help="inspect data", description="Inspect a config's data.")
    data_sub = data.add_subparsers(required=True, metavar="ACTION")
    preview = data_sub.add_parser(
        "preview",
        help="PNG grid of augmented training samples",
        description="Write a PNG grid of augmented training samples.",
    )
    preview.add_argument("config", help="YAML config")
    preview.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    preview.add_argument("--count", type=int, default=32, help="number of samples (default 32)")
    preview.set_defaults(handler=_preview)
    return parser


def _add_resume(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument(
        "--resume", nargs="?", const=True, default=None, metavar="RUN", help=help_text
    )


def _train(args):
    from raycv.train import run_train

    cfg = load_config(args.config, args.overrides)
    return run_train(cfg, local=args.local, resume=args.resume)


def _tune(args):
    from raycv.sweep.run import run_tune

    return run_tune(load_config(args.config, args.overrides), resume=args.resume)


def _eval(args):
    from raycv.evaluate import run_eval

    return run_eval(args.checkpoint, args.overrides)


def _preview(args):
    from raycv.evaluate import run_preview

    if args.count < 1:
        raise ConfigError(f"--count must be at least 1 (got {args.count})")
    return run_preview(load_config(args.config, args.overrides), args.count)


def _first_line(e: BaseException) -> str:
    e = getattr(e, "cause", None) or e  # a Ray task error carries the user's error as cause
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


_USER_ERRORS = (ConfigError, DataError, BadImageError, FileNotFoundError)

if __name__ == "__main__":
    sys.exit(main())
