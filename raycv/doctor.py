"""``raycv doctor``: will this config run on this cluster? Checked before a long run starts.

- **resources**: the workers' bundles (``scaling.cpus_per_worker``, and
  ``gpus_per_worker`` with ``use_gpu``) placed the way Ray Train places them: each bundle on
  one node; PACK and SPREAD fit by what all nodes hold together, STRICT_PACK on one node,
  STRICT_SPREAD on ``num_workers`` different nodes. Ray Data needs a CPU the workers leave
  free (without one, training waits forever).
- **storage**: a tiny task pinned to every node writes a probe file under ``run.storage``
  (pyarrow, so local paths and URIs alike) and later deletes it; on several nodes each node
  also reads the probe another node wrote, because a local path is only usable when it is
  the same shared file system everywhere.
- **versions**: torch, its CUDA build and NCCL on every node agree (DDP across different
  builds fails or hangs).

Each problem comes with its fix in one line. Resources are the nodes' capacity, not what
other jobs hold right now, and only running nodes count: an autoscaling cluster that has
not started its GPU nodes yet shows none."""

from __future__ import annotations

import contextlib
import logging
import math
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raycv.config import Config, ConfigError, ScalingConfig
from raycv.runs import storage_root
from raycv.session import ensure_ray, oversubscription, physical_cores

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 120  # a node that needs longer to run a tiny task is itself a problem
Level = Literal["ok", "warn", "error"]


@dataclass(frozen=True)
class Node:
    node_id: str
    address: str
    cpus: float
    gpus: float
    is_head: bool = False

    @property
    def short_id(self) -> str:
        return self.node_id[:8]


@dataclass(frozen=True)
class NodeProbe:
    """What one node answered; an ``*_error`` of None means that step worked."""

    node_id: str
    torch: str | None = None
    cuda: str | None = None  # the CUDA torch was built with; None for a CPU build
    nccl: str | None = None
    cores: int | None = None  # physical cores: Ray counts logical CPUs, which may be more
    torch_error: str | None = None
    write_error: str | None = None
    peer_error: str | None = None  # reading the probe another node wrote
    error: str | None = None  # the probe task itself did not run


@dataclass(frozen=True)
class Finding:
    check: str
    level: Level
    message: str
    fix: str = ""


@dataclass
class Report:
    nodes: list[Node]
    scaling: ScalingConfig
    storage: str
    probes: dict[str, NodeProbe] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def ok(self) -> bool:
        """True when nothing found stops the run."""
        return not self.errors


def run_doctor(cfg: Config, address: str | None = None) -> Report:
    """Check ``cfg`` against the cluster at ``address`` (default: the one ``raycv train``
    would use: the current connection, RAY_ADDRESS, else a new local Ray)."""
    _connect(cfg, address)
    nodes = alive_nodes()
    report = Report(nodes, cfg.scaling, storage_location(cfg.run.storage))
    log.info("probing %d nodes: versions and run.storage %s", len(nodes), report.storage)
    report.probes = probe_nodes(nodes, report.storage)
    report.findings = [
        check_resources(cfg.scaling, nodes),
        *check_idle_gpus(cfg.scaling, nodes),
        check_data_cpus(cfg.scaling, nodes),
        check_cores(cfg.scaling, nodes, report.probes),
        *check_storage(report.storage, nodes, report.probes),
        *check_versions(cfg.scaling, nodes, report.probes),
    ]
    return report


def _connect(cfg: Config, address: str | None) -> None:
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        ensure_ray(cfg)


def alive_nodes() -> list[Node]:
    return [
        Node(
            node_id=n["NodeID"],
            address=n["NodeManagerAddress"],
            cpus=n["Resources"].get("CPU", 0.0),
            gpus=n["Resources"].get("GPU", 0.0),
            is_head="node:__internal_head__" in n["Resources"],
        )
        for n in ray.nodes()
        if n["Alive"]
    ]


# --- resources -----------------------------------------------------------------------------


