#!/usr/bin/env python
"""Run a raycv command on a Ray cluster as a Ray job, follow it, and fetch its run folder.

What `ray job submit --address ADDR --working-dir . -- raycv ...` does, through Ray's
JobSubmissionClient, plus the steps after it: the job's logs stream here as it runs, the
final status is printed, and on success the run folder (the raycv command's last line of
output) is copied here: with pyarrow from a storage URI (s3://, gs://, file://) or from a
path this machine can read (a shared file system, a local cluster), with `ray rsync-down`
from the head node when --cluster names the cluster file, else its location is printed.
This script's own last line of output is the fetched folder (or the remote one).

Examples:
  ray dashboard cluster/aws.yaml &            # SSH tunnel: Jobs API on 127.0.0.1:8265
  python scripts/submit.py --cluster cluster/aws.yaml -- \\
      raycv train configs/smoke.yaml scaling.use_gpu=true run.storage=/mnt/raycv/runs
  kubectl port-forward svc/raycv-head-svc 8265:8265 &
  python scripts/submit.py -- raycv pipeline configs/quickstart.yaml run.storage=/mnt/raycv/runs

Token authentication: the clusters in cluster/ require it, so this script runs in token
mode unless RAY_AUTH_MODE says otherwise, and sends the token from RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (Ray's own order).

Exit status: 0 when the job succeeded, 1 when it failed or was stopped (or the cluster
could not be reached, or the run folder could not be fetched), 2 for bad arguments, 130
when interrupted (the job keeps running).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath

# Before Ray is imported: Ray reads the mode once, and sends a token only in token mode.
os.environ.setdefault("RAY_AUTH_MODE", "token")

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # where `ray dashboard` / port-forward put it
# Never uploaded: local results, the virtual environment, git history, bytecode.
EXCLUDES = ["/runs/", "/.venv/", "/.git/", "__pycache__/", "*.egg-info/"]
RUN_FOLDER_LINE = re.compile(r"^(/\S*|[a-z][a-z0-9+.-]*://\S+)$")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/submit.py",
        description=__doc__.split("\n\n")[1],
        epilog="\n\n".join(__doc__.split("\n\n")[2:]) + "\n\nWalkthrough: docs/cluster.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="the command the job runs, after --, e.g. -- raycv train configs/smoke.yaml",
    )
    parser.add_argument(
        "--address",
        default=_default_address(),
        help="the cluster's Jobs API (dashboard) URL (default: $RAY_ADDRESS when it is an "
        f"http(s) URL, else {DEFAULT_ADDRESS}, where `ray dashboard CLUSTER_YAML` and "
        "`kubectl port-forward svc/raycv-head-svc 8265:8265` put it)",
    )
    parser.add_argument(
        "--working-dir",
        default=".",
        help="folder uploaded as the job's working directory: the code and configs the job "
        "runs (default: the current folder; runs/, .venv/, .git/ and __pycache__/ are left out)",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="another .gitignore-style pattern to leave out of the upload (repeatable)",
    )
    parser.add_argument(
        "--runtime-env-json",
        metavar="JSON",
        help='more of the job\'s runtime environment, e.g. \'{"env_vars": {"A": "1"}}\'; '
        "its excludes are added to the ones above",
    )
    parser.add_argument(
        "--submission-id", help="a name for the job (default: Ray makes one, raysubmit_...)"
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="submit, print the job id and return (follow later with `ray job logs -f ID`)",
    )
    parser.add_argument(
        "--download",
        default="runs/remote",
        metavar="DIR",
        help="where the run folder is copied to, as DIR/<run folder name> (default: runs/remote)",
    )
    parser.add_argument(
        "--no-download", action="store_true", help="only print where the run folder is"
    )
    parser.add_argument(
        "--cluster",
        metavar="CLUSTER_YAML",
        help="the `ray up` file of the cluster (e.g. cluster/aws.yaml): a run folder on the "
        "head node's own disk is fetched with `ray rsync-down CLUSTER_YAML`",
    )
    return parser


def _default_address() -> str:
    address = os.environ.get("RAY_ADDRESS", "")
    return address if address.startswith(("http://", "https://")) else DEFAULT_ADDRESS


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --, e.g. -- raycv train configs/smoke.yaml")
    runtime_env = _runtime_env(args, parser)
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(args.address)
        job_id = _submit(
            client,
            entrypoint=shlex.join(command),
            runtime_env=runtime_env,
            submission_id=args.submission_id,
        )
    except Exception as e:  # connection refused, 401/403, a bad runtime_env: one line
        _say(f"error: could not submit to {args.address}: {_first_line(e)}")
        _say(_hint(str(e)))
        return 1
    _say(f"submitted {job_id} to {args.address}")
    if args.no_wait:
        print(job_id)
        return 0
    return _follow_and_fetch(client, job_id, args)


def _hint(error: str) -> str:
    if "Authentication" in error:
        return (
            "the token is missing or not this cluster's: ~/.ray/auth_token (the file `ray up` "
            "copied), or RAY_AUTH_TOKEN (KubeRay: the Secret named after the cluster)"
        )
    return "is the tunnel up? `ray dashboard CLUSTER_YAML` or `kubectl port-forward ...`"


def _runtime_env(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    extra = {}
    if args.runtime_env_json:
        try:
            extra = json.loads(args.runtime_env_json)
        except json.JSONDecodeError as e:
            parser.error(f"--runtime-env-json is not JSON: {e}")
    working_dir = Path(args.working_dir).expanduser().resolve()
    if not working_dir.is_dir():
        parser.error(f"--working-dir {args.working_dir} is not a folder")
    excludes = EXCLUDES + args.exclude + extra.pop("excludes", [])
    return {**extra, "working_dir": str(working_dir), "excludes": excludes}


def _submit(client, retry_s: float = 120, **job) -> str:
    """Ray's job agent starts a little after the cluster (right after `ray up`, or on a busy
    head) and answers "No available agent" until then: that is retried, nothing else is."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def _follow_and_fetch(client, job_id: str, args: argparse.Namespace) -> int:
    try:
        asyncio.run(_stream_logs(client, job_id))
        status = _wait_until_done(client, job_id)
    except KeyboardInterrupt:
        _say(f"\nstopped following; {job_id} keeps running.")
        _say(f"  follow: ray job logs -f --address {args.address} {job_id}")
        _say(f"  stop:   ray job stop --address {args.address} {job_id}")
        return 130
    message = (client.get_job_info(job_id).message or "").strip().splitlines()
    _say(f"{job_id}: {status}" + (f" ({message[0]})" if message else ""))
    if status != "SUCCEEDED":
        return 1
    run_folder = run_folder_from_logs(client.get_job_logs(job_id))
    if run_folder is None:
        _say("the job printed no run folder as its last line; nothing to fetch")
        return 0
    try:
        print(_fetch(run_folder, args))
    except (OSError, subprocess.CalledProcessError) as e:
        _say(f"error: the job succeeded, but fetching {run_folder} failed: {_first_line(e)}")
        return 1
    return 0


