"""Offline checks of the cluster deployment configs under cluster/ (no cloud, no Kubernetes).

* cluster/aws.yaml, cluster/gcp.yaml: Ray's own launcher preparation and validation
  (``prepare_config`` + ``validate_config``, i.e. ray/autoscaler/ray-schema.json of the
  installed ray) plus the deployment rules below.
* cluster/kuberay/*.yaml: the KubeRay CRD openAPIV3Schema in tests/schemas/ (converted to a JSON
  Schema, unknown fields rejected as ``kubectl apply`` does); every Pod template in them against
  the upstream Kubernetes core/v1 schema (kubernetes-validate's bundled strict JSON schemas, for
  the oldest and newest Kubernetes minor in KUBERNETES_VERSIONS); Ray's own KubeRay-to-autoscaler
  translation; and the same rules.
* cluster/runtime_env.yaml and the RayJob's runtimeEnvYAML: Ray's ``RuntimeEnv`` validation.

Rules: Ray images match ``ray==`` in constraints.txt; the head advertises 0 CPUs and has no GPU;
GPU worker groups start at 0; token authentication is on; the dashboard is not bound or opened
to the world; no literal secret; the RayJob entrypoint names files that exist. Every checker
returns a list of problems; the ``*_can_fail`` tests break a copy of each config and expect the
matching checker to report it.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
LAUNCHERS = {"aws": CLUSTER / "aws.yaml", "gcp": CLUSTER / "gcp.yaml"}
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
RUNTIME_ENV_PIP = CLUSTER / "runtime_env_pip.yaml"
ALL_CONFIGS = [*LAUNCHERS.values(), RAYCLUSTER, RAYJOB, RUNTIME_ENV]
CRDS = {
    "RayCluster": SCHEMAS / "ray.io_rayclusters.yaml",
    "RayJob": SCHEMAS / "ray.io_rayjobs.yaml",
}
PAPER_CONFIG = ROOT / "gradmm_ray" / "presets" / "paper_sst2.yaml"
# Oldest and newest Kubernetes minor the manifests are checked against (KubeRay 1.6 runs on both).
KUBERNETES_VERSIONS = ("1.30", "1.37")

RAY_PORTS = (6379, 8265, 10001)  # GCS, dashboard + Jobs API, Ray client
WORLD = ("0.0.0.0/0", "::/0")
AWS_GPU_INSTANCE = re.compile(r"^(p\d|g\d|inf\d|trn\d|dl\d)")
GCP_GPU_MACHINE = re.compile(r"^(a2|a3|a4|g2|g4)-")
SECRET_PATTERNS = {
    "Hugging Face token": re.compile(r"hf_[A-Za-z0-9]"),
    "AWS secret key": re.compile(r"AWS_SECRET|aws_secret_access_key", re.IGNORECASE),
    "AWS access key id": re.compile(r"\bA[KS]IA[0-9A-Z]{16}\b"),
    "password": re.compile(r"password", re.IGNORECASE),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"),
    "literal Ray token": re.compile(r"RAY_AUTH_TOKEN\s*[:=]\s*['\"]?[A-Za-z0-9]"),
}
SECRET_ENV_NAME = re.compile(
    r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|API_KEY|ACCESS_KEY)(_|$)"
)

Problems = list[str]


def load(path: Path) -> dict[str, Any]:
    with path.open() as f:
        return yaml.safe_load(f)


def pinned_ray_version() -> str:
    """The X.Y.Z of ``ray==X.Y.Z`` in constraints.txt."""
    text = (ROOT / "constraints.txt").read_text()
    found = re.findall(r"^ray==(\d+\.\d+\.\d+)\s*$", text, flags=re.MULTILINE)
    assert len(found) == 1, f"expected one ray==X.Y.Z pin in constraints.txt, found {found}"
    return found[0]


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher (ray up)


def launcher_schema_problems(cfg: dict[str, Any]) -> Problems:
    """What ``ray up`` itself would reject before touching the cloud: Ray's defaults merged in,
    then ray-schema.json (unknown keys included) and Ray's cross-field checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(cfg)))
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "<top>"
        return [f"ray-schema.json at {where}: {e.message}"]
    except (ValueError, RuntimeError, AssertionError, KeyError, TypeError) as e:
        return [f"{type(e).__name__}: {e}"]
    return []


def _aws_or_gcp_gpu(node_config: dict[str, Any]) -> bool:
    return bool(
        AWS_GPU_INSTANCE.match(str(node_config.get("InstanceType", "")))
        or GCP_GPU_MACHINE.match(str(node_config.get("machineType", "")))
        or node_config.get("guestAccelerators")
    )