def bundle(scaling: ScalingConfig) -> dict[str, float]:
    """One worker's resources, as Ray Train asks for them."""
    gpus = scaling.gpus_per_worker if scaling.use_gpu else 0.0
    return {"CPU": scaling.cpus_per_worker, "GPU": gpus}


def bundles_on(node: Node, need: dict[str, float]) -> int:
    """How many worker bundles fit on ``node`` (a bundle never spans nodes)."""
    have = {"CPU": node.cpus, "GPU": node.gpus}
    # A small tolerance: 0.1 + 0.2 of a CPU must fit in 0.3.
    return min(math.floor(have[k] / v + 1e-9) for k, v in need.items() if v > 0)


def room_for_workers(scaling: ScalingConfig, nodes: list[Node]) -> int:
    """Workers the cluster can place at once under ``scaling.placement_strategy``."""
    per_node = [bundles_on(n, bundle(scaling)) for n in nodes]
    if scaling.placement_strategy == "STRICT_SPREAD":
        return sum(1 for k in per_node if k >= 1)
    if scaling.placement_strategy == "STRICT_PACK":
        return max(per_node, default=0)
    return sum(per_node)


def check_resources(scaling: ScalingConfig, nodes: list[Node]) -> Finding:
    want, room = scaling.min_workers, room_for_workers(scaling, nodes)
    what = _describe_workers(scaling)
    if room >= want:
        starts = f"; starts with {min(room, scaling.max_workers)}" if scaling.elastic else ""
        return Finding("resources", "ok", f"{what} fit (room for {room}{starts})")
    return Finding(
        "resources",
        "error",
        f"{what} do not fit: {_why(scaling, nodes, room)}",
        _resources_fix(scaling, nodes, room),
    )


def check_cores(scaling: ScalingConfig, nodes: list[Node], probes: dict[str, NodeProbe]) -> Finding:
    """The workers' CPUs against the physical cores of the nodes (their CPUs counted where
    a node did not answer)."""
    cores = sum(_cores(n, probes) for n in nodes)
    warning = oversubscription(scaling, cores)
    if warning:
        return Finding("cores", "warn", warning)
    return Finding(
        "cores", "ok", f"the workers take {scaling.max_cpus:g} of {cores} physical cores"
    )


def _cores(node: Node, probes: dict[str, NodeProbe]) -> int:
    probe = probes.get(node.node_id)
    return probe.cores if probe and probe.cores else math.floor(node.cpus)


def _describe_workers(scaling: ScalingConfig) -> str:
    need = bundle(scaling)
    each = f"{need['CPU']:g} CPU" + (f" + {need['GPU']:g} GPU" if need["GPU"] else "")
    count = scaling.num_workers
    if scaling.elastic:
        count = f"{scaling.min_workers} to {scaling.max_workers}"
    return f"{count} workers x ({each}), {scaling.placement_strategy}"


def _why(scaling: ScalingConfig, nodes: list[Node], room: int) -> str:
    if room == 0:
        return f"no node holds even one worker (largest: {_largest(nodes)})"
    if scaling.placement_strategy == "STRICT_SPREAD":
        return f"one worker per node, and only {room} nodes hold one"
    if scaling.placement_strategy == "STRICT_PACK":
        return f"all on one node, and the largest holds {room}"
    total = f"{sum(n.cpus for n in nodes):g} CPUs, {sum(n.gpus for n in nodes):g} GPUs"
    return f"the {len(nodes)} nodes ({total}) hold {room}"


def _largest(nodes: list[Node]) -> str:
    if not nodes:
        return "none"
    node = max(nodes, key=lambda n: (n.gpus, n.cpus))
    return f"{node.cpus:g} CPUs, {node.gpus:g} GPUs"