async def _stream_logs(client, job_id: str) -> None:
    """Print the job's output as it comes, until the job ends."""
    try:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except RuntimeError as e:  # the log stream dropped; the job itself may still run
        _say(f"log stream ended early ({_first_line(e)}); waiting for the job to finish")


def _wait_until_done(client, job_id: str, poll_s: float = 1.0) -> str:
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(poll_s)
    return str(status.value)


def run_folder_from_logs(logs: str) -> str | None:
    """The run folder a raycv command printed as its last line: the last line that is only
    an absolute path or a URI (Ray may add lines of its own after it)."""
    for line in reversed(logs.splitlines()):
        if RUN_FOLDER_LINE.match(line.strip()):
            return line.strip()
    return None


def _fetch(run_folder: str, args: argparse.Namespace) -> str:
    """Copy the run folder here when it can be reached; return where it now is."""
    if "/runtime_resources/" in run_folder:
        _say(
            "note: the run folder is inside the job's temporary working directory on the "
            "head (run.storage is relative); pass run.storage=/mnt/raycv/runs or a shared path"
        )
    if args.no_download:
        return run_folder
    dest = Path(args.download).expanduser().resolve() / PurePosixPath(run_folder).name
    if "://" in run_folder or Path(run_folder).is_dir():
        _copy_with_pyarrow(run_folder, dest)
    elif args.cluster:
        _rsync_down(args.cluster, run_folder, dest)
    else:
        _say(f"the run folder is on the head node at {run_folder}; fetch it with")
        _say(f"  ray rsync-down CLUSTER_YAML {run_folder}/ {dest}/   (or pass --cluster)")
        return run_folder
    _say(f"fetched {run_folder} -> {dest}")
    return str(dest)


def _copy_with_pyarrow(source: str, dest: Path) -> None:
    import pyarrow.fs as pafs

    dest.mkdir(parents=True, exist_ok=True)
    # A plain path is read through the local file system; a URI through its own.
    source_fs = None if "://" in source else pafs.LocalFileSystem()
    pafs.copy_files(
        source,
        str(dest),
        source_filesystem=source_fs,
        destination_filesystem=pafs.LocalFileSystem(),
    )


def _rsync_down(cluster_yaml: str, source: str, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts", "rsync-down"]
    subprocess.run([*ray_cli, cluster_yaml, f"{source}/", f"{dest}/"], check=True)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _say(message: str) -> None:
    """Status lines go to stderr, so stdout carries the job's output and the folder."""
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