def launcher_gpu_types(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Worker node types that have GPUs (declared, or implied by the machine type)."""
    return {
        name: nt
        for name, nt in cfg["available_node_types"].items()
        if name != cfg["head_node_type"]
        and (nt.get("resources", {}).get("GPU", 0) > 0 or _aws_or_gcp_gpu(nt["node_config"]))
    }


def _ip_ranges(rule: dict[str, Any]) -> list[str]:
    v4 = [r.get("CidrIp", "") for r in rule.get("IpRanges", [])]
    return v4 + [r.get("CidrIpv6", "") for r in rule.get("Ipv6Ranges", [])]


def launcher_policy_problems(cfg: dict[str, Any]) -> Problems:
    """Deployment rules for a launcher config: idle head, GPU types from zero, token auth,
    dashboard on loopback only, the project installed with the pinned versions."""
    problems: Problems = []
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    if head.get("resources", {}).get("CPU") != 0:
        problems.append(f"head resources must be {{CPU: 0}}, got {head.get('resources')}")
    if head.get("resources", {}).get("GPU", 0) != 0 or _aws_or_gcp_gpu(head["node_config"]):
        problems.append("the head node type must not have a GPU")
    gpu_types = launcher_gpu_types(cfg)
    if not gpu_types:
        problems.append("no GPU worker node type")
    for name, nt in gpu_types.items():
        if nt.get("min_workers", 0) != 0:
            problems.append(f"GPU node type {name}: min_workers must be 0")
        if nt.get("max_workers", 0) < 1:
            problems.append(f"GPU node type {name}: max_workers must be >= 1")
    if "idle_timeout_minutes" not in cfg:
        problems.append("idle_timeout_minutes is not set")

    start = cfg.get("head_start_ray_commands", []) + cfg.get("worker_start_ray_commands", [])
    for cmd in start:
        if "ray start" in cmd and "RAY_AUTH_MODE=token" not in cmd:
            problems.append(f"start command without RAY_AUTH_MODE=token: {cmd!r}")
    for cmd in cfg.get("head_start_ray_commands", []):
        host = re.search(r"--dashboard-host[= ](\S+)", cmd)
        if "0.0.0.0" in cmd or (host and host.group(1) not in ("127.0.0.1", "localhost")):
            problems.append(f"dashboard must listen on loopback only: {cmd!r}")
    if "RAY_AUTH_MODE=disabled" in yaml.safe_dump(cfg):
        problems.append("RAY_AUTH_MODE=disabled")
    if not any(str(k).endswith(".ray/auth_token") for k in cfg.get("file_mounts", {})):
        problems.append("file_mounts does not copy the token file ~/.ray/auth_token to nodes")

    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        lo, hi = rule.get("FromPort", 0), rule.get("ToPort", 65535)
        if rule.get("IpProtocol") == "-1":
            lo, hi = 0, 65535
        opened = [p for p in RAY_PORTS if lo <= p <= hi]
        if opened and any(r in WORLD for r in _ip_ranges(rule)):
            problems.append(f"security group opens Ray ports {opened} to the internet")

    if "." not in cfg.get("file_mounts", {}).values():
        problems.append("file_mounts does not copy the project ('.') to the nodes")
    setup = " ".join(cfg.get("setup_commands", []))
    if not re.search(r"pip install .*-c \S*constraints\.txt", setup):
        problems.append("setup_commands do not pip install the project with -c constraints.txt")
    return problems


def launcher_images(cfg: dict[str, Any]) -> list[str]:
    docker = cfg.get("docker", {})
    images = [docker[k] for k in ("image", "head_image", "worker_image") if docker.get(k)]
    for nt in cfg["available_node_types"].values():
        if nt.get("docker", {}).get("worker_image"):
            images.append(nt["docker"]["worker_image"])
    return images


# ---------------------------------------------------------------------------------------------
# KubeRay: CRD schema


def crd_to_jsonschema(node: Any, *, root: bool = True) -> Any:
    """A Kubernetes structural schema (a CRD's openAPIV3Schema) as a JSON Schema.

    ``x-kubernetes-int-or-string`` becomes integer-or-string; ``x-kubernetes-preserve-unknown-
    fields`` allows unknown fields, which are otherwise rejected (``kubectl apply`` validates
    strictly); ``nullable`` allows null; int32/int64 become bounds; the other ``x-kubernetes-*``
    keys (list/map types, CEL validations, embedded resources) are dropped. The root
    ``metadata`` (ObjectMeta, validated by the API server itself) accepts any object.
    """
    if isinstance(node, list):
        return [crd_to_jsonschema(n, root=False) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("description", "format"):
            continue
        if key == "properties":
            out[key] = {k: crd_to_jsonschema(v, root=False) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = crd_to_jsonschema(value, root=False) if isinstance(value, dict) else value
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = crd_to_jsonschema(value, root=False)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    bounds = {"int32": 2**31, "int64": 2**63}.get(node.get("format", ""))
    if bounds and node.get("type") == "integer":
        out.setdefault("minimum", -bounds)
        out.setdefault("maximum", bounds - 1)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
        out.pop("nullable")
    is_object = node.get("type") == "object" or "properties" in node
    if (
        is_object
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if root and "metadata" in out.get("properties", {}):
        out["properties"]["metadata"] = {"type": "object"}
    return out


@functools.cache
def load_crd(kind: str) -> tuple[jsonschema.Draft7Validator, str]:
    """(validator for the served v1 version's schema, "group/version") of a vendored CRD."""
    docs = [d for d in yaml.safe_load_all(CRDS[kind].read_text()) if d]
    crd = next(d for d in docs if d.get("kind") == "CustomResourceDefinition")
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"])
    schema = crd_to_jsonschema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema), f"{crd['spec']['group']}/v1"


def crd_schema_problems(manifest: dict[str, Any]) -> Problems:
    """Every violation of the manifest's CRD schema, with its path."""
    kind = manifest.get("kind")
    if kind not in CRDS:
        return [f"kind {kind!r} is not one of {sorted(CRDS)}"]
    validator, api_version = load_crd(kind)
    problems = []
    if manifest.get("apiVersion") != api_version:
        problems.append(f"apiVersion must be {api_version}, got {manifest.get('apiVersion')!r}")
    name = manifest.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        problems.append(f"metadata.name {name!r} is not a DNS-1123 label")
    for e in sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in e.absolute_path) or "<top>"
        problems.append(f"{where}: {e.message}")
    return problems


def pod_templates(manifest: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, template) of every Pod template in a RayCluster or RayJob."""
    spec = manifest["spec"]
    prefix = "spec/rayClusterSpec" if "rayClusterSpec" in spec else "spec"
    cluster = spec.get("rayClusterSpec", spec)
    yield f"{prefix}/headGroupSpec/template", cluster["headGroupSpec"]["template"]
    for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
        yield f"{prefix}/workerGroupSpecs/{i}/template", group["template"]
    if "submitterPodTemplate" in spec:
        yield "spec/submitterPodTemplate", spec["submitterPodTemplate"]


def pod_template_problems(manifest: dict[str, Any]) -> Problems:
    """Each Pod template against Kubernetes' own core/v1 PodTemplateSpec schema (strict: unknown
    fields rejected), for every version in KUBERNETES_VERSIONS; the first violation per template
    and version, with its path."""
    problems = []
    for where, template in pod_templates(manifest):
        # A core/v1 PodTemplate object carries exactly one PodTemplateSpec under `template`.
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate({**doc, "template": template}, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                inner = "/".join(str(p) for p in list(e.absolute_path)[1:])
                problems.append(f"{where}/{inner} (Kubernetes {version}): {e.message}")
    return problems


# ---------------------------------------------------------------------------------------------
# KubeRay: deployment rules


def _containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield from (("head", c) for c in spec["headGroupSpec"]["template"]["spec"]["containers"])
    for group in spec.get("workerGroupSpecs", []):
        yield from ((group["groupName"], c) for c in group["template"]["spec"]["containers"])


def _gpus(container: dict[str, Any]) -> float:
    res = container.get("resources", {})
    return max(
        float(res.get("limits", {}).get("nvidia.com/gpu", 0)),
        float(res.get("requests", {}).get("nvidia.com/gpu", 0)),
    )


def kuberay_gpu_groups(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        g
        for g in spec.get("workerGroupSpecs", [])
        if any(_gpus(c) > 0 for c in g["template"]["spec"]["containers"])
        or float(g.get("rayStartParams", {}).get("num-gpus", 0)) > 0
    ]


def env_secret_problems(where: str, env: list[dict[str, Any]]) -> Problems:
    """Secret-looking variables must come from a Secret (valueFrom), never a literal value."""
    return [
        f"{where}: env {e['name']} has a literal value; use valueFrom.secretKeyRef"
        for e in env
        if SECRET_ENV_NAME.search(e["name"]) and "value" in e
    ]


def kuberay_policy_problems(spec: dict[str, Any], name: str = "gradmm-ray") -> Problems:
    """Deployment rules for a RayClusterSpec: autoscaler v2, token auth, idle head, private
    head Service, GPU groups from zero, HF token from a Secret, and what Ray's autoscaler
    derives from it (Ray's own KubeRay translation and validation)."""
    problems: Problems = []
    if spec.get("rayVersion") != pinned_ray_version():
        problems.append(f"rayVersion {spec.get('rayVersion')!r} != ray=={pinned_ray_version()}")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true")
    if spec.get("autoscalerOptions", {}).get("version") != "v2":
        problems.append("autoscalerOptions.version must be v2")
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append("authOptions.mode must be token")

    head = spec["headGroupSpec"]
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append("head rayStartParams must set num-cpus: '0'")
    if float(head.get("rayStartParams", {}).get("num-gpus", 0)) > 0:
        problems.append("head rayStartParams must not advertise GPUs")
    if any(_gpus(c) > 0 for c in head["template"]["spec"]["containers"]):
        problems.append("head containers must not request nvidia.com/gpu")
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        problems.append("head Service must stay ClusterIP without ingress")
    if head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
        problems.append("headService type must stay ClusterIP")

    gpu_groups = kuberay_gpu_groups(spec)
    if not gpu_groups:
        problems.append("no GPU worker group")
    for g in gpu_groups:
        if g.get("minReplicas", 0) != 0 or g.get("replicas", 0) != 0:
            problems.append(f"GPU group {g['groupName']}: replicas and minReplicas must be 0")
        if not isinstance(g.get("maxReplicas"), int) or g["maxReplicas"] < 1:
            problems.append(f"GPU group {g['groupName']}: maxReplicas must be >= 1")

    for where, c in _containers(spec):
        env = c.get("env", [])
        problems += env_secret_problems(f"{where}/{c['name']}", env)
        if any(e["name"] == "RAY_AUTH_MODE" and e.get("value") != "token" for e in env):
            problems.append(f"{where}/{c['name']}: RAY_AUTH_MODE must not be disabled")
        hf = [e for e in env if e["name"] == "HF_TOKEN"]
        if not hf or "secretKeyRef" not in hf[0].get("valueFrom", {}):
            problems.append(f"{where}/{c['name']}: HF_TOKEN must come from a secretKeyRef")

    # What the KubeRay autoscaler sidecar computes from this spec (it also validates it).
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    try:
        derived = _derive_autoscaling_config_from_ray_cr(
            {"metadata": {"name": name, "namespace": "default"}, "spec": copy.deepcopy(spec)}
        )
    except Exception as e:  # any failure here is a finding
        return problems + [f"Ray's KubeRay translation failed: {type(e).__name__}: {e}"]
    head_res = derived["available_node_types"]["headgroup"]["resources"]
    if head_res.get("CPU", 0) != 0 or head_res.get("GPU", 0) != 0:
        problems.append(f"Ray sees the head with {head_res}; expected CPU 0 and no GPU")
    for g in gpu_groups:
        nt = derived["available_node_types"][g["groupName"]]
        if nt["resources"].get("GPU", 0) < 1 or nt["min_workers"] != 0:
            problems.append(f"Ray sees GPU group {g['groupName']} as {nt}")
    return problems


# ---------------------------------------------------------------------------------------------
# Runtime environments, entrypoint, images, secrets


def runtime_env_problems(env: dict[str, Any], *, remote_working_dir: bool = False) -> Problems:
    """Ray's own RuntimeEnv validation plus: only known fields, HF transfer off, tokenizers
    parallelism off, a stop grace of >= 30 s, anything installed with the constraints, no secret
    env var."""
    from ray.runtime_env import RuntimeEnv

    problems: Problems = []
    unknown = set(env) - set(RuntimeEnv.known_fields)
    if unknown:
        problems.append(f"unknown runtime_env fields {sorted(unknown)}")
    try:
        RuntimeEnv(**copy.deepcopy(env))
    except (ValueError, TypeError) as e:
        problems.append(f"RuntimeEnv rejects it: {e}")
    env_vars = env.get("env_vars") or {}
    if env_vars.get("HF_HUB_ENABLE_HF_TRANSFER") != "0":
        problems.append("env_vars.HF_HUB_ENABLE_HF_TRANSFER must be '0'")
    if env_vars.get("TOKENIZERS_PARALLELISM") != "false":
        problems.append("env_vars.TOKENIZERS_PARALLELISM must be 'false'")
    stop_wait = str(env_vars.get("RAY_JOB_STOP_WAIT_TIME_S", "3"))
    if not stop_wait.isdigit() or int(stop_wait) < 30:
        # Ray's default 3 s between `ray job stop`'s SIGTERM and SIGKILL is too short on a busy
        # head for the job to release its lock and say what it kept (CI saw it).
        problems.append(f"env_vars.RAY_JOB_STOP_WAIT_TIME_S is {stop_wait}; give the job >= 30 s")
    problems += [f"env_vars.{k} looks like a secret" for k in env_vars if SECRET_ENV_NAME.search(k)]
    if "pip" in env:  # installing is optional; when it installs, the tested versions
        pip = env["pip"]
        packages = pip.get("packages", []) if isinstance(pip, dict) else pip
        if not isinstance(packages, list) or not any(
            re.match(r"-c \S*constraints\.txt$", p) for p in packages
        ):
            problems.append("pip.packages must constrain with -c .../constraints.txt")
    if remote_working_dir and "://" not in str(env.get("working_dir", "")):
        problems.append("working_dir must be a remote URI (the submitter Pod has no local copy)")
    return problems


def entrypoint_problems(entrypoint: str) -> Problems:
    """``python jobs/<script>.py --config <preset> --output <s3|gs URI>``, with the script and the
    preset (package data) present, the config valid for this project, and GPUs asked for
    explicitly."""
    from gradmm_ray.config import build_config, load_yaml
    from gradmm_ray.errors import ConfigError
    from gradmm_ray.presets import preset_names, resolve_config_path

    argv = shlex.split(entrypoint)
    if len(argv) < 2 or argv[0] != "python":
        return [f"entrypoint must start with 'python <script>': {entrypoint!r}"]
    problems: Problems = []
    script = ROOT / argv[1]
    if not (argv[1].startswith("jobs/") and script.is_file()):
        problems.append(f"entrypoint script {argv[1]!r} is not a file under jobs/")
    opts = dict(zip(argv[2::2], argv[3::2], strict=False))
    config = opts.get("--config", "")
    if config not in preset_names():
        return problems + [f"--config {config!r} is not a preset ({', '.join(preset_names())})"]
    if not re.match(r"^(s3|gs)://[^/]+/.+", opts.get("--output", "")):
        problems.append(f"--output {opts.get('--output')!r} is not an s3:// or gs:// URI")
    try:
        cfg = build_config(load_yaml(resolve_config_path(config)))
    except ConfigError as e:
        return problems + [f"{config}: {e}"]
    for stage in ("targets", "solve", "select"):
        if getattr(cfg, stage).num_gpus != 1:
            problems.append(f"{config}: {stage}.num_gpus must be 1 (GPU nodes start at zero)")
    return problems


def image_problems(images: list[str]) -> Problems:
    """Every image is rayproject/ray at the pinned Ray version."""
    version = pinned_ray_version()
    if not images:
        return ["no image found"]
    return [
        f"image {img!r} is not rayproject/ray:{version}[-...]"
        for img in images
        if not re.fullmatch(rf"rayproject/ray:{re.escape(version)}(-[\w.-]+)?", img)
    ]


def secret_problems(text: str) -> Problems:
    """Literal secrets anywhere in a file, comments included."""
    return [
        f"line {n}: {label}"
        for n, line in enumerate(text.splitlines(), 1)
        for label, pattern in SECRET_PATTERNS.items()
        if pattern.search(line)
    ]


def kuberay_images(manifest: dict[str, Any]) -> list[str]:
    spec = manifest["spec"]
    cluster = spec.get("rayClusterSpec", spec)
    images = [c["image"] for _, c in _containers(cluster)]
    if cluster.get("autoscalerOptions", {}).get("image"):
        images.append(cluster["autoscalerOptions"]["image"])
    submitter = spec.get("submitterPodTemplate", {}).get("spec", {}).get("containers", [])
    return images + [c["image"] for c in submitter]


# ---------------------------------------------------------------------------------------------
# Tests on the real files


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_passes_ray_schema(name: str) -> None:
    """Ray's launcher (prepare_config + validate_config on ray-schema.json) accepts it."""
    assert launcher_schema_problems(load(LAUNCHERS[name])) == []


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_policy(name: str) -> None:
    """Idle CPU head, GPU types from zero, token auth, loopback dashboard, project installed."""
    assert launcher_policy_problems(load(LAUNCHERS[name])) == []


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_fits_paper_config(name: str) -> None:
    """paper_sst2.yaml's actor pools fit: GPU nodes allowed >= max_actors, each node holds an
    actor (its num_gpus and num_cpus)."""
    from gradmm_ray.config import build_config, load_yaml

    cfg, job = load(LAUNCHERS[name]), build_config(load_yaml(PAPER_CONFIG))
    gpu_types = launcher_gpu_types(cfg)
    capacity = min(cfg["max_workers"], sum(nt["max_workers"] for nt in gpu_types.values()))
    for stage in (job.targets, job.solve, job.select):
        assert stage.max_actors <= capacity
        assert any(
            nt["resources"].get("GPU", 0) >= stage.num_gpus
            and nt["resources"].get("CPU", 0) >= stage.num_cpus
            for nt in gpu_types.values()
        )


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_manifest_matches_crd(path: Path) -> None:
    """The manifest validates against its CRD's openAPIV3Schema (RayJob: with rayClusterSpec)."""
    assert crd_schema_problems(load(path)) == []


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_vendored_crd_is_a_valid_crd(kind: str) -> None:
    """The vendored CRD file is itself a valid apiextensions.k8s.io/v1 CustomResourceDefinition
    (Kubernetes' own schema, strict)."""
    docs = [d for d in yaml.safe_load_all(CRDS[kind].read_text()) if d]
    assert [d["kind"] for d in docs] == ["CustomResourceDefinition"]
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(docs[0], version, strict=True)


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_pod_templates_match_kubernetes_schema(path: Path) -> None:
    """Every Pod template validates against the upstream core/v1 schema (oldest and newest)."""
    manifest = load(path)
    assert len(list(pod_templates(manifest))) >= 2  # a head and at least one worker group
    assert pod_template_problems(manifest) == []


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_cluster_policy(path: Path) -> None:
    """The RayClusterSpec (RayJob: its rayClusterSpec) follows the deployment rules."""
    manifest = load(path)
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    assert kuberay_policy_problems(spec, manifest["metadata"]["name"]) == []


def test_rayjob_lifecycle_and_entrypoint() -> None:
    """The RayJob deletes its cluster after a TTL, runs an existing script and config, and its
    runtimeEnvYAML passes Ray's validation with a remote working_dir."""
    spec = load(RAYJOB)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec.get("ttlSecondsAfterFinished"), int)
    assert entrypoint_problems(spec["entrypoint"]) == []
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env_problems(runtime_env, remote_working_dir=True) == []


