"""The files under cluster/: the `ray up` files pass the installed Ray's own schema and
validator, the KubeRay manifests have the fields KubeRay needs (and a RayJob entrypoint that
raycv's own parser and config accept), and the security defaults hold: no Ray port open to
the world, no credentials, token authentication on. Nothing here starts Ray."""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from raycv.cli import parse
from raycv.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
RAY_UP_FILES = ["aws.yaml", "gcp.yaml", "local.yaml"]
CLOUD_FILES = ["aws.yaml", "gcp.yaml"]
KUBERAY_FILES = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/storage.yaml"]
ALL_FILES = RAY_UP_FILES + KUBERAY_FILES
RAY_PORTS = (6379, 8265, 10001)  # GCS, dashboard + Jobs API, Ray Client
TORCH_PINS = "torch==2.14.1 torchvision==0.29.1"  # scripts/setup.sh's pair
TOKEN_FILE = "~/.ray/auth_token"


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def strings(node: Any) -> Iterator[str]:
    """Every string in a parsed YAML document, keys included."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, str):
        yield node


def test_every_cluster_file_is_checked():
    found = {str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*.yaml")}
    assert found == set(ALL_FILES)


# --- `ray up` files -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_file_matches_the_installed_rays_schema(name, ray_schema):
    jsonschema.validate(load(name), ray_schema)


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_file_passes_rays_own_validator(name):
    """What `ray up` does before it calls the cloud: defaults merged, then validated."""
    config = prepare_config(load(name))
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]
    assert config["max_workers"] >= 1


def _gpu_worker_types(config: dict) -> dict[str, dict]:
    head = config["head_node_type"]
    types = config["available_node_types"]
    return {k: t for k, t in types.items() if k != head and _has_gpu(config, t)}


def _has_gpu(config: dict, node_type: dict) -> bool:
    node = node_type["node_config"]
    if config["provider"]["type"] == "aws":  # EC2 GPU families: g4dn, g5, g6, p4d, p5, ...
        return re.match(r"^[gp]\d", node["InstanceType"]) is not None
    has_accelerator = sum(a["acceleratorCount"] for a in node.get("guestAccelerators", []))
    return has_accelerator >= 1 and node_type["resources"].get("GPU", 0) == has_accelerator


def _is_spot(config: dict, node_type: dict) -> bool:
    node = node_type["node_config"]
    if config["provider"]["type"] == "aws":
        return node.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    return node.get("scheduling", {}).get("provisioningModel") == "SPOT"


@pytest.mark.parametrize("name", CLOUD_FILES)
def test_cloud_file_has_a_cpu_head_and_autoscaled_gpu_workers_with_a_spot_option(name):
    config = load(name)
    head = config["available_node_types"][config["head_node_type"]]
    assert not _has_gpu(config, head)
    gpu_types = _gpu_worker_types(config)
    on_demand = [t for t in gpu_types.values() if not _is_spot(config, t)]
    spot = [t for t in gpu_types.values() if _is_spot(config, t)]
    assert on_demand and spot
    for node_type in gpu_types.values():
        assert node_type["min_workers"] == 0  # scale from zero: idle GPUs cost money
    assert max(t["max_workers"] for t in on_demand) >= 1
    assert config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_file_installs_raycv_with_the_pinned_torch(name):
    config = load(name)
    setup = " ".join(config["setup_commands"])
    assert TORCH_PINS in setup
    assert re.search(r"pip install (-q )?-e ~/raycv\b", setup)
    for remote, local in config["file_mounts"].items():
        if local.startswith("./"):  # the repository parts pip install -e needs
            assert (REPO / local).exists(), f"{name}: file_mounts {remote}: {local} is missing"
    synced = set(config["file_mounts"])
    assert {"~/raycv/pyproject.toml", "~/raycv/raycv"} <= synced


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_file_starts_every_node_with_token_auth(name):
    from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR

    config = load(name)
    assert AUTH_MODE_ENV_VAR == "RAY_AUTH_MODE"  # the variable this Ray reads
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    for command in ray_starts:
        assert command.index(f"export {AUTH_MODE_ENV_VAR}=token") < command.index("ray start")
    # The token travels as a file copied from the user's machine, never as a value.
    assert config["file_mounts"][TOKEN_FILE] == TOKEN_FILE


def _ports(rule: dict) -> range:
    if rule.get("IpProtocol") in ("-1", -1):
        return range(0, 65536)
    return range(rule["FromPort"], rule["ToPort"] + 1)


def test_aws_security_group_keeps_ray_ports_inside_private_networks():
    rules = load("aws.yaml")["provider"]["security_group"]["IpPermissions"]
    ray_rules = [r for r in rules if any(p in _ports(r) for p in RAY_PORTS)]
    assert ray_rules  # the VPC-only Jobs API rule is there, so this test looks at something
    for rule in ray_rules:
        cidrs = [r["CidrIp"] for r in rule.get("IpRanges", [])]
        cidrs += [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
        for cidr in cidrs:
            network = ipaddress.ip_network(cidr)
            assert network.is_private and network.prefixlen >= 8, f"{cidr} is not private"


def test_nodes_use_the_clusters_own_security_group():
    """A node type with its own SecurityGroupIds would skip the group checked above."""
    for node_type in load("aws.yaml")["available_node_types"].values():
        assert "SecurityGroupIds" not in node_type["node_config"]


# --- KubeRay manifests --------------------------------------------------------------------


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _check_cluster_spec(spec: dict, annotations: dict) -> None:
    """What a raycv RayCluster needs: this Ray, token auth, autoscaling GPU workers, raycv
    installed before KubeRay's `ray start`, the head reachable from inside only."""
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert annotations["ray.io/overwrite-container-cmd"] == "true"
    groups = [head, *spec["workerGroupSpecs"]]
    for group in groups:
        for container in _containers(group):
            assert ray.__version__ in container["image"]
            command = " ".join(container["args"])
            assert TORCH_PINS in command and '"raycv @ ' in command
            assert command.index("raycv @") < command.index("$KUBERAY_GEN_RAY_START_CMD")
    gpu_groups = [g for g in spec["workerGroupSpecs"] if _gpus(g) >= 1]
    assert gpu_groups
    for group in gpu_groups:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1