def _resources_fix(scaling: ScalingConfig, nodes: list[Node], room: int) -> str:
    tail = "or add nodes (an autoscaling cluster: raise min_workers so doctor sees them)"
    if scaling.use_gpu and not any(n.gpus for n in nodes):
        return f"the cluster has no GPUs: set scaling.use_gpu=false, {tail}"
    key = "gpus_per_worker" if _gpus_bind(scaling, nodes) else "cpus_per_worker"
    if room == 0:
        return f"lower scaling.{key}, {tail}"
    if scaling.placement_strategy == "STRICT_SPREAD":
        return f"set {_fewer(scaling, room)} or scaling.placement_strategy=SPREAD, {tail}"
    return f"set {_fewer(scaling, room)} or lower scaling.{key}, {tail}"


def _fewer(scaling: ScalingConfig, room: int) -> str:
    """The worker setting that fits ``room``: an elastic range keeps its maximum."""
    if scaling.elastic:
        return f"scaling.num_workers=[{room}, {scaling.max_workers}]"
    return f"scaling.num_workers={room}"


def _gpus_bind(scaling: ScalingConfig, nodes: list[Node]) -> bool:
    """Whether GPUs, not CPUs, limit how many workers fit."""
    if not scaling.use_gpu:
        return False
    by_cpu = sum(bundles_on(n, {"CPU": scaling.cpus_per_worker}) for n in nodes)
    by_gpu = sum(bundles_on(n, {"GPU": scaling.gpus_per_worker}) for n in nodes)
    return by_gpu < by_cpu


def check_idle_gpus(scaling: ScalingConfig, nodes: list[Node]) -> list[Finding]:
    gpus = sum(n.gpus for n in nodes)
    if scaling.use_gpu or not gpus:
        return []
    return [
        Finding(
            "GPUs",
            "warn",
            f"the cluster has {gpus:g} GPUs and scaling.use_gpu is false: they stay idle",
            "set scaling.use_gpu=true to train on them",
        )
    ]


def check_data_cpus(scaling: ScalingConfig, nodes: list[Node]) -> Finding:
    """Train workers hold their CPUs for the whole run; Ray Data's decode and augment tasks
    need one whole CPU on one node besides them, or every epoch waits forever. Half a CPU
    left on each of two nodes is not one: an elastic run takes as many workers as fit."""
    held = min(scaling.max_workers, max(room_for_workers(scaling, nodes), scaling.min_workers))
    left = cpus_left(scaling, nodes, held)
    most = max(left, default=0.0)
    if most >= 1 - 1e-9:
        return Finding(
            "data CPUs",
            "ok",
            f"{sum(left):g} CPUs left for Ray Data next to the workers ({most:g} on one node)",
        )
    return Finding(
        "data CPUs",
        "error",
        f"{max(sum(left), 0):g} CPUs left for Ray Data once the workers hold theirs, "
        f"{max(most, 0):g} at most on one node: data loading would wait forever",
        "lower scaling.cpus_per_worker (fractions work, e.g. 0.5) so that a node keeps a "
        "whole CPU, use fewer workers, or add a node with CPUs",
    )


def cpus_left(scaling: ScalingConfig, nodes: list[Node], workers: int) -> list[float]:
    """The CPUs each node keeps once ``workers`` bundles are placed, near enough to how
    Ray places them: SPREAD on the node with the most free, PACK on the fullest that fits."""
    need = bundle(scaling)
    free = [{"CPU": n.cpus, "GPU": n.gpus} for n in nodes]
    spread = scaling.placement_strategy in ("SPREAD", "STRICT_SPREAD")
    for _ in range(workers):
        fits = [f for f in free if all(f[k] + 1e-9 >= v for k, v in need.items())]
        if not fits:
            break
        chosen = (max if spread else min)(fits, key=lambda f: f["CPU"])
        for k, v in need.items():
            chosen[k] -= v
    return [f["CPU"] for f in free]