def _declared_dependencies() -> list[str]:
    import tomllib

    project = tomllib.loads((CLUSTER.parent / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + project["optional-dependencies"]["cloud"]


@pytest.mark.parametrize("path", [RUNTIME_ENV, RUNTIME_ENV_PIP], ids=lambda p: p.name)
def test_runtime_env_files(path: Path) -> None:
    """Both runtime environments pass Ray's RuntimeEnv validation and exclude local junk. The
    default installs nothing (no pip, uv or conda: the nodes have the dependencies, the code runs
    from the working dir); the pip one installs exactly pyproject's dependencies and `cloud`
    extra under the constraints, never the project itself (no wheel build)."""
    env = load(path)
    assert runtime_env_problems(env) == []
    assert {".venv", "outputs", ".git"} <= set(env["excludes"])
    assert "working_dir" not in env  # `--working-dir .` at submit time says which folder
    installers = {"pip", "uv", "conda", "py_modules"} & set(env)
    if path == RUNTIME_ENV:
        assert installers == set()
    else:
        assert installers == {"pip"}
        constraint, *packages = env["pip"]["packages"]
        assert constraint == "-c ${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/constraints.txt"
        assert packages == _declared_dependencies()


def test_rayjob_installs_what_the_pip_runtime_env_does() -> None:
    """The RayJob (bare rayproject/ray images) carries runtime_env_pip.yaml's pip section."""
    runtime_env = yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])
    assert runtime_env["pip"] == load(RUNTIME_ENV_PIP)["pip"]