def _gpus(group: dict) -> int:
    limits = [c.get("resources", {}).get("limits", {}) for c in _containers(group)]
    return sum(int(limit.get("nvidia.com/gpu", 0)) for limit in limits)


def test_raycluster_manifest_has_what_kuberay_and_raycv_need():
    manifest = load("kuberay/raycluster.yaml")
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayCluster"
    assert manifest["metadata"]["name"]
    _check_cluster_spec(manifest["spec"], manifest["metadata"]["annotations"])


def test_rayjob_manifest_has_what_kuberay_and_raycv_need():
    manifest = load("kuberay/rayjob.yaml")
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    # KubeRay copies the RayJob's annotations onto the RayCluster it creates.
    _check_cluster_spec(spec["rayClusterSpec"], manifest["metadata"]["annotations"])
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip")


def test_rayjob_entrypoint_is_a_raycv_command_that_parses_and_validates():
    manifest = load("kuberay/rayjob.yaml")
    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[0] == "raycv"
    args = parse(argv[1:])  # raycv's own parser: exits on an unknown command or option
    assert args.handler.__name__ == "_pipeline"
    assert (REPO / args.config).is_file()
    cfg = load_config(REPO / args.config, args.overrides)  # every override is a real key
    assert cfg.scaling.use_gpu is True
    # Run folders go to the shared claim every pod mounts.
    cluster = manifest["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        mounts = [m["mountPath"] for c in _containers(group) for m in c["volumeMounts"]]
        assert any(cfg.run.storage.startswith(m + "/") for m in mounts)


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_manifests_mount_the_shared_claim_of_storage_yaml(name):
    claim = load("kuberay/storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim"
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    manifest = load(name)
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in group["template"]["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claims == [claim["metadata"]["name"]]


# --- security over every file -------------------------------------------------------------

CREDENTIAL_KEYS = re.compile(
    r"(password|passwd|secret|secret_access_key|api_key|private_key|auth_token)$", re.I
)
CREDENTIAL_TEXT = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # an AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"^\s*#?\s*[\w.-]*(password|secret)\s*:\s*[^\s{]", re.I | re.M),
    re.compile(r"gh[pousr]_[A-Za-z0-9]{30,}"),  # a GitHub token
]


def credential_findings(text: str) -> list[str]:
    """Lines of a YAML file that look like a credential: known key formats anywhere (also in
    comments), and credential-named keys with a literal value."""
    found = [m.group(0) for pattern in CREDENTIAL_TEXT for m in pattern.finditer(text)]
    found += _credential_values(yaml.safe_load(text))
    return found


def _credential_values(node: Any) -> list[str]:
    found = []
    if isinstance(node, dict):
        # Kubernetes env entries: {name: RAY_AUTH_TOKEN, value: ...} must use valueFrom.
        if CREDENTIAL_KEYS.search(str(node.get("name", ""))) and "value" in node:
            found.append(f"{node['name']}: value")
        for key, value in node.items():
            # A path (~/.ray/auth_token, copied from the user's machine) is not a value.
            literal = isinstance(value, str) and value and not value.startswith("~/")
            if CREDENTIAL_KEYS.search(str(key)) and literal:
                found.append(f"{key}: {value}")
            found += _credential_values(value)
    elif isinstance(node, list):
        for item in node:
            found += _credential_values(item)
    return found


@pytest.mark.parametrize("name", ALL_FILES)
def test_no_credentials_in_cluster_files(name):
    assert credential_findings((CLUSTER / name).read_text()) == []


def test_the_credential_check_finds_planted_credentials(tmp_path):
    """The check above must be able to fail: plant each kind of credential."""
    key_id = "AKIA" + "Q" * 16
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"# {key_id}\n"
        "provider: {password: hunter2}\n"
        "env:\n"
        "  - {name: RAY_AUTH_TOKEN, value: abc}\n"
        "  - {name: AWS_SECRET_ACCESS_KEY, value: abc}\n"
    )
    found = credential_findings(bad.read_text())
    assert key_id in found
    assert "password: hunter2" in found
    assert {"RAY_AUTH_TOKEN: value", "AWS_SECRET_ACCESS_KEY: value"} <= set(found)


@pytest.mark.parametrize("name", ALL_FILES)
def test_nothing_is_opened_to_the_whole_internet(name):
    """No firewall range, source range or command anywhere opens to 0.0.0.0/0 or ::/0."""
    world = [s for s in strings(load(name)) if "0.0.0.0/0" in s or "::/0" in s]
    assert world == []