def require_fit(scaling: ScalingConfig) -> None:
    """Before a Ray Train run: refuse, in one line, workers this cluster can never hold.

    Ray Train 2.60 waits for the workers' placement group, times out and retries without
    end (its controller failures are unlimited); it refuses an impossible request itself
    only where an autoscaler config states the cluster's maximum. A cluster that cannot
    grow (a local Ray, ``ray start`` nodes, KubeRay without autoscaling) is therefore
    checked here against its running nodes, with the same arithmetic as ``raycv doctor``."""
    if _can_autoscale():
        return
    nodes = alive_nodes()
    for finding in (check_resources(scaling, nodes), check_data_cpus(scaling, nodes)):
        if finding.level == "error":
            raise ConfigError(f"{finding.message}; {finding.fix}")


def _can_autoscale() -> bool:
    """Whether an autoscaler may still add nodes: it published a cluster config. Unknown
    (another Ray version) counts as yes: never refuse a run on a guess."""
    try:
        from ray._private.state import state  # where Ray Train's own check reads it
    except ImportError:
        return True
    return state.get_max_resources_from_cluster_config() is not None


# --- probes ----------------------------------------------------------------------------------


def storage_location(storage: str) -> str:
    """What the probes open: a URI as given, a path resolved as run folders resolve it."""
    if "://" in storage:
        return storage
    return str(storage_root(storage))


def probe_nodes(nodes: list[Node], storage: str) -> dict[str, NodeProbe]:
    """Three rounds of tiny tasks pinned to each node: versions and a probe file written;
    the next node's probe read back; each node's own probe deleted."""
    token = uuid.uuid4().hex[:8]  # two doctors at once never touch each other's probes
    names = {n.node_id: f".raycv-doctor-{token}-{n.short_id}" for n in nodes}
    wrote = _run_on_each(nodes, _write_probe, lambda n: (storage, names[n.node_id]))
    peers: dict[str, Any] = {}
    if len(nodes) > 1:
        ring = {n.node_id: nodes[(i + 1) % len(nodes)] for i, n in enumerate(nodes)}
        peers = _run_on_each(
            nodes, _read_probe, lambda n: (storage, names[ring[n.node_id].node_id])
        )
    _run_on_each(nodes, _delete_probe, lambda n: (storage, names[n.node_id]))
    return {n.node_id: _probe_of(n.node_id, wrote[n.node_id], peers.get(n.node_id)) for n in nodes}


def _run_on_each(nodes: list[Node], task, args_for) -> dict[str, Any]:
    """``task(*args_for(node))`` on each node (never elsewhere); a task that failed or did
    not answer in time becomes ``{"error": ...}`` for its node only."""
    refs = {
        n.node_id: task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)
        ).remote(*args_for(n))
        for n in nodes
    }
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    return {node_id: _result(ref, ref in ready) for node_id, ref in refs.items()}


def _result(ref, ready: bool) -> Any:
    if not ready:
        ray.cancel(ref, force=True)
        return {"error": f"no answer in {PROBE_TIMEOUT_S} s (node overloaded or unreachable)"}
    try:
        return ray.get(ref)
    except Exception as e:  # the node died, or its worker could not start
        return {"error": _one_line(e)}


def _probe_of(node_id: str, wrote: dict, peer: Any) -> NodeProbe:
    """``peer`` is None (read back intact, or a single node), an error line, or the read
    task's own failure."""
    peer_error = peer.get("error") if isinstance(peer, dict) else peer
    return NodeProbe(node_id=node_id, peer_error=peer_error, **wrote)


def _one_line(e: BaseException) -> str:
    e = getattr(e, "cause", None) or e  # a Ray task error carries the original as cause
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _filesystem(storage: str):
    """(pyarrow file system, path in it) for a URI or a local path."""
    import pyarrow.fs as pafs

    if "://" in storage:
        return pafs.FileSystem.from_uri(storage)
    return pafs.LocalFileSystem(), storage


@ray.remote(num_cpus=0)
def _write_probe(storage: str, name: str) -> dict:
    """On one node: its torch build, and whether ``storage`` takes a file there. Needs no
    CPU, so it runs even where every CPU is taken (or a head started with 0 CPUs)."""
    facts: dict[str, Any] = {**_torch_facts(), "cores": physical_cores()}
    try:
        fs, root = _filesystem(storage)
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(f"{root}/{name}") as out:
            out.write(name.encode())
    except Exception as e:
        facts["write_error"] = _one_line(e)
    return facts


