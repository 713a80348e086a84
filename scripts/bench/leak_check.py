"""Leak check: many short trainings and sweeps back to back in one Ray session must leave
nothing behind: no live actors or worker processes, no placement groups, no CPUs still
reserved, no growing object-store use, no files in temporary folders, no growing driver.

One local Ray is started (as ``raycv tune`` starts it) and kept for the whole run. Then,
in this process, ``--trainings`` runs of configs/smoke.yaml (``raycv.train.run_train``, two
Train workers, ``--epochs`` each) and ``--sweeps`` sweeps of two trials
(``raycv.sweep.run.run_tune``). After each job, once Ray has had up to ``--settle`` seconds
to tear it down, it records what is still there; the baseline is the same reading before
the first job. Ray's own session folder (its logs) is measured apart from the other files
in the temporary folder: logs are expected to grow with every job.

Run by hand, not in CI (about 15 minutes on 2 cores):

    python scripts/bench/leak_check.py
    python scripts/bench/leak_check.py --trainings 5 --sweeps 1   # a quicker look
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import results
import yaml

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = results.parser(__file__, __doc__, "every reading (and the machine)")
    p.add_argument("--trainings", type=int, default=20, help="short trainings (20)")
    p.add_argument("--sweeps", type=int, default=3, help="sweeps of two trials each (3)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per training and trial (1)")
    p.add_argument("--num-images", type=int, default=200, help="shapes images per job (200)")
    p.add_argument(
        "--settle", type=float, default=30.0, help="seconds Ray may take to tear a job down (30)"
    )
    return p.parse_args(argv)


def configs(args: argparse.Namespace, storage: Path):
    """The training config and the sweep config (the same, plus a grid of two lrs)."""
    from raycv.config import from_dict

    raw = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    raw["experiment"] = "leak"
    raw["run"] = {"storage": str(storage)}
    raw["data"]["shapes"]["num_images"] = args.num_images
    raw["train"]["epochs"] = args.epochs
    sweep = {
        **raw,
        "tune": {
            "searcher": "grid",
            "num_samples": 1,
            "scheduler": {"name": "fifo"},
            "space": {"optimizer.lr": {"grid": [1.0e-3, 2.0e-3]}},
        },
    }
    return from_dict(raw), from_dict(sweep)


def reading(ray_dir: Path, storage: Path) -> dict[str, Any]:
    """What is alive and used right now."""
    import ray
    from ray.util.state import list_actors, list_placement_groups

    alive = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
    groups = list_placement_groups(limit=10_000)
    store = _object_store()
    return {
        "actors_alive": len(alive),
        "actor_classes": sorted({a.class_name for a in alive}),
        "worker_processes": _ray_worker_processes(),
        "placement_groups_live": sum(g.state != "REMOVED" for g in groups),
        "cpus_reserved": ray.cluster_resources()["CPU"] - ray.available_resources().get("CPU", 0),
        "object_store_mib": store.object_store_bytes_used / MIB,
        "object_store_objects": store.num_local_objects,
        "tmp_files_outside_ray": _tmp_files(ray_dir, storage),
        "ray_session_mib": _size(ray_dir) / MIB,
        "driver_rss_mib": _rss() / MIB,
    }


def _object_store():
    # Ray has no public call for bytes in the object store; this is what `ray memory` reads.
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    return reply.store_stats


def _ray_worker_processes() -> int:
    """Ray worker processes on this machine, busy or idle: they rename themselves
    ``ray::<task or actor>`` (the State API's worker listing truncates past a few)."""
    count = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            count += cmdline.read_bytes().startswith(b"ray::")
        except OSError:
            continue  # gone meanwhile
    return count


def _tmp_files(ray_dir: Path, storage: Path) -> int:
    """Files under the temporary folder, Ray's own folder and the runs' storage left out."""
    skip = (ray_dir.resolve(), storage.resolve())
    count = 0
    for root, dirs, files in os.walk(tempfile.gettempdir()):
        here = Path(root).resolve()
        dirs[:] = [d for d in dirs if (here / d) not in skip and not (here / d).is_symlink()]
        count += len(files)
    return count


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def settled(baseline: dict[str, Any], ray_dir: Path, storage: Path, wait: float) -> dict:
    """The reading once actors, placement groups and reserved CPUs are back at the
    baseline, or after ``wait`` seconds; with the seconds it took."""
    started = time.perf_counter()
    while True:
        now = reading(ray_dir, storage)
        back = all(now[k] <= baseline[k] for k in ("actors_alive", "placement_groups_live"))
        if (back and now["cpus_reserved"] <= baseline["cpus_reserved"]) or (
            time.perf_counter() - started > wait
        ):
            return {**now, "settle_s": time.perf_counter() - started}
        time.sleep(1.0)


def run_jobs(args: argparse.Namespace, storage: Path, ray_dir: Path) -> list[dict[str, Any]]:
    from raycv.sweep.run import run_tune
    from raycv.train import run_train

    train_cfg, sweep_cfg = configs(args, storage)
    baseline = {"job": "baseline", **reading(ray_dir, storage), "settle_s": 0.0, "job_s": 0.0}
    rows = [baseline]
    jobs = [("train", run_train, train_cfg)] * args.trainings + [
        ("sweep", run_tune, sweep_cfg)
    ] * args.sweeps
    for i, (kind, run, cfg) in enumerate(jobs, 1):
        started = time.perf_counter()
        run(cfg)
        took = time.perf_counter() - started
        rows.append(
            {
                "job": f"{kind} {i}",
                **settled(baseline, ray_dir, storage, args.settle),
                "job_s": took,
            }
        )
        log.info("%s %d/%d done in %.0f s: %s", kind, i, len(jobs), took, _short(rows[-1]))
    return rows


def _short(r: dict[str, Any]) -> str:
    return (
        f"{r['actors_alive']} actors, {r['placement_groups_live']} placement groups, "
        f"{r['object_store_mib']:.1f} MiB in the object store"
    )


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    base, last = rows[0], rows[-1]
    store = [r["object_store_mib"] for r in rows[1:]]
    half = len(store) // 2
    return {
        "actors_left": last["actors_alive"] - base["actors_alive"],
        "worker_processes_left": last["worker_processes"] - base["worker_processes"],
        "placement_groups_left": last["placement_groups_live"] - base["placement_groups_live"],
        "cpus_still_reserved": last["cpus_reserved"] - base["cpus_reserved"],
        # growth = second half's mean minus the first half's: a leak grows, noise does not
        "object_store_growth_mib": (
            sum(store[half:]) / len(store[half:]) - sum(store[:half]) / max(half, 1)
            if half
            else 0.0
        ),
        "tmp_files_left": last["tmp_files_outside_ray"] - base["tmp_files_outside_ray"],
        "driver_rss_growth_mib": last["driver_rss_mib"] - rows[1]["driver_rss_mib"],
        "ray_logs_growth_mib": last["ray_session_mib"] - base["ray_session_mib"],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results.setup_logging()
    import ray

    from raycv.session import ensure_ray
    from raycv.sweep.run import local_sweep_cpus

    storage = Path(tempfile.mkdtemp(prefix="bench-leak-"))
    _, sweep_cfg = configs(args, storage)
    ensure_ray(sweep_cfg, num_cpus=local_sweep_cpus(sweep_cfg))  # as raycv tune starts it
    ray_dir = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    info = results.machine()
    rows = run_jobs(args, storage, ray_dir)
    found = verdict(rows)
    ray.shutdown()
    columns = ["after", "job s", "actors", "workers", "PGs", "CPUs held", "store MiB",
               "objects", "tmp files", "Ray logs MiB", "driver MiB"]  # fmt: skip
    keys = ["job_s", "actors_alive", "worker_processes", "placement_groups_live",
            "cpus_reserved", "object_store_mib", "object_store_objects",
            "tmp_files_outside_ray", "ray_session_mib", "driver_rss_mib"]  # fmt: skip
    print(results.header("Leak check: one Ray session, jobs back to back", info))
    print(results.table(columns, [[r["job"], *[r[k] for k in keys]] for r in rows]))
    print("left behind after the last job (against the baseline):")
    print("\n".join(f"  {k}: {v:.1f}" if isinstance(v, float) else f"  {k}: {v}"
                    for k, v in found.items()))  # fmt: skip
    results.write(
        args.out,
        {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
         "verdict": found},
    )  # fmt: skip


if __name__ == "__main__":
    main()