def test_images_match_pinned_ray() -> None:
    """Every Ray image (and the RayCluster rayVersion) is the ray== version of constraints.txt."""
    images = {p.name: launcher_images(load(p)) for p in LAUNCHERS.values()}
    images |= {p.name: kuberay_images(load(p)) for p in (RAYCLUSTER, RAYJOB)}
    assert {name: image_problems(imgs) for name, imgs in images.items()} == {
        name: [] for name in images
    }
    cluster_specs = [load(RAYCLUSTER)["spec"], load(RAYJOB)["spec"]["rayClusterSpec"]]
    assert [s["rayVersion"] for s in cluster_specs] == [pinned_ray_version()] * 2


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.name)
def test_no_literal_secrets(path: Path) -> None:
    """No token, key or password text in any config (HF_TOKEN etc. only by reference)."""
    assert secret_problems(path.read_text()) == []


# ---------------------------------------------------------------------------------------------
# The checks can fail: each breaks a copy of one config and expects the checker to say so.


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting a '/'-separated path to value (list indices as integers, '~1' for a
    '/' inside a key, as in JSON Pointer)."""

    def mutate(doc: dict[str, Any]) -> None:
        keys = [k.replace("~1", "/") for k in path.split("/")]
        *parents, last = [int(k) if k.isdigit() else k for k in keys]
        node: Any = doc
        for key in parents:
            node = node[key]
        node[last] = value

    return mutate


def _edit_cmd(key: str, old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        doc[key] = [c.replace(old, new) for c in doc[key]]

    return mutate


def _rayjob_entrypoint(doc: dict[str, Any]) -> Problems:
    return entrypoint_problems(doc["spec"]["entrypoint"])


def _rayjob_cluster_policy(doc: dict[str, Any]) -> Problems:
    return kuberay_policy_problems(doc["spec"]["rayClusterSpec"])


def _rayjob_runtime_env(doc: dict[str, Any]) -> Problems:
    return runtime_env_problems(
        yaml.safe_load(doc["spec"]["runtimeEnvYAML"]), remote_working_dir=True
    )


HEAD_C = "spec/headGroupSpec/template/spec/containers/0"
GPU_G = "spec/workerGroupSpecs/0"
BREAKAGES = {
    "aws: unknown top-level key": (
        LAUNCHERS["aws"],
        _set("max_worker", 3),
        launcher_schema_problems,
    ),
    "gcp: min_workers as text": (
        LAUNCHERS["gcp"],
        _set("available_node_types/gpu_1x_l4/min_workers", "0"),
        launcher_schema_problems,
    ),
    "aws: head advertises CPUs": (
        LAUNCHERS["aws"],
        _set("available_node_types/head/resources", {"CPU": 8}),
        launcher_policy_problems,
    ),
    "aws: head on a GPU instance": (
        LAUNCHERS["aws"],
        _set("available_node_types/head/node_config/InstanceType", "g5.xlarge"),
        launcher_policy_problems,
    ),
    "aws: GPU workers start at one": (
        LAUNCHERS["aws"],
        _set("available_node_types/gpu_1x_a10g/min_workers", 1),
        launcher_policy_problems,
    ),
    "gcp: dashboard on 0.0.0.0": (
        LAUNCHERS["gcp"],
        _edit_cmd(
            "head_start_ray_commands", "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"
        ),
        launcher_policy_problems,
    ),
    "aws: worker without token auth": (
        LAUNCHERS["aws"],
        _edit_cmd("worker_start_ray_commands", "export RAY_AUTH_MODE=token;", ""),
        launcher_policy_problems,
    ),
    "aws: dashboard port open to the world": (
        LAUNCHERS["aws"],
        _set(
            "provider/security_group/IpPermissions",
            [
                {
                    "IpProtocol": "tcp",
                    "FromPort": 8265,
                    "ToPort": 8265,
                    "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
                }
            ],
        ),
        launcher_policy_problems,
    ),
    "aws: image of another Ray": (
        LAUNCHERS["aws"],
        _set("docker/image", "rayproject/ray:2.59.0-py311-gpu"),
        lambda d: image_problems(launcher_images(d)),
    ),
    "raycluster: misspelled field": (
        RAYCLUSTER,
        _set("spec/workerGroupSpec", []),
        crd_schema_problems,
    ),
    "raycluster: minReplicas as text": (
        RAYCLUSTER,
        _set(f"{GPU_G}/minReplicas", "0"),
        crd_schema_problems,
    ),
    "raycluster: bad GPU quantity": (
        RAYCLUSTER,
        _set(f"{GPU_G}/template/spec/containers/0/resources/limits/nvidia.com~1gpu", "one GPU"),
        crd_schema_problems,
    ),
    "raycluster: worker group without maxReplicas": (
        RAYCLUSTER,
        lambda d: d["spec"]["workerGroupSpecs"][0].pop("maxReplicas"),
        crd_schema_problems,
    ),
    "raycluster: misspelled affinity field": (
        RAYCLUSTER,
        _set(f"{GPU_G}/template/spec/affinity", {"nodeAfinity": {}}),
        pod_template_problems,
    ),
    "raycluster: probe port as a list": (
        RAYCLUSTER,
        _set(f"{HEAD_C}/readinessProbe", {"tcpSocket": {"port": [6379]}}),
        pod_template_problems,
    ),
    "raycluster: securityContext user as text": (
        RAYCLUSTER,
        _set(f"{GPU_G}/template/spec/securityContext", {"runAsUser": "ray"}),
        pod_template_problems,
    ),
    "raycluster: unknown auth mode": (
        RAYCLUSTER,
        _set("spec/authOptions/mode", "none"),
        crd_schema_problems,
    ),
    "raycluster: auth disabled": (
        RAYCLUSTER,
        _set("spec/authOptions/mode", "disabled"),
        lambda d: kuberay_policy_problems(d["spec"]),
    ),
    "raycluster: head takes CPUs": (
        RAYCLUSTER,
        _set("spec/headGroupSpec/rayStartParams/num-cpus", "4"),
        lambda d: kuberay_policy_problems(d["spec"]),
    ),
    "raycluster: head gets a GPU": (
        RAYCLUSTER,
        _set(f"{HEAD_C}/resources/limits/nvidia.com~1gpu", 1),
        lambda d: kuberay_policy_problems(d["spec"]),
    ),
    "raycluster: GPU group starts at two": (
        RAYCLUSTER,
        _set(f"{GPU_G}/minReplicas", 2),
        lambda d: kuberay_policy_problems(d["spec"]),
    ),
    "raycluster: public head Service": (
        RAYCLUSTER,
        _set("spec/headGroupSpec/serviceType", "LoadBalancer"),
        lambda d: kuberay_policy_problems(d["spec"]),
    ),
    "raycluster: HF token inline": (
        RAYCLUSTER,
        _set(f"{HEAD_C}/env/1", {"name": "HF_TOKEN", "value": "x"}),
        lambda d: kuberay_policy_problems(d["spec"]),
    ),
    "raycluster: old rayVersion": (
        RAYCLUSTER,
        _set("spec/rayVersion", "2.59.0"),
        lambda d: kuberay_policy_problems(d["spec"]),
    ),
    "rayjob: bad type inside rayClusterSpec": (
        RAYJOB,
        _set("spec/rayClusterSpec/workerGroupSpecs/0/maxReplicas", "eight"),
        crd_schema_problems,
    ),
    "rayjob: misspelled container field": (
        RAYJOB,
        _set(
            "spec/rayClusterSpec/workerGroupSpecs/0/template/spec/containers/0/imagePulPolicy",
            "Always",
        ),
        pod_template_problems,
    ),
    "rayjob: unknown spec field": (
        RAYJOB,
        _set("spec/shutdownAfterJobFinished", True),
        crd_schema_problems,
    ),
    "rayjob: GPU group from one": (
        RAYJOB,
        _set("spec/rayClusterSpec/workerGroupSpecs/0/replicas", 1),
        _rayjob_cluster_policy,
    ),
    "rayjob: missing config file": (
        RAYJOB,
        _set(
            "spec/entrypoint",
            "python jobs/distill.py --config nope --output s3://b/r",
        ),
        _rayjob_entrypoint,
    ),
    "rayjob: missing script": (
        RAYJOB,
        _set(
            "spec/entrypoint",
            "python jobs/nope.py --config paper_sst2 --output s3://b/r",
        ),
        _rayjob_entrypoint,
    ),
    "rayjob: local output": (
        RAYJOB,
        _set(
            "spec/entrypoint",
            "python jobs/distill.py --config paper_sst2 --output outputs/run",
        ),
        _rayjob_entrypoint,
    ),
    "rayjob: config with GPUs on auto": (
        RAYJOB,
        _set(
            "spec/entrypoint",
            "python jobs/distill.py --config demo --output s3://b/r",
        ),
        _rayjob_entrypoint,
    ),
    "rayjob: local working_dir": (
        RAYJOB,
        _set("spec/runtimeEnvYAML", "working_dir: .\nenv_vars: {}\n"),
        _rayjob_runtime_env,
    ),
    "runtime_env: pip of the wrong type": (RUNTIME_ENV_PIP, _set("pip", 3), runtime_env_problems),
    "runtime_env: pip without the constraints": (
        RUNTIME_ENV_PIP,
        _set("pip/packages", ["torch>=2.3"]),
        runtime_env_problems,
    ),
    "runtime_env: unknown field": (RUNTIME_ENV, _set("env_var", {}), runtime_env_problems),
    "runtime_env: tokenizers parallel": (
        RUNTIME_ENV,
        _set("env_vars/TOKENIZERS_PARALLELISM", "true"),
        runtime_env_problems,
    ),
    "runtime_env: Ray's default stop grace": (
        RUNTIME_ENV_PIP,
        lambda env: env["env_vars"].pop("RAY_JOB_STOP_WAIT_TIME_S"),
        runtime_env_problems,
    ),
    "runtime_env: a secret env var": (
        RUNTIME_ENV,
        _set("env_vars/HF_TOKEN", "x"),
        runtime_env_problems,
    ),
}


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_checks_can_fail(case: str) -> None:
    """A broken copy of a config is reported by the checker that guards it."""
    path, mutate, checker = BREAKAGES[case]
    original = load(path)
    assert checker(copy.deepcopy(original)) == [], "the unbroken config must pass first"
    broken = copy.deepcopy(original)
    mutate(broken)
    assert checker(broken) != []


@pytest.mark.parametrize(
    "line",
    [
        # Assembled at run time so that no secret scanner mistakes this file for a leak.
        "  HF_TOKEN: " + "hf" + "_" + "Ab12" * 9,
        "aws_secret_access_key = abc",
        "pass" + "word: hunter2",
        "  RAY_AUTH_TOKEN: 0123456789abcdef",
        "-----BEGIN " + "OPENSSH PRIVATE" + " KEY-----",
    ],
)
def test_secret_scan_can_fail(line: str) -> None:
    """The secret scan flags each kind of literal secret."""
    assert secret_problems(RAYCLUSTER.read_text() + "\n" + line) != []