def _torch_facts() -> dict[str, Any]:
    try:
        import torch
    except ImportError as e:
        return {"torch_error": f"torch is not installed ({e})"}
    nccl = None
    if torch.version.cuda:
        try:
            version = torch.cuda.nccl.version()
            nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except Exception:  # a CUDA build without NCCL (e.g. on Windows)
            nccl = None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "nccl": nccl}


@ray.remote(num_cpus=0)
def _read_probe(storage: str, name: str) -> str | None:
    """On one node: read the probe another node wrote (None: read back intact)."""
    try:
        fs, root = _filesystem(storage)
        with fs.open_input_stream(f"{root}/{name}") as stream:
            data = stream.read()
    except FileNotFoundError:
        return "the probe another node wrote is not there"
    except Exception as e:
        return _one_line(e)
    return None if data == name.encode() else "the probe another node wrote reads back wrong"


@ray.remote(num_cpus=0)
def _delete_probe(storage: str, name: str) -> None:
    fs, root = _filesystem(storage)
    with contextlib.suppress(FileNotFoundError):  # never written: the write failed
        fs.delete_file(f"{root}/{name}")


# --- storage and versions ----------------------------------------------------------------


def check_storage(location: str, nodes: list[Node], probes: dict[str, NodeProbe]) -> list[Finding]:
    findings = [_check_writable(location, nodes, probes)]
    if len(nodes) > 1 and findings[0].level == "ok":
        findings.append(_check_shared(location, nodes, probes))
    return findings


def _check_writable(location: str, nodes: list[Node], probes: dict[str, NodeProbe]) -> Finding:
    failed = [(n, probes[n.node_id]) for n in nodes if _write_failed(probes[n.node_id])]
    if not failed:
        return Finding(
            "storage", "ok", f"run.storage {location} is writable on {_every(len(nodes))}"
        )
    node, probe = failed[0]
    where = f"{len(failed)} of {len(nodes)} nodes, e.g. {node.short_id} ({node.address})"
    return Finding(
        "storage",
        "error",
        f"run.storage {location} cannot be written on {where}: {probe.write_error or probe.error}",
        "give run.storage a folder (or bucket) every node can write: fix its permissions, or "
        "pass run.storage=PATH",
    )


def _write_failed(probe: NodeProbe) -> bool:
    return probe.error is not None or probe.write_error is not None


def _check_shared(location: str, nodes: list[Node], probes: dict[str, NodeProbe]) -> Finding:
    unread = [n for n in nodes if probes[n.node_id].peer_error]
    if not unread:
        return Finding(
            "shared storage",
            "ok",
            f"a file written on one node is read on another ({_every(len(nodes))})",
        )
    node = unread[0]
    return Finding(
        "shared storage",
        "error",
        f"run.storage {location} is not shared: node {node.short_id} ({node.address}) "
        f"cannot read another node's probe ({probes[node.node_id].peer_error}); checkpoints "
        "written by workers on other nodes would be lost",
        "mount one shared file system (NFS, EFS, Filestore) at this path on every node and "
        "point run.storage at it (cluster/*.yaml: /mnt/raycv)",
    )


def check_versions(
    scaling: ScalingConfig, nodes: list[Node], probes: dict[str, NodeProbe]
) -> list[Finding]:
    answered = [n for n in nodes if probes[n.node_id].torch]
    findings = [_agree("torch", [(n, probes[n.node_id].torch) for n in answered])]
    gpu_nodes = [n for n in answered if n.gpus > 0]
    if scaling.use_gpu and gpu_nodes:
        cpu_builds = [n for n in gpu_nodes if not probes[n.node_id].cuda]
        if cpu_builds:
            findings.append(_cpu_build_finding(cpu_builds[0], probes[cpu_builds[0].node_id]))
        findings.append(_agree("CUDA", [(n, probes[n.node_id].cuda) for n in gpu_nodes]))
        findings.append(_agree("NCCL", [(n, probes[n.node_id].nccl) for n in gpu_nodes]))
    silent = [n for n in nodes if not probes[n.node_id].torch]
    if silent:
        findings.append(_silent_finding(silent[0], probes[silent[0].node_id]))
    return findings


