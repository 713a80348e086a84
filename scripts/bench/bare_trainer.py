"""Ray's start-up floor: a bare ``TorchTrainer`` whose loop only reports the time.

``train_throughput.py`` launches this in a fresh process, exactly as it launches ``raycv train``,
and takes (reported ``t`` - launch time) as the start-up no Ray Train job can beat on this
machine: Python and Ray imports, a local Ray started with the same arguments as
``raycv.session.ensure_ray``, the Train controller, the worker group and torch.distributed.

Run alone, it prints the timestamps as one JSON line (the last line of stdout):

    python scripts/bench/bare_trainer.py --num-workers 2 --cpus-per-worker 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
import uuid

import ray
import ray.train
from ray.train.torch import TorchTrainer


def report_time() -> None:
    """The whole per-worker loop: say when it started, and how many threads torch got."""
    import torch

    t = time.time()
    metrics = {"t": t, "torch_threads": torch.get_num_threads()}
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    # Train V2 hands back (as Result.metrics) only metrics that came with a checkpoint.
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "metrics.json"), "w") as f:
            json.dump(metrics, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-workers", type=int, default=1, help="Train workers (default 1)")
    p.add_argument(
        "--cpus-per-worker", type=float, default=1.0, help="CPUs each worker reserves (default 1)"
    )
    p.add_argument(
        "--storage",
        help="Ray Train storage_path (default: a temporary folder, removed at the end)",
    )
    args = p.parse_args(argv)
    imported_at = time.time()  # the launcher's clock started before Python did
    # The same local cluster raycv.session.ensure_ray starts: the workers' CPUs plus every core
    # again (so Ray Data would have room), dashboard on.
    num_cpus = math.ceil(args.num_workers * args.cpus_per_worker) + (os.cpu_count() or 1)
    ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True)
    ray_up_at = time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="bare-trainer-") as tmp:
            trainer = TorchTrainer(
                report_time,
                scaling_config=ray.train.ScalingConfig(
                    num_workers=args.num_workers,
                    resources_per_worker={"CPU": args.cpus_per_worker},
                ),
                run_config=ray.train.RunConfig(
                    name=f"bare-{uuid.uuid4().hex[:8]}",  # a reused name would resume
                    storage_path=args.storage or tmp,
                ),
            )
            result = trainer.fit()
        fit_done_at = time.time()
    finally:
        ray.shutdown()
    print(
        json.dumps(
            {
                "imported_at": imported_at,
                "ray_up_at": ray_up_at,
                "first_report_at": result.metrics["t"],
                "fit_done_at": fit_done_at,
                "worker_torch_threads": result.metrics["torch_threads"],
                "ray_logical_cpus": num_cpus,
            }
        )
    )


if __name__ == "__main__":
    main()
