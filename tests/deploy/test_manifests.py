"""deploy/: every overlay rendered by the real kustomize (kubectl 1.37.1), every object validated
strictly against the Kubernetes 1.37 schemas (unknown fields fail), custom resources checked by
apiVersion and kind, and the policies a production cluster enforces checked over the output."""

from __future__ import annotations

import re
from collections import Counter
from functools import cache
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.k8s import ROOT, kustomize

OVERLAYS = sorted(p.name for p in (ROOT / "deploy" / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
CUSTOM = {
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
}
"""Custom resources the overlays use (cert-manager, KEDA, the Prometheus Operator): no schema in
Kubernetes' own, so checked by apiVersion and kind, and for the fields the tests below read."""
BASE_KINDS = Counter(
    {
        "Namespace": 1,
        "ServiceAccount": 1,
        "ConfigMap": 1,
        "Service": 2,
        "PersistentVolumeClaim": 1,
        "Deployment": 2,
        "PodDisruptionBudget": 2,
        "NetworkPolicy": 2,
    }
)
EXPECTED_KINDS = {
    "cpu": BASE_KINDS,
    "cuda": BASE_KINDS,
    "neuron": BASE_KINDS,
    "colocated": BASE_KINDS - Counter({"Service": 1, "Deployment": 1, "PodDisruptionBudget": 1, "NetworkPolicy": 1}),
    "tls": BASE_KINDS + Counter({"Issuer": 2, "Certificate": 4}),
    "autoscaling": BASE_KINDS + Counter({"ScaledObject": 2, "PodMonitor": 1, "Deployment": 1, "Service": 1, "ConfigMap": 1, "NetworkPolicy": 1}),
    "compiled": BASE_KINDS + Counter({"Job": 1, "PersistentVolumeClaim": 1}),
    "model-image": BASE_KINDS - Counter({"PersistentVolumeClaim": 1}),
}


@cache
def rendered(overlay: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(kustomize(ROOT / "deploy" / "overlays" / overlay)) if doc]


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]) for o in objects if o["kind"] in ("Deployment", "Job")]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def test_every_overlay_is_listed() -> None:
    assert set(OVERLAYS) == set(EXPECTED_KINDS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_objects(overlay: str) -> None:
    objects = rendered(overlay)
    assert Counter(o["kind"] for o in objects) == EXPECTED_KINDS[overlay]
    assert all(o["metadata"].get("namespace") == "nxserve" for o in objects if o["kind"] != "Namespace")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_validate_strictly_against_kubernetes_1_37(overlay: str) -> None:
    for o in rendered(overlay):
        if (o["apiVersion"], o["kind"]) in CUSTOM:
            assert o["metadata"]["name"] and isinstance(o["spec"], dict)
            continue
        kubernetes_validate.validate(o, "1.37", strict=True)


def test_strict_validation_catches_an_unknown_field() -> None:
    """The check above can fail: a misspelt field is refused."""
    deployment = find(rendered("cpu"), "Deployment", "nxserve-decode")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.37", strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policy(overlay: str) -> None:
    objects = rendered(overlay)
    for where, spec in pod_specs(objects):
        assert spec.get("automountServiceAccountToken") is False, where
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True and pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        is_job = where.startswith("Job/")
        port_names: list[str] = []
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            name = f"{where}/{c['name']}"
            image = c["image"]
            assert re.fullmatch(r"[\w./-]+(:[\w.-]+|@sha256:[0-9a-f]{64})", image) and not image.endswith(":latest"), f"{name}: unpinned {image}"
            resources = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= resources.get(kind, {}).keys(), f"{name}: no {kind}"
            sc = c.get("securityContext", {})
            assert sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False, name
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True and sc.get("capabilities", {}).get("drop") == ["ALL"], name
            if c in spec["containers"] and not is_job:  # workloads that serve: probed
                assert {"startupProbe", "readinessProbe", "livenessProbe"} <= c.keys(), f"{name}: missing probes"
            for port in c.get("ports", []):
                assert port.get("name"), f"{name}: port {port['containerPort']} has no name"
                port_names.append(port["name"])
        assert len(port_names) == len(set(port_names)), f"{where}: port names repeat: {port_names}"
    for o in objects:
        if o["kind"] == "ServiceAccount":
            assert o.get("automountServiceAccountToken") is False
        if o["kind"] == "Service":
            assert all(p.get("name") for p in o["spec"]["ports"]), o["metadata"]["name"]


def _selected(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    wanted = policy["spec"]["podSelector"].get("matchLabels", {})
    return wanted.items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_selected_by_a_network_policy_and_decode_admits_prefill_only(overlay: str) -> None:
    objects = rendered(overlay)
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    for o in objects:
        if o["kind"] == "Deployment":
            labels = o["spec"]["template"]["metadata"]["labels"]
            assert any(_selected(p, labels) for p in policies), f"{o['metadata']['name']} has no NetworkPolicy"
    if overlay == "colocated":
        return
    decode = find(objects, "NetworkPolicy", "nxserve-decode")
    grpc_rules = [r for r in decode["spec"]["ingress"] if {"port": "grpc", "protocol": "TCP"} in r["ports"]]
    assert grpc_rules and all(
        r["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "nxserve", "app.kubernetes.io/component": "prefill"}}}]
        for r in grpc_rules
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_match_ports_and_grace_covers_the_drain(overlay: str) -> None:
    for o in rendered(overlay):
        if o["kind"] != "Deployment" or not o["metadata"]["name"].startswith(("nxserve-prefill", "nxserve-decode")):
            continue
        spec = o["spec"]["template"]["spec"]
        for c in spec["containers"]:
            args = c["args"]
            flags = dict(a.removeprefix("--").split("=", 1) for a in args if a.startswith("--") and "=" in a)
            probe_port = int(flags.get("health-port", flags["port"]))
            assert {p["containerPort"] for p in c["ports"]} >= {int(flags["port"]), probe_port}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[probe]["grpc"]["port"] == probe_port, (o["metadata"]["name"], c["name"], probe)
            service = {"prefill": "nxserve.v1.Generation", "decode": "nxserve.v1.Decode"}[args[0]]
            assert c["readinessProbe"]["grpc"]["service"] == service
            assert spec["terminationGracePeriodSeconds"] > float(flags["grace"]), "SIGKILL would cut the drain short"


def test_overlay_specifics() -> None:
    cuda = find(rendered("cuda"), "Deployment", "nxserve-decode")["spec"]["template"]["spec"]
    assert cuda["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1" and cuda["containers"][0]["image"].endswith("-cuda")
    neuron = find(rendered("neuron"), "Deployment", "nxserve-prefill")["spec"]["template"]["spec"]
    assert neuron["containers"][0]["resources"]["limits"]["aws.amazon.com/neuron"] == "1"
    assert neuron["tolerations"][0]["key"] == "aws.amazon.com/neuron"
    colocated = find(rendered("colocated"), "Deployment", "nxserve-prefill")["spec"]["template"]["spec"]
    assert [c["name"] for c in colocated["containers"]] == ["prefill", "decode"]
    kv = next(v for v in colocated["volumes"] if v["name"] == "kv")
    assert kv["emptyDir"]["medium"] == "Memory"
    assert all({"name": "kv", "mountPath": "/kv"} in c["volumeMounts"] and "--kv-shm-dir=/kv" in c["args"] for c in colocated["containers"])
    tls = find(rendered("tls"), "Deployment", "nxserve-prefill")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--api-keys-file=/secrets/api-keys/keys" in tls and "--decode-tls-server-name=nxserve-decode.nxserve.svc" in tls
    decode_cert = find(rendered("tls"), "Certificate", "nxserve-decode-tls")
    assert "nxserve-decode.nxserve.svc" in decode_cert["spec"]["dnsNames"]
    scaled = {o["metadata"]["name"]: o for o in rendered("autoscaling") if o["kind"] == "ScaledObject"}
    assert "nxserve_decode_slots_count" in scaled["nxserve-decode"]["spec"]["triggers"][0]["metadata"]["query"]
    assert "nxserve_queue_depth" in scaled["nxserve-prefill"]["spec"]["triggers"][0]["metadata"]["query"]
    compiled = rendered("compiled")
    job_args = find(compiled, "Job", "nxserve-compile")["spec"]["template"]["spec"]["containers"][0]["args"]
    service_args = find(compiled, "Deployment", "nxserve-decode")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "@/etc/nxserve/engine.args" in job_args and "@/etc/nxserve/engine.args" in service_args  # the same shapes
    assert "--backend=compile" in service_args


def test_metric_names_the_manifests_query_exist() -> None:
    """KEDA's queries name metrics the services export (README's table)."""
    readme = (ROOT / "README.md").read_text()
    for o in rendered("autoscaling"):
        if o["kind"] == "ScaledObject":
            for name in re.findall(r"\b(nxserve_[a-z_]+)\{", o["spec"]["triggers"][0]["metadata"]["query"]):
                assert f"| {name} |" in readme or f"| {name}_total |" in readme, name


def test_dockerfile_runs_nxserve_as_non_root_from_a_slim_stage() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+) AS (\w+)", text, flags=re.M)
    assert [name for _, name in stages] == ["build", "runtime", "compiler"]
    runtime = text.split("AS runtime", 1)[1].split("AS compiler", 1)[0]
    assert "g++" not in runtime and 'ENTRYPOINT ["nxserve"]' in runtime and "USER 10001:10001" in runtime
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.M):
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".cache", ".git"} <= set(ignored)
