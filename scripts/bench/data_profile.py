"""Where a Ray Data augmentation epoch spends its time: CPU per image by process, and concurrency.

``data_throughput.py`` says how fast raycv's augmented stream is; this script says why.  It
caches random uint8 images at the working size in Ray's object store (as a data source
does), then reads the classic preset's ``map_batches`` stream with ``iter_torch_batches`` for
``--epochs`` epochs and, for the last epoch, reports:

* images/s, and how busy the cores were (``/proc/stat``);
* CPU milliseconds per image for each kind of process (``/proc/<pid>/stat`` before and after):
  Ray Data's task workers, this reading process, and Ray's own services;
* the transform alone on one thread in this process, for comparison with the workers' share;
* how many augmentation batches ran at once in the epoch's first second and after it (every
  batch logs its start and end), which shows Ray Data's per-execution slow start: its resource
  manager learns the cluster's size asynchronously and runs one task at a time until then.

Run by hand, not in CI:

    python scripts/bench/data_profile.py                     # 2,400 images, S=224
    python scripts/bench/data_profile.py --image-size 128 --blocks 16
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import results
from data_throughput import transform_alone

log = logging.getLogger("bench")
TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def parse_args(argv: list[str] | None = None):
    p = results.parser(__file__, __doc__, "the full results")
    p.add_argument("--num-images", type=int, default=2400, help="cached images (default 2400)")
    p.add_argument("--image-size", type=int, default=224, help="output side S (default 224)")
    p.add_argument("--blocks", type=int, default=4, help="cached blocks (default 4)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--epochs", type=int, default=3, help="epochs; the last is profiled (3)")
    args = p.parse_args(argv)
    if min(args.num_images, args.image_size, args.blocks, args.batch_size, args.epochs) < 1:
        p.error("every count must be at least 1")
    return args


class _Logged:
    """The classic preset, logging each batch's start and end to a file per process."""

    def __init__(self, preset, folder: str) -> None:
        self.preset, self.folder = preset, folder

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.time()
        out = self.preset(batch)
        with open(os.path.join(self.folder, f"{os.getpid()}.log"), "a") as f:
            f.write(f"{started} {time.time()}\n")
        return out


def _cpu_by_process() -> dict[tuple[int, str], float]:
    """CPU seconds so far of every process on the machine, by (pid, name)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[(int(pid), name)] = (int(fields[11]) + int(fields[12])) * TICK_S
    return out


def _busy() -> tuple[int, int]:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values), values[3] + values[4]  # total, idle + iowait


def _kind(pid: int, name: str, workers: set[int]) -> str:
    if pid == os.getpid():
        return "this process (iter_torch_batches)"
    return "Ray Data task workers" if pid in workers else "everything else (Ray's services)"


def _overlap(spans: list[tuple[float, float]], start: float, end: float) -> float:
    """Mean number of batches running at once between start and end."""
    busy = sum(max(0.0, min(e, end) - max(s, start)) for s, e in spans)
    return busy / max(end - start, 1e-9)


def profile(args) -> dict[str, Any]:
    import ray

    from raycv.config import from_dict
    from raycv.data.augment import build_preset
    from raycv.session import local_cpus, start_local

    cfg = from_dict({"experiment": "bench", "model": {"image_size": args.image_size}})
    size, out_size = cfg.working_size, args.image_size
    start_local(local_cpus(cfg), "127.0.0.1")
    try:

        def make(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            rng = np.random.default_rng(int(batch["id"][0]))
            shape = (len(batch["id"]), size, size, 3)
            return {"image": rng.integers(0, 256, shape, np.uint8), "label": batch["id"] % 6}

        cached = ray.data.range(args.num_images, override_num_blocks=args.blocks)
        cached = cached.map_batches(make, batch_size=args.batch_size).materialize()
        preset = build_preset("classic", cfg.augment, out_size)
        with tempfile.TemporaryDirectory(prefix="raycv-profile-") as folder:
            stream = cached.map_batches(
                _Logged(preset, folder), batch_size=args.batch_size, batch_format="numpy"
            )
            for _ in range(args.epochs - 1):
                for _batch in stream.iter_torch_batches(batch_size=args.batch_size):
                    pass
                for log_file in Path(folder).glob("*.log"):
                    log_file.unlink()
            cpu_before, busy_before = _cpu_by_process(), _busy()
            started = time.time()
            images = sum(
                len(b["label"]) for b in stream.iter_torch_batches(batch_size=args.batch_size)
            )
            ended = time.time()
            cpu_after, busy_after = _cpu_by_process(), _busy()
            logs = {int(f.stem): f.read_text().split() for f in Path(folder).glob("*.log")}
        spans = [(float(v[i]), float(v[i + 1])) for v in logs.values() for i in range(0, len(v), 2)]
        used: dict[str, float] = {}
        for key, seconds in cpu_after.items():
            kind = _kind(*key, set(logs))
            used[kind] = used.get(kind, 0.0) + seconds - cpu_before.get(key, 0.0)
        total, idle = (a - b for a, b in zip(busy_after, busy_before, strict=True))
        return {
            "images": images,
            "seconds": ended - started,
            "images_per_s": images / (ended - started),
            "cores_busy": 1 - idle / max(total, 1),
            "cpu_ms_per_image": {k: 1000 * v / images for k, v in used.items()},
            "transform_alone_ms_per_image": 1000 / transform_alone(cfg, args)["images_per_s"],
            "batches_at_once_first_second": _overlap(spans, started, started + 1),
            "batches_at_once_after": _overlap(spans, started + 1, ended),
            "working_size": size,
        }
    finally:
        ray.shutdown()


def report(out: dict[str, Any], args) -> str:
    rows = [(kind, ms) for kind, ms in sorted(out["cpu_ms_per_image"].items())]
    rows.append(("transform alone, 1 thread, this process", out["transform_alone_ms_per_image"]))
    return "\n".join(
        [
            f"last of {args.epochs} epochs: {out['images']} images, S={args.image_size} (cached "
            f"at {out['working_size']} px, {args.blocks} blocks): {out['images_per_s']:.0f} "
            f"images/s; cores busy {100 * out['cores_busy']:.0f} %",
            "",
            results.table(["where", "CPU ms per image"], rows),
            "",
            "augmentation batches running at once: "
            f"{out['batches_at_once_first_second']:.2f} in the epoch's first second, "
            f"{out['batches_at_once_after']:.2f} after it",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results.setup_logging()
    info = results.machine()
    out = profile(args)
    print(results.header("Where a Ray Data augmentation epoch spends its time", info))
    print()
    print(report(out, args))
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results.write(args.out, {"machine": info, "args": arguments, **out})


if __name__ == "__main__":
    main()