def _silent_finding(node: Node, probe: NodeProbe) -> Finding:
    return Finding(
        "versions",
        "error",
        f"node {node.short_id} ({node.address}) did not report its torch: "
        f"{probe.torch_error or probe.error}",
        "install torch there (setup_commands in cluster/*.yaml), or look at that node: "
        "`ray status`, its logs under /tmp/ray/session_latest/logs",
    )


def _agree(what: str, versions: list[tuple[Node, str | None]]) -> Finding:
    counts = Counter(v for _, v in versions)
    if len(counts) <= 1:
        version = next(iter(counts), None) or "none"
        return Finding("versions", "ok", f"{what} {version} on {_every(len(versions))}")
    usual = counts.most_common(1)[0][0]
    odd = [(n, v) for n, v in versions if v != usual]
    node, version = odd[0]
    return Finding(
        "versions",
        "error",
        f"{what} differs: {version} on node {node.short_id} ({node.address}), {usual} on "
        f"{counts[usual]} others; DDP across different builds fails or hangs",
        f"install the same {what} build everywhere (setup_commands in cluster/*.yaml, or one "
        "image for every node)",
    )


def _cpu_build_finding(node: Node, probe: NodeProbe) -> Finding:
    return Finding(
        "versions",
        "error",
        f"node {node.short_id} ({node.address}) has GPUs but torch {probe.torch} is a CPU build",
        "install torch's CUDA build there (the default PyPI wheel on Linux), or set "
        "scaling.use_gpu=false",
    )


# --- the table ---------------------------------------------------------------------------


def format_report(report: Report) -> str:
    """The nodes, then one line per check (and its fix), then the verdict."""
    lines = [_headline(report), "", *_node_table(report), ""]
    for f in report.findings:
        lines.append(f"{f.level.upper():<5}  {f.check:<14}  {f.message}")
        if f.fix and f.level != "ok":
            lines.append(f"{'':<5}  {'':<14}  fix: {f.fix}")
    lines += ["", _verdict(report)]
    return "\n".join(lines)


def _headline(report: Report) -> str:
    cpus = sum(n.cpus for n in report.nodes)
    cores = sum(_cores(n, report.probes) for n in report.nodes)
    gpus = sum(n.gpus for n in report.nodes)
    return (
        f"raycv doctor: {_nodes(len(report.nodes))} ({cpus:g} CPUs on {cores} physical cores, "
        f"{gpus:g} GPUs); config wants "
        f"{_describe_workers(report.scaling)}; run.storage {report.storage}"
    )


def _node_table(report: Report) -> list[str]:
    rows = [("node", "address", "CPUs", "cores", "GPUs", "torch", "CUDA", "NCCL", "storage")]
    for n in report.nodes:
        p = report.probes.get(n.node_id, NodeProbe(n.node_id))
        rows.append(
            (
                n.short_id + (" (head)" if n.is_head else ""),
                n.address,
                f"{n.cpus:g}",
                str(p.cores or "?"),
                f"{n.gpus:g}",
                p.torch or "?",
                p.cuda or "-",
                p.nccl or "-",
                _storage_cell(p),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _nodes(count: int) -> str:
    return f"{count} node" + ("" if count == 1 else "s")


def _every(count: int) -> str:
    return "the only node" if count == 1 else f"all {count} nodes"


def _storage_cell(probe: NodeProbe) -> str:
    if probe.error or probe.write_error:
        return "not writable"
    return "not shared" if probe.peer_error else "ok"


def _verdict(report: Report) -> str:
    if report.ok:
        return "verdict: ready; the run fits this cluster"
    return f"verdict: {len(report.errors)} problem(s); the run cannot work as configured"
