"""Deployment checks without a cluster: the Dockerfile, the kustomize overlays, the alerts and
the dashboard under deploy/.

The tools come from the dev extra (kubectl with kustomize, kubernetes-validate, yamllint,
hadolint); a missing one fails the test. promtool is not on PyPI: `make deploy-check` fetches
it from Debian's prometheus package, and its tests skip, saying so, where it is absent.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

import plaudit.v1
from plaudit import cli
from plaudit.cli import TrainPolicySettings, TrainRewardSettings, build_parser
from plaudit.services.common.hotswap import SwapMetrics
from plaudit.services.common.metrics import GrpcMetrics
from plaudit.services.common.settings import PlauditSettings, settings_from_args
from plaudit.services.feedback.metrics import FeedbackMetrics
from plaudit.services.feedback.settings import FeedbackSettings
from plaudit.services.generation.metrics import GenerationMetrics
from plaudit.services.generation.settings import GenerationSettings
from plaudit.services.reward.metrics import RewardMetrics
from plaudit.services.reward.settings import RewardSettings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
MONITORING = K8S / "components" / "monitoring"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(DEPLOY))

import healthcheck  # noqa: E402
import requirements  # noqa: E402

OVERLAYS = ["dev", "prod", "prod-s3"]
K8S_VERSIONS = ["1.30.0", "1.37.0"]  # the oldest cluster we support and the newest schemas
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # no schemas in kubernetes-validate
WORKLOADS = {"Deployment", "Job", "CronJob"}
# The prod overlay expects the database Secret to exist (docs/operations.md).
EXTERNAL_SECRETS = {"prod": {"plaudit-database"}, "prod-s3": {"plaudit-database"}, "dev": set()}
UID = 10001
SERVER_ERROR_CODES = {"UNKNOWN", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED"}
HEALTH_SERVICES = {
    "",  # the whole server
    *(
        service.full_name
        for info in pkgutil.iter_modules(plaudit.v1.__path__)
        if info.name.endswith("_pb2")
        for service in importlib.import_module(
            f"plaudit.v1.{info.name}"
        ).DESCRIPTOR.services_by_name.values()
    ),
}


# -- helpers --------------------------------------------------------------------------------
def tool(name: str) -> str:
    """A dev-extra tool from the venv or PATH; fails (not skips) when it is missing."""
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed; run make setup (pip install -e '.[dev]')")
    return str(found)


def promtool() -> str:
    local = BIN / "promtool"
    found = str(local) if os.access(local, os.X_OK) else shutil.which("promtool")
    if not found:
        pytest.skip("promtool not found (Debian package prometheus); run make deploy-check")
    return str(found)


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


Doc = dict[str, Any]


def of_kind(docs: list[Doc], *kinds: str) -> list[Doc]:
    return [d for d in docs if d["kind"] in kinds]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pod_spec(doc: Doc) -> Doc:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"]["spec"])


def pod_labels(doc: Doc) -> dict[str, str]:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"]["metadata"]["labels"])


def containers(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    for doc in of_kind(docs, *WORKLOADS):
        for c in pod_spec(doc)["containers"]:
            yield doc, c


def cpus(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def container_env(docs: list[Doc], doc: Doc, container: Doc) -> dict[str, str]:
    """The container's environment as Kubernetes would build it (envFrom, then env)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "secretRef" in source:  # the API keys: created by the operator, not rendered
            assert source["secretRef"].get("optional") is True, source
            continue
        env.update(named(docs, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]
        if ref.get("secretKeyRef", {}).get("optional"):
            continue  # e.g. object-store credentials, when workload identity does not give them
        if "secretKeyRef" in ref:
            secrets = [
                d
                for d in of_kind(docs, "Secret")
                if d["metadata"]["name"] == ref["secretKeyRef"]["name"]
            ]
            key = ref["secretKeyRef"]["key"]
            env[var["name"]] = (
                base64.b64decode(secrets[0]["data"][key]).decode()
                if secrets
                else "postgresql://plaudit@db.internal/plaudit"  # an external Secret
            )
        else:
            env[var["name"]] = "0"  # fieldRef: the completion index of pod 0
    return env


def mounts(container: Doc) -> dict[str, bool]:
    """mountPath -> writable."""
    return {m["mountPath"]: not m.get("readOnly", False) for m in container["volumeMounts"]}


@pytest.fixture(scope="session", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


_RENDERED: dict[str, list[Doc]] = {}


def render(overlay: str) -> list[Doc]:
    if overlay not in _RENDERED:
        result = run(tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay))
        assert result.returncode == 0, result.stderr
        _RENDERED[overlay] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return _RENDERED[overlay]


@pytest.fixture(scope="session")
def docs(overlay: str) -> list[Doc]:
    return render(overlay)


# -- kustomize and the Kubernetes schemas ---------------------------------------------------
def test_overlay_builds_every_component(docs: list[Doc], overlay: str) -> None:
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    assert {"CronJob", "Job", "ConfigMap", "Namespace"} <= kinds
    # the registry lives on a shared volume, or in object storage with no volume at all
    assert ("PersistentVolumeClaim" in kinds) == (overlay != "prod-s3")
    deployments = {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}
    assert deployments == {"plaudit-reward", "plaudit-feedback", "plaudit-generation"}
    (namespace,) = of_kind(docs, "Namespace")
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert namespaces == {namespace["metadata"]["name"]}, "all in the overlay's namespace"
    if overlay == "prod":
        assert kinds >= CRD_KINDS


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(docs: list[Doc], version: str) -> None:
    import kubernetes_validate

    errors = []
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue  # checked structurally and by promtool below
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_yamllint() -> None:
    result = run(tool("yamllint"), "--strict", "-c", str(DEPLOY / ".yamllint"), str(DEPLOY))
    assert result.returncode == 0, result.stdout + result.stderr


# -- consistency of the rendered objects -----------------------------------------------------
def test_references_resolve(docs: list[Doc], overlay: str) -> None:
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    missing = []
    for doc, c in containers(docs):
        spec = pod_spec(doc)
        wanted = [("ServiceAccount", spec["serviceAccountName"])]
        wanted += [
            ("ConfigMap", s["configMapRef"]["name"])
            for s in c.get("envFrom", [])
            if "configMapRef" in s  # secretRefs are optional (the API keys)
        ]
        for var in c.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref and not ref.get("optional") and ref["name"] not in EXTERNAL_SECRETS[overlay]:
                wanted.append(("Secret", ref["name"]))
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                wanted.append(
                    ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
                )
        missing += [f"{doc['metadata']['name']}: {k}/{n}" for k, n in wanted if (k, n) not in names]
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        if (target["kind"], target["name"]) not in names:
            missing.append(f"HPA {hpa['metadata']['name']}: {target['kind']}/{target['name']}")
    assert not missing, missing


def test_selectors_match_pods(docs: list[Doc]) -> None:
    pods = [pod_labels(d) for d in of_kind(docs, *WORKLOADS)]
    for d in of_kind(docs, "Deployment"):
        assert d["spec"]["selector"]["matchLabels"].items() <= pod_labels(d).items()
    for svc in of_kind(docs, "Service"):
        selector = svc["spec"]["selector"].items()
        assert any(selector <= p.items() for p in pods), f"Service {svc['metadata']['name']}"
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"].items()
        assert any(selector <= p.items() for p in pods), f"PDB {pdb['metadata']['name']}"


def test_reward_is_autoscaled_and_guarded(docs: list[Doc]) -> None:
    hpa = named(docs, "HorizontalPodAutoscaler", "plaudit-reward")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "plaudit-reward"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in named(docs, "Deployment", "plaudit-reward")["spec"], (
        "the HPA owns the reward replicas; a replicas field would fight it on every apply"
    )
    named(docs, "PodDisruptionBudget", "plaudit-reward")


def test_images_are_named_and_tagged(docs: list[Doc]) -> None:
    for doc, c in containers(docs):
        image = c["image"]
        assert "/" in image and re.search(r":[\w.-]+$|@sha256:", image), (
            f"{doc['metadata']['name']}: {image} is a placeholder the overlay did not map"
        )
        assert not image.endswith(":latest")


def test_pods_run_unprivileged(docs: list[Doc]) -> None:
    for doc, c in containers(docs):
        name = f"{doc['metadata']['name']}/{c['name']}"
        pod = pod_spec(doc)
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == UID, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        assert mounts(c).get("/tmp") is True, f"{name}: HOME=/tmp must be a writable volume"
        for key in ("requests", "limits"):
            assert {"cpu", "memory"} <= c["resources"][key].keys(), f"{name}: {key}"


SERVICE_SETTINGS: dict[str, type[PlauditSettings]] = {
    "reward": RewardSettings,
    "feedback": FeedbackSettings,
    "generation": GenerationSettings,
}


def test_services_expose_and_probe_the_ports_they_bind(
    docs: list[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    for doc, c in containers(of_kind(docs, "Deployment")):
        name = doc["metadata"]["name"]
        env = container_env(docs, doc, c)
        for key in [k for k in os.environ if k.startswith("PLAUDIT_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = SERVICE_SETTINGS[c["name"]]()
        bound = {"grpc": settings.port, "metrics": settings.metrics_port}  # type: ignore[attr-defined]
        if hasattr(settings, "http_port"):
            bound["http"] = settings.http_port
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == bound, f"{name}: container ports vs the ports the service binds"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in c, f"{name}: {probe}"
        tls = settings.tls_cert_file is not None  # type: ignore[attr-defined]
        for probe in ("startupProbe", "readinessProbe"):
            if tls:  # the kubelet's gRPC probe cannot speak TLS: HTTPS /healthz instead
                http_probe = c[probe]["httpGet"]
                assert "grpc" not in c[probe], f"{name}: {probe}"
                assert http_probe == {"path": "/healthz", "port": ports["http"], "scheme": "HTTPS"}
                continue
            if probe == "startupProbe" and "httpGet" in c[probe]:  # the HTTP front end's
                assert c[probe]["httpGet"] == {"path": "/healthz", "port": ports["http"]}, name
                continue
            grpc_probe = c[probe]["grpc"]  # Kubernetes' native gRPC probe
            assert grpc_probe["port"] == ports["grpc"], f"{name}: {probe}"
            assert grpc_probe["service"] in HEALTH_SERVICES, f"{name}: {probe}"
        live = c["livenessProbe"]
        if "grpc" in live:
            assert not tls, name
            assert live["grpc"]["port"] == ports["grpc"], name
        elif "httpGet" in live:
            assert live["httpGet"].get("scheme", "HTTP") == ("HTTPS" if tls else "HTTP"), name
            assert live["httpGet"]["port"] == ports["http"], name
        else:  # the image's healthcheck, accepting NOT_SERVING
            command = live["exec"]["command"]
            assert command[:2] == ["python", "/opt/plaudit/healthcheck.py"], name
            assert f"--addr=127.0.0.1:{ports['grpc']}" in command, name
            ca = f"--tls-ca-file={env.get('PLAUDIT_TLS_CA_FILE')}"
            assert (ca in command) == tls, f"{name}: the check speaks TLS when the server does"
        for svc in of_kind(docs, "Service"):
            if svc["spec"]["selector"].items() <= pod_labels(doc).items():
                for port in svc["spec"]["ports"]:
                    assert port["targetPort"] in ports, f"{svc['metadata']['name']}: {port}"
        grace = float(settings.grace_period_s)  # type: ignore[attr-defined]
        pause = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
        assert grace + pause < pod_spec(doc)["terminationGracePeriodSeconds"], name


def test_generation_serves_its_openai_api_through_the_service(docs: list[Doc]) -> None:
    """The generation pod's HTTP port (the OpenAI-style API) is published by its Service, like
    gRPC and metrics, at the port the process binds."""
    deployment = named(docs, "Deployment", "plaudit-generation")
    (container,) = pod_spec(deployment)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == GenerationSettings().http_port == 8082
    service = {p["name"]: p for p in named(docs, "Service", "plaudit-generation")["spec"]["ports"]}
    assert service["http"]["targetPort"] == "http" and service["http"]["port"] == 8082
    assert service["http"]["appProtocol"] == "http"
    env = container_env(docs, deployment, container)
    assert env["PLAUDIT_HTTP_PORT"] == "8082"


def test_reward_serves_its_http_api_through_the_service(docs: list[Doc]) -> None:
    """The reward pod's HTTP port (native JSON, OpenRLHF, vLLM and TEI routes; off by default
    outside Kubernetes) is set in its config and published by its Service like gRPC and metrics."""
    deployment = named(docs, "Deployment", "plaudit-reward")
    (container,) = pod_spec(deployment)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = container_env(docs, deployment, container)
    assert RewardSettings().http_port is None and env["PLAUDIT_HTTP_PORT"] == "8081"
    assert ports["http"] == 8081
    service = {p["name"]: p for p in named(docs, "Service", "plaudit-reward")["spec"]["ports"]}
    assert service["http"]["targetPort"] == "http" and service["http"]["port"] == 8081
    assert service["http"]["appProtocol"] == "http"


def _parse(args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Parse a plaudit command line and build its settings in ``env``, as the pod would."""

    for key in [k for k in os.environ if k.startswith(("PLAUDIT_", "PET_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ns = build_parser().parse_args(args)
    # `plaudit serve <service>` carries its settings class; the trainer has its own command
    classes: dict[Any, type[PlauditSettings]] = {
        cli._cmd_train_reward: TrainRewardSettings,
        cli._cmd_train_policy: TrainPolicySettings,
    }
    settings_cls = getattr(ns, "settings_cls", None) or classes[ns.func]
    assert settings_cls in (RewardSettings, FeedbackSettings, GenerationSettings,
                            TrainRewardSettings, TrainPolicySettings), settings_cls  # fmt: skip
    unknown = {k for k in env if k.startswith("PLAUDIT_")} - {
        f"PLAUDIT_{f.upper()}" for f in settings_cls.model_fields
    }
    assert not unknown, f"{args[:2]}: no such settings {sorted(unknown)} (ignored silently)"
    return settings_from_args(settings_cls, ns)


def test_commands_and_settings_are_valid(
    docs: list[Doc], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every container's command parses with the real CLI, and its PLAUDIT_* environment
    (ConfigMaps, Secret, env) builds valid settings: a misspelt key would be ignored."""
    for doc, c in containers(docs):
        env = container_env(docs, doc, c)
        args = list(c["args"])
        if c.get("command") == ["torchrun"]:
            settings = _torchrun(docs, doc, c, env, monkeypatch)
        else:
            assert "command" not in c, "the image's entrypoint is plaudit"
            settings = _parse(args, env, monkeypatch)
        if hasattr(settings, "registry"):
            name = doc["metadata"]["name"]
            if "://" in settings.registry:  # object storage: a writable cache of versions
                assert overlay == "prod-s3" and settings.registry.startswith("s3://"), name
                assert mounts(c).get(str(settings.registry_cache)) is True, name
            else:  # the shared volume: only the trainers write it
                writable = isinstance(settings, TrainRewardSettings | TrainPolicySettings)
                assert mounts(c).get(settings.registry) is writable, f"{name}: {settings.registry}"
        url = getattr(settings, "database_url", None) or ""
        if url.startswith("sqlite:///"):
            folder = str(Path(url.removeprefix("sqlite:///")).parent)
            assert mounts(c).get(folder) is True, f"{doc['metadata']['name']}: {url}"
        threads = getattr(settings, "intra_op_threads", None) or getattr(
            settings, "num_threads", None
        )
        if threads is not None:
            procs = int(env.get("PET_NPROC_PER_NODE", 1))
            limit = cpus(c["resources"]["limits"]["cpu"])
            assert 0 < threads * procs <= limit, f"{doc['metadata']['name']}: threads vs CPUs"
            if isinstance(settings, RewardSettings | GenerationSettings):
                assert threads == limit, "ONNX Runtime threads should use the whole CPU limit"


def _torchrun(
    docs: list[Doc], job: Doc, c: Doc, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Any:
    """The multi-node Job: torchrun's PET_* options agree with the Job and its Service."""
    from torch.distributed.run import get_args_parser

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ns = get_args_parser().parse_args(c["args"])  # PET_* defaults are read at construction
    spec = job["spec"]
    assert job["kind"] == "Job" and spec["completionMode"] == "Indexed"
    assert spec["suspend"] is True, "a template run on demand, not on every apply"
    assert int(ns.nnodes) == spec["completions"] == spec["parallelism"]
    gpus = c["resources"]["limits"].get("nvidia.com/gpu")
    if gpus is not None:
        assert int(ns.nproc_per_node) == int(gpus), "one torchrun worker per GPU"
    rank = next(v for v in c["env"] if v["name"] == "PET_NODE_RANK")["valueFrom"]["fieldRef"]
    assert "job-completion-index" in rank["fieldPath"]
    subdomain = pod_spec(job)["subdomain"]
    assert ns.master_addr == f"{job['metadata']['name']}-0.{subdomain}"
    svc = named(docs, "Service", subdomain)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    assert svc["spec"]["selector"].items() <= pod_labels(job).items()
    assert int(ns.master_port) in {p["containerPort"] for p in c["ports"]}
    assert ns.module and ns.training_script == "plaudit.cli"
    return _parse(list(ns.training_script_args), env, monkeypatch)


# -- network exposure, keys and TLS (issue 17, item 7) ---------------------------------------
Pod = tuple[str, dict[str, str]]  # (namespace, labels)
CLIENT = {"plaudit.dev/client": "true"}
PROMETHEUS: Pod = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
DATABASE_PORT = 5432
RENDEZVOUS_PORT = 29500
SERVING_PORTS = {  # component -> (grpc, http, metrics)
    "reward": (50051, 8081, 9091),
    "feedback": (50052, 8080, 9092),
    "generation": (50053, 8082, 9093),
}


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and value in expr["values"]:
            return False
        if op == "Exists" and value is None:
            return False
        if op == "DoesNotExist" and value is not None:
            return False
    return True


def _peer_matches(peer: Doc, policy_ns: str, pod: Pod | None) -> bool:
    if pod is None or "ipBlock" in peer:  # outside the cluster: only ipBlocks could say
        return False
    namespace, labels = pod
    ns_labels = {"kubernetes.io/metadata.name": namespace}
    if namespace == "monitoring":
        ns_labels = {"kubernetes.io/metadata.name": "monitoring"}
    if "namespaceSelector" in peer:
        ns_ok = _selects(peer["namespaceSelector"], {**ns_labels, **_NS_LABELS.get(namespace, {})})
    else:
        ns_ok = namespace == policy_ns
    return ns_ok and _selects(peer.get("podSelector", {}), labels)


_NS_LABELS: dict[str, dict[str, str]] = {"clients": CLIENT}  # a namespace labelled as a client


def _port_matches(rule: Doc, port: int, protocol: str) -> bool:
    if not rule.get("ports"):
        return True
    for p in rule["ports"]:
        if p.get("protocol", "TCP") != protocol:
            continue
        low = p["port"]
        if low <= port <= p.get("endPort", low):
            return True
    return False


def _allowed_one_way(
    policies: list[Doc], direction: str, subject: Pod, other: Pod | None, port: int, protocol: str
) -> bool:
    """Whether the policies selecting ``subject`` let its ``direction`` traffic with ``other``
    through (no policy selecting it for that direction: allowed)."""
    namespace, labels = subject
    relevant = [
        p
        for p in policies
        if p["metadata"]["namespace"] == namespace
        and direction in p["spec"]["policyTypes"]
        and _selects(p["spec"]["podSelector"], labels)
    ]
    if not relevant:
        return True
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in relevant:
        for rule in policy["spec"].get(key, []):
            peers = rule.get(peers_key)
            peer_ok = not peers or any(_peer_matches(pr, namespace, other) for pr in peers)
            if peer_ok and _port_matches(rule, port, protocol):
                return True
    return False


def reachable(docs: list[Doc], src: Pod, dst: Pod | None, port: int, protocol: str = "TCP") -> bool:
    """Whether ``src`` may open a connection to ``dst`` (None: outside the cluster) on ``port``
    under the rendered NetworkPolicies (egress of the source and ingress of the destination)."""
    policies = of_kind(docs, "NetworkPolicy")
    if not _allowed_one_way(policies, "Egress", src, dst, port, protocol):
        return False
    return dst is None or _allowed_one_way(policies, "Ingress", dst, src, port, protocol)


def workload_pods(docs: list[Doc]) -> dict[str, Pod]:
    """component -> the (namespace, labels) of its pods."""
    return {
        pod_labels(d)["app.kubernetes.io/component"]: (d["metadata"]["namespace"], pod_labels(d))
        for d in of_kind(docs, *WORKLOADS)
    }


def test_network_policies_deny_everything_by_default(docs: list[Doc]) -> None:
    policies = of_kind(docs, "NetworkPolicy")
    deny = [
        p
        for p in policies
        if set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert deny, "a default-deny policy"
    for component, (_, labels) in workload_pods(docs).items():
        assert any(_selects(p["spec"]["podSelector"], labels) for p in deny), component


def test_every_allowed_path_names_its_ports(docs: list[Doc]) -> None:
    pods = workload_pods(docs)
    container_ports = {
        pod_labels(d)["app.kubernetes.io/component"]: {
            p["containerPort"] for c in pod_spec(d)["containers"] for p in c.get("ports", [])
        }
        for d in of_kind(docs, *WORKLOADS)
    }
    for policy in of_kind(docs, "NetworkPolicy"):
        name = policy["metadata"]["name"]
        for key in ("ingress", "egress"):
            for rule in policy["spec"].get(key, []):
                assert rule.get("ports"), f"{name}: a {key} rule without ports allows every port"
                for port in rule["ports"]:
                    assert isinstance(port["port"], int) and port.get("protocol"), name
        for rule in policy["spec"].get("ingress", []):  # single ports are ports the pods bind
            for port in rule["ports"]:
                if "endPort" in port:
                    continue
                for component, (_, labels) in pods.items():
                    if _selects(policy["spec"]["podSelector"], labels):
                        assert port["port"] in container_ports[component], f"{name}: {port}"


def test_network_policies_stop_the_lateral_attacks(docs: list[Doc]) -> None:
    """Any pod of the namespace, or of another one, tries the bearer-key gRPC ports, the HTTP
    APIs, /metrics and the trainer's torchrun rendezvous: every attempt is refused."""
    pods = workload_pods(docs)
    namespace = pods["reward"][0]
    intruders: list[Pod] = [
        (namespace, {"app": "compromised"}),
        ("elsewhere", {"app": "compromised"}),
        (namespace, {"app.kubernetes.io/name": "prometheus"}),  # a lookalike, wrong namespace
    ]
    for intruder in intruders:
        for component, ports in SERVING_PORTS.items():
            for port in ports:
                assert not reachable(docs, intruder, pods[component], port), (
                    intruder,
                    component,
                    port,
                )
        assert not reachable(docs, intruder, pods["trainer-multinode"], RENDEZVOUS_PORT)
    # the serving pods cannot be used as a stepping stone either
    for component in SERVING_PORTS:
        assert not reachable(docs, pods[component], pods["trainer-multinode"], RENDEZVOUS_PORT)
        assert not reachable(docs, pods[component], None, 22), component  # nor reach out
    assert not reachable(docs, pods["reward"], pods["feedback"], 50052)
    assert not reachable(docs, pods["generation"], pods["feedback"], 50052)
    assert not reachable(docs, pods["reward"], None, DATABASE_PORT)
    assert not reachable(docs, pods["trainer"], pods["trainer-multinode"], RENDEZVOUS_PORT)


def test_network_policies_allow_the_paths_the_system_uses(docs: list[Doc]) -> None:
    pods = workload_pods(docs)
    namespace = pods["reward"][0]
    clients: list[Pod] = [(namespace, CLIENT), ("clients", {"app": "ingress-nginx"})]
    for client in clients:
        for component, (grpc_port, http_port, _) in SERVING_PORTS.items():
            assert reachable(docs, client, pods[component], grpc_port), (client, component)
            assert reachable(docs, client, pods[component], http_port), (client, component)
    for component, (_, _, metrics) in SERVING_PORTS.items():
        assert reachable(docs, PROMETHEUS, pods[component], metrics), component
        assert not reachable(docs, PROMETHEUS, pods[component], SERVING_PORTS[component][0])
    # every configured peer address is open: PLAUDIT_REWARD_ADDR, PLAUDIT_GENERATION_ADDR
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    for doc, c in containers(docs):
        env = container_env(docs, doc, c)
        src = (doc["metadata"]["namespace"], pod_labels(doc))
        for var in ("PLAUDIT_REWARD_ADDR", "PLAUDIT_GENERATION_ADDR"):
            if not env.get(var):
                continue
            host, port = env[var].rsplit(":", 1)
            target = services[host]["spec"]["selector"]
            (dst,) = [p for p in pods.values() if target.items() <= p[1].items()]
            assert reachable(docs, src, dst, int(port)), f"{doc['metadata']['name']}: {var}"
    assert reachable(docs, pods["feedback"], pods["generation"], 50053)  # generated tasks
    for component in ("feedback", "trainer", "trainer-multinode", "policy-trainer"):
        assert reachable(docs, pods[component], None, DATABASE_PORT), component
    assert reachable(docs, pods["trainer-multinode"], pods["trainer-multinode"], RENDEZVOUS_PORT)
    for component, pod in pods.items():
        dns: Pod = ("kube-system", {"k8s-app": "kube-dns"})
        assert reachable(docs, pod, dns, 53, "UDP"), component


def secret_names(doc: Doc, c: Doc) -> set[str]:
    names = {s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s}
    names |= {
        v["valueFrom"]["secretKeyRef"]["name"]
        for v in c.get("env", [])
        if "secretKeyRef" in v.get("valueFrom", {})
    }
    mounted = {m["name"] for m in c.get("volumeMounts", [])}
    names |= {
        v["secret"]["secretName"]
        for v in pod_spec(doc).get("volumes", [])
        if "secret" in v and v["name"] in mounted
    }
    return names


def test_each_workload_reads_only_its_own_keys(docs: list[Doc]) -> None:
    """No Secret with every service's keys: a compromised pod holds its own keys only."""
    shared = {"plaudit-database", "plaudit-object-store"}  # not API keys or certificates
    for doc, c in containers(docs):
        component = pod_labels(doc)["app.kubernetes.io/component"]
        own = {f"plaudit-{component}-keys", f"plaudit-{component}-tls"}
        names = {re.sub(r"-[a-z0-9]{10}$", "", n) for n in secret_names(doc, c)}  # generated
        assert names <= own | shared, f"{doc['metadata']['name']}: {sorted(names - own - shared)}"
        assert "plaudit-api-keys" not in names
    for component in SERVING_PORTS:  # each server finds the keys it accepts
        deployment = named(docs, "Deployment", f"plaudit-{component}")
        (c,) = pod_spec(deployment)["containers"]
        assert f"plaudit-{component}-keys" in secret_names(deployment, c), component


def test_prod_serves_tls_with_rate_and_in_flight_limits(
    docs: list[Doc], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if overlay == "dev":
        pytest.skip("dev serves plaintext without keys (PLAUDIT_AUTH_DISABLED)")
    for doc, c in containers(docs):
        component = pod_labels(doc)["app.kubernetes.io/component"]
        env = container_env(docs, doc, c)
        tls_mounts = [
            m["mountPath"]
            for m in c.get("volumeMounts", [])
            if any(
                v["name"] == m["name"]
                and v.get("secret", {}).get("secretName", "").endswith("-tls")
                for v in pod_spec(doc)["volumes"]
            )
        ]
        files = [v for k, v in env.items() if k.startswith("PLAUDIT_TLS_")]
        for path in files:  # every TLS file is in the pod's own certificate Secret
            assert any(Path(path).is_relative_to(m) for m in tls_mounts), (component, path)
        if component in SERVING_PORTS:
            for key in [k for k in os.environ if k.startswith("PLAUDIT_")]:
                monkeypatch.delenv(key)
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            settings = SERVICE_SETTINGS[component]()
            assert settings.tls_cert_file and settings.tls_key_file, component  # type: ignore[attr-defined]
            assert settings.rate_limit_rps > 0 and settings.max_in_flight > 0, component  # type: ignore[attr-defined]
        if env.get("PLAUDIT_REWARD_ADDR"):  # a client of TLS servers verifies them
            assert env.get("PLAUDIT_TLS_CA_FILE"), f"{component}: talks to reward without TLS"


def test_healthcheck_speaks_tls(tmp_path: Path) -> None:
    from tests.certs import make_tls_files

    files = make_tls_files(tmp_path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(files.server_key.read_bytes(), files.server_cert.read_bytes())]
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        addr = f"127.0.0.1:{port}"
        tls = [f"--tls-ca-file={files.ca}", "--tls-server-name=localhost"]
        assert healthcheck.main(["--addr", addr, *tls]) == 0
        assert healthcheck.main(["--addr", addr, "--timeout", "1"]) == 2  # plaintext: no answer
    finally:
        server.stop(None)


# -- the trainers ----------------------------------------------------------------------------
REWARD_TRAINER = "plaudit-train-reward"
POLICY_TRAINER = "plaudit-train-policy"
GPU_OVERLAYS = {"prod", "prod-s3"}  # components/gpu


def daily_at(cron: Doc) -> int:
    """Minutes after midnight of a daily CronJob schedule."""
    minute, hour, *rest = cron["spec"]["schedule"].split()
    assert rest == ["*", "*", "*"], f"{cron['metadata']['name']}: a daily schedule"
    return int(hour) * 60 + int(minute)


def flag_value(args: list[str], flag: str) -> str:
    for i, arg in enumerate(args):
        if arg == flag:
            return args[i + 1]
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"no {flag} in {args}")


def test_policy_trainer_trains_after_a_new_reward_model(docs: list[Doc], overlay: str) -> None:
    cron = named(docs, "CronJob", POLICY_TRAINER)
    reward = named(docs, "CronJob", REWARD_TRAINER)
    (c,) = pod_spec(cron)["containers"]
    (reward_c,) = pod_spec(reward)["containers"]
    args = list(c["args"])
    env = container_env(docs, cron, c)
    assert args[:2] == ["train", "policy"]
    from plaudit.up import UpSettings

    # the loop's default method, the one the method race picked (docs/benchmarks.md)
    assert flag_value(args, "--method") == UpSettings.model_fields["policy_method"].default
    assert flag_value(args, "--base") == "live", "start from the live policy's checkpoint"
    assert {"--only-after-new-reward", "--promote"} <= set(args)

    # after the reward trainer, one at a time, and suspended in the same overlays
    assert cron["spec"]["timeZone"] == reward["spec"]["timeZone"]
    assert daily_at(cron) >= daily_at(reward) + 60, "runs after the nightly reward training"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"].get("suspend", False) == reward["spec"].get("suspend", False)

    # the reward service through its Service, authenticated like the other reward clients
    svc = named(docs, "Service", "plaudit-reward")
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    addr = (
        flag_value(args, "--reward-addr") if "--reward-addr" in args else env["PLAUDIT_REWARD_ADDR"]
    )
    assert addr == f"plaudit-reward:{port}"
    sources = {v["name"]: v["valueFrom"] for v in c["env"] if "valueFrom" in v}
    reward_sources = {v["name"]: v["valueFrom"] for v in reward_c["env"] if "valueFrom" in v}
    assert sources["PLAUDIT_DATABASE_URL"] == reward_sources["PLAUDIT_DATABASE_URL"]
    assert sources["PLAUDIT_API_KEY"]["secretKeyRef"] == {
        "name": "plaudit-policy-trainer-keys",
        "key": "PLAUDIT_API_KEY",
        "optional": True,  # dev runs the services without keys
    }

    # the reward trainer's pod: identity, security, the registry volume and mounts
    spec, reward_spec = pod_spec(cron), pod_spec(reward)
    for key in ("serviceAccountName", "automountServiceAccountToken", "securityContext"):
        assert spec[key] == reward_spec[key], key
    # the same volumes, but for the certificate it checks the reward service's against (TLS)
    volumes = {v["name"]: v for v in spec["volumes"] if v["name"] != "tls"}
    assert volumes == {v["name"]: v for v in reward_spec["volumes"]}
    tls_ca = Path(env.get("PLAUDIT_TLS_CA_FILE", "/none"))
    assert {m: w for m, w in mounts(c).items() if not tls_ca.is_relative_to(m)} == mounts(reward_c)
    registry, runs = env["PLAUDIT_REGISTRY"], Path(env["PLAUDIT_RUNS_DIR"])
    if overlay == "prod-s3":  # no shared volume: runs on the pod's /tmp, --base live falls back
        assert registry.startswith("s3://") and "persistentVolumeClaim" not in volumes["registry"]
        assert runs.is_relative_to("/tmp")
    else:  # the run folders on the shared registry volume, beside the kinds' namespaces
        assert volumes["registry"]["persistentVolumeClaim"]["claimName"] == "plaudit-registry"
        assert mounts(c)[registry] is True
        assert runs.relative_to(registry).parts[0] not in {"reward", "policy"}
    assert any(runs.is_relative_to(m) and w for m, w in mounts(c).items()), runs

    resources = c["resources"]
    if overlay != "dev":  # a 135M-parameter policy: 4 cores, 16 GiB
        assert cpus(resources["limits"]["cpu"]) == 4
        assert resources["requests"]["memory"] == resources["limits"]["memory"] == "16Gi"


def test_gpu_component_patches_both_trainers(docs: list[Doc], overlay: str) -> None:
    gpu = overlay in GPU_OVERLAYS
    for name in (REWARD_TRAINER, POLICY_TRAINER):
        cron = named(docs, "CronJob", name)
        spec = pod_spec(cron)
        (c,) = spec["containers"]
        env = container_env(docs, cron, c)
        assert (c["resources"]["limits"].get("nvidia.com/gpu") == 1) is gpu, name
        assert ("trainer-cuda" in c["image"]) is gpu, name
        assert env["PLAUDIT_DEVICE"] == ("cuda" if gpu else "auto"), name
        tolerations = {t["key"] for t in spec.get("tolerations", [])}
        assert ("nvidia.com/gpu" in tolerations) is gpu, name


# -- monitoring ------------------------------------------------------------------------------
def known_series() -> set[str]:
    """Every series name the services export (metric classes instantiated, not hand-listed)."""
    registry = CollectorRegistry()
    GrpcMetrics(registry)
    RewardMetrics(registry)
    FeedbackMetrics(registry)
    GenerationMetrics(registry)
    SwapMetrics(registry, "plaudit_reward")
    SwapMetrics(registry, "plaudit_generation")
    suffixes = {
        "counter": ["_total"],
        "gauge": [""],
        "info": ["_info"],
        "histogram": ["_bucket", "_sum", "_count"],
    }
    return {
        f"{family.name}{suffix}"
        for family in registry.collect()
        for suffix in suffixes[family.type]
    }


def prometheus_rule() -> Doc:
    return named(render("prod"), "PrometheusRule", "plaudit")


def dashboard() -> Doc:
    data: Doc = json.loads((MONITORING / "dashboards" / "plaudit.json").read_text())
    return data


def exprs_of_dashboard() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def test_alerts_and_dashboard_use_only_exported_metrics() -> None:
    rules = [r["expr"] for g in prometheus_rule()["spec"]["groups"] for r in g["rules"]]
    used = {m for e in rules + exprs_of_dashboard() for m in re.findall(r"\bplaudit_\w+", e)}
    unknown = used - known_series()
    assert not unknown, f"no such metrics: {sorted(unknown)}"
    for required in (
        "plaudit_reward_model_swap_failing",
        "plaudit_generation_model_swap_failing",
        "plaudit_feedback_database_up",
        "plaudit_feedback_events_total",
        "plaudit_grpc_errors_total",
        "plaudit_grpc_request_duration_seconds_bucket",
    ):
        assert any(required in e for e in rules), f"no alert on {required}"


def test_prometheus_rule_structure() -> None:
    rule = prometheus_rule()
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = []
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r), r
            assert isinstance(r["expr"], str) and r["expr"].strip()
            if "alert" in r:
                alerts.append(r["alert"])
                assert r["labels"]["severity"] in {"warning", "critical"}, r["alert"]
                assert r["annotations"]["summary"], r["alert"]
                assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]
    assert len(alerts) == len(set(alerts))
    errors = next(
        r
        for g in rule["spec"]["groups"]
        for r in g["rules"]
        if "server_errors" in r.get("record", "")
    )
    assert set(re.findall(r"[A-Z_]{4,}", errors["expr"])) >= SERVER_ERROR_CODES


def test_training_stale_alert_covers_every_training_cronjob() -> None:
    (rule,) = [
        r
        for g in prometheus_rule()["spec"]["groups"]
        for r in g["rules"]
        if r.get("alert") == "PlauditTrainingStale"
    ]
    (pattern,) = re.findall(r'cronjob=~?"([^"]+)"', rule["expr"])
    cronjobs = {d["metadata"]["name"] for d in of_kind(render("prod"), "CronJob")}
    assert cronjobs == {REWARD_TRAINER, POLICY_TRAINER}
    for name in cronjobs:
        assert re.fullmatch(pattern, name), name
    assert re.search(r"by \([^)]*\bcronjob\b", rule["expr"]), "one alert per CronJob"
    assert "$labels.cronjob" in rule["annotations"]["summary"]


def test_service_monitor_scrapes_every_service() -> None:
    docs = render("prod")
    monitor = named(docs, "ServiceMonitor", "plaudit")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"].items()
    scraped = [s for s in of_kind(docs, "Service") if selector <= s["metadata"]["labels"].items()]
    assert {s["metadata"]["name"] for s in scraped} == {
        "plaudit-reward",
        "plaudit-feedback",
        "plaudit-generation",
    }
    for endpoint in monitor["spec"]["endpoints"]:
        for svc in scraped:
            assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    (tmp_path / "plaudit.rules.yaml").write_text(yaml.safe_dump(prometheus_rule()["spec"]))
    shutil.copy(MONITORING / "tests" / "alerts.test.yaml", tmp_path)
    return tmp_path


def test_promtool_check_rules(rules_dir: Path) -> None:
    result = run(
        promtool(),
        "check",
        "rules",
        "--lint=all",
        "--lint-fatal",
        "plaudit.rules.yaml",
        cwd=rules_dir,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alerts(rules_dir: Path) -> None:
    result = run(promtool(), "test", "rules", "alerts.test.yaml", cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_well_formed_and_shipped() -> None:
    board = dashboard()
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        cover = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & cover, f"{p['title']} overlaps another panel"
        cells |= cover
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            assert set(re.findall(r"\$(\w+)", t["expr"])) - {"__rate_interval"} <= variables
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in (
        "request rate",
        "errors",
        "latency",
        "batch size",
        "queue depth",
        "tokens",
        "feedback events",
        "commit latency",
        "swaps",
        "completions",
    ):
        assert topic in titles, topic
    shipped = named(render("prod"), "ConfigMap", "plaudit-grafana-dashboard")
    assert shipped["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(shipped["data"]["plaudit.json"]) == board


# -- the Dockerfile and the image helpers ----------------------------------------------------
DOCKERFILE = DEPLOY / "Dockerfile"


def stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if m := re.match(r"FROM \S+ AS (\S+)$", line):
            current = out.setdefault(m.group(1), [])
        current.append(line)
    return out


def test_hadolint() -> None:
    result = run(tool("hadolint"), str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_targets() -> None:
    all_stages = stages()
    images = ["serving-cpu", "serving-cuda", "trainer-cpu", "trainer-cuda"]
    assert set(images) <= all_stages.keys()
    assert list(all_stages)[-1] == "serving-cpu", "the default target"
    for name in images:
        lines = all_stages[name]
        assert f"USER {UID}:{UID}" in lines, name
        assert 'ENTRYPOINT ["plaudit"]' in lines, name
        health = [line for line in lines if line.startswith("HEALTHCHECK")]
        if name.startswith("serving"):
            assert health and "/opt/plaudit/healthcheck.py" in health[0], name
        else:
            assert health == ["HEALTHCHECK NONE"], name
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), src


def test_requirements_leave_torch_out_of_serving() -> None:
    pyproject = REPO / "pyproject.toml"
    serving = {
        requirements.requirement_name(r)
        for r in requirements.requirements(pyproject, "serving", "cpu")
    }
    trainer = {
        requirements.requirement_name(r)
        for r in requirements.requirements(pyproject, "trainer", "cpu")
    }
    training_only = {
        requirements.requirement_name(r) for r in requirements.extra(pyproject, "train")
    }
    assert "torch" in training_only and "transformers" in training_only
    assert not serving & training_only
    assert trainer >= training_only
    assert "onnxruntime" in serving and "onnxruntime-gpu" not in serving
    gpu = {
        requirements.requirement_name(r)
        for r in requirements.requirements(pyproject, "serving", "gpu")
    }
    assert gpu == serving | {"onnxruntime-gpu"}, "the same set, with the GPU build beside"
    assert "s3fs" in serving and "s3fs" in trainer, "every image can use an s3:// registry"


def _dependency_closure(names: set[str]) -> set[str]:
    """Installed distributions ``names`` pull in (extras left out), found from their metadata."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(requirements.canonical(req.name))
    return seen


def test_no_serving_requirement_pulls_in_torch() -> None:
    """Transitively: a serving image that installs torch by way of a dependency (peft does) would
    carry gigabytes it never imports."""
    serving = {
        requirements.requirement_name(r)
        for r in requirements.requirements(REPO / "pyproject.toml", "serving", "cpu")
    }
    closure = _dependency_closure(serving)
    assert "torch" not in closure and "transformers" not in closure


def test_dockerignore_keeps_what_the_build_copies() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[0] == "*", "an allowlist"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for src in line.split()[1:-1]:
                assert src.rstrip("/") in allowed, src


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def test_healthcheck_exit_codes(health_server: tuple[str, health.HealthServicer]) -> None:
    addr, servicer = health_server
    name = "plaudit.v1.FeedbackService"
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main(["--addr", addr]) == 0
    assert healthcheck.main(["--addr", addr, "--service", name]) == 1
    assert healthcheck.main(["--addr", addr, "--service", name, "--allow-not-serving"]) == 0
    assert healthcheck.main(["--addr", addr, "--service", "plaudit.v1.Nope"]) == 1
    servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main(["--addr", addr, "--service", name]) == 0
    assert healthcheck.main(["--addr", "127.0.0.1:1", "--timeout", "0.5"]) == 2  # no server


# -- the HTTP front ends: probed and monitored like gRPC -----------------------------------------
def _probe_ports(c: Doc, ports: dict[str, int]) -> dict[str, set[str]]:
    """Which front end each probe of container ``c`` reaches: "http" (GET /healthz), "grpc"
    (the kubelet's gRPC probe, or the image's gRPC health check)."""
    reached: dict[str, set[str]] = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = c[probe]
        if "httpGet" in spec:
            assert spec["httpGet"]["path"] == "/healthz", probe
            assert spec["httpGet"]["port"] == ports["http"], probe
            reached.setdefault("http", set()).add(probe)
        elif "grpc" in spec:
            assert spec["grpc"]["port"] == ports["grpc"], probe
            reached.setdefault("grpc", set()).add(probe)
        else:
            assert f"--addr=127.0.0.1:{ports['grpc']}" in spec["exec"]["command"], probe
            reached.setdefault("grpc", set()).add(probe)
    return reached


def test_every_front_end_is_probed(docs: list[Doc], overlay: str) -> None:
    """Each serving pod's probes reach its HTTP front end (HTTPS where the server has TLS) and,
    where the kubelet can speak to it (plaintext, or the image's check over TLS), its gRPC one:
    HTTP /healthz starts the pod (it answers 503 until the model or database is ready, as gRPC
    health does), gRPC health decides readiness; reward and generation stay alive on HTTP,
    feedback on its gRPC check that tolerates a database outage."""
    for component, (grpc_port, http_port, _) in SERVING_PORTS.items():
        deployment = named(docs, "Deployment", f"plaudit-{component}")
        (c,) = pod_spec(deployment)["containers"]
        env = container_env(docs, deployment, c)
        tls = "PLAUDIT_TLS_CERT_FILE" in env
        reached = _probe_ports(c, {"grpc": grpc_port, "http": http_port})
        assert "startupProbe" in reached["http"], (overlay, component)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if "httpGet" in c[probe]:
                scheme = c[probe]["httpGet"].get("scheme", "HTTP")
                assert scheme == ("HTTPS" if tls else "HTTP"), (overlay, component, probe)
        if component == "feedback":
            assert "--allow-not-serving" in c["livenessProbe"]["exec"]["command"]
        else:
            assert "livenessProbe" in reached["http"], (overlay, component)
        if tls:
            assert "readinessProbe" in reached["http"], (overlay, component)
        else:
            assert reached["grpc"] >= {"readinessProbe"}, (overlay, component)
            assert c["readinessProbe"]["grpc"]["service"] in HEALTH_SERVICES


def test_http_routes_are_recorded_and_alerted_like_grpc() -> None:
    """Every service's HTTP request counter and latency histogram feed the HTTP recording rules,
    which carry an error-rate and a latency alert as the gRPC ones do; the dashboard shows them."""
    rules = {
        r.get("record") or r.get("alert"): r["expr"]
        for g in prometheus_rule()["spec"]["groups"]
        for r in g["rules"]
    }
    http_series = {s for s in known_series() if "_http_request" in s}
    assert {s.split("_")[1] for s in http_series} == set(SERVING_PORTS)
    for series in http_series:
        if series.endswith("_requests_total"):
            assert series in rules["plaudit:http_requests:rate5m"], series
            assert series in rules["plaudit:http_server_errors:rate5m"], series
        elif series.endswith("_bucket"):
            assert series in rules["plaudit:http_request_duration_seconds:p99_5m"], series
    assert 'status=~"5.."' in rules["plaudit:http_server_errors:rate5m"]
    assert "plaudit:http_server_errors:rate5m" in rules["PlauditHttpHighErrorRate"]
    assert "plaudit:http_request_duration_seconds:p99_5m" in rules["PlauditHttpHighLatencyP99"]
    for alert in ("PlauditHttpHighErrorRate", "PlauditHttpHighLatencyP99"):
        assert "reward" in rules[alert], alert
    board = " ".join(exprs_of_dashboard())
    for series in http_series:
        if not series.endswith(("_sum", "_count")):
            assert series in board, f"the dashboard does not show {series}"
    monitor = named(render("prod"), "ServiceMonitor", "plaudit")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]  # one scrape each


# -- sharded training: components/fsdp (issue 22, item 1) ------------------------------------
def render_validated(tmp_path: Path, *components: str) -> list[Doc]:
    """base with ``components`` (folders of deploy/k8s/components), rendered by kustomize in a
    kustomization under ``tmp_path``, every document validated (strict) for K8S_VERSIONS."""
    import kubernetes_validate

    up = os.path.relpath(K8S, tmp_path)
    listed = ", ".join(f"{up}/components/{c}" for c in components)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: plaudit\n"
        f"resources: [{up}/base]\ncomponents: [{listed}]\n"
    )
    result = run(tool("kubectl"), "kustomize", str(tmp_path))
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    for doc in docs:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    return docs


def test_fsdp_component_shards_the_multinode_job_and_keeps_its_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """base + gpu + fsdp renders and validates; the Job's torchrun restarts every node's
    workers together (c10d rendezvous on pod 0) and the trainer, sharded, checkpoints into one
    run folder per Job on a volume all pods share, so a restarted run resumes from it."""
    from torch.distributed.run import get_args_parser

    docs = render_validated(tmp_path, "gpu", "fsdp")

    job = named(docs, "Job", "plaudit-train-multinode")
    (c,) = pod_spec(job)["containers"]
    env = container_env(docs, job, c)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ns = get_args_parser().parse_args(c["args"])
    assert ns.rdzv_backend == "c10d" and int(ns.max_restarts) > 0
    host, port = ns.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{pod_spec(job)['subdomain']}"
    assert int(port) in {p["containerPort"] for p in c["ports"]}
    assert int(ns.nnodes) == job["spec"]["completions"] and job["spec"]["backoffLimit"] > 0
    assert int(ns.nproc_per_node) == int(c["resources"]["limits"]["nvidia.com/gpu"])

    settings = _parse(list(ns.training_script_args), env, monkeypatch)
    assert isinstance(settings, TrainRewardSettings)
    assert settings.strategy == "fsdp" and settings.checkpoint_every > 0 and settings.resume
    # one run folder per Job (not per pod or restart), on a volume every node mounts
    assert settings.output_dir is not None and "$(JOB_NAME)" in str(settings.output_dir)
    job_name = next(v for v in c["env"] if v["name"] == "JOB_NAME")["valueFrom"]["fieldRef"]
    assert job_name["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    names = [v["name"] for v in c["env"]]
    assert names.index("JOB_NAME") < names.index("PLAUDIT_OUTPUT_DIR"), "defined before use"
    (mount,) = [m for m in c["volumeMounts"] if str(settings.output_dir).startswith(m["mountPath"])]
    assert mounts(c)[mount["mountPath"]] is True
    (volume,) = [v for v in pod_spec(job)["volumes"] if v["name"] == mount["name"]]
    claim = named(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert mounts(c).get(settings.registry) is True


# -- generation on a vLLM fleet: components/vllm-backend (issue 22, item 2) ---------------------
def test_vllm_backend_component_samples_on_vllm_with_lora_policies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """base + vllm-backend renders and validates; the generation service samples on the team's
    vLLM (Service vllm, port 8000) and loads each promoted policy into it as a LoRA adapter
    from the registry folder vLLM mounts alike; the policy trainer trains rank-16 adapters from
    the base model vLLM serves (never over the live policy: such adapters are refused), and
    only the generation pods may reach vLLM's port."""
    from plaudit.services.common.registry import ModelRegistry

    docs = render_validated(tmp_path, "vllm-backend")

    # the generation service: vLLM samples, promoted policies reach it as adapters
    deployment = named(docs, "Deployment", "plaudit-generation")
    (c,) = pod_spec(deployment)["containers"]
    settings = _parse(list(c["args"]), container_env(docs, deployment, c), monkeypatch)
    assert isinstance(settings, GenerationSettings)
    assert settings.backend == "openai" and settings.backend_url == "http://vllm:8000"
    assert settings.backend_model == "smollm2"
    assert settings.backend_adapters == "vllm"
    assert settings.backend_adapter_base == "smollm2"
    # vLLM mounts the registry volume where this service does: the same version folders
    registry = settings.registry
    assert mounts(c)[registry] is False, "generation reads the registry, never writes it"
    root = Path(settings.backend_adapter_root)
    assert root.is_relative_to(registry)
    assert (
        str(root) == f"{registry}/policy/versions" == ModelRegistry(registry, "policy").versions_dir
    )

    # the policy trainer: LoRA adapters of vLLM's rank, over the base model vLLM serves
    cron = named(docs, "CronJob", POLICY_TRAINER)
    (trainer,) = pod_spec(cron)["containers"]
    args = list(trainer["args"])
    policy = _parse(args, container_env(docs, cron, trainer), monkeypatch)
    assert isinstance(policy, TrainPolicySettings)
    assert policy.lora_r == 16 and policy.base == "smollm2"
    assert args.count("--base") == 1 and "live" not in args
    assert {"--only-after-new-reward", "--promote"} <= set(args), "the rest of base's command"

    # the network: generation pods (only) reach vLLM's pods on the backend URL's port
    pods = workload_pods(docs)
    vllm: Pod = ("plaudit", {"app.kubernetes.io/name": "vllm"})
    port = 8000
    assert settings.backend_url.endswith(f":{port}")
    assert reachable(docs, pods["generation"], vllm, port)
    assert not reachable(docs, pods["generation"], vllm, 22)
    assert not reachable(docs, pods["generation"], ("plaudit", {"app": "other"}), port)
    assert not reachable(docs, pods["generation"], ("elsewhere", vllm[1]), port)
    for component in ("feedback", "reward", "trainer", "policy-trainer"):
        assert not reachable(docs, pods[component], vllm, port), component
