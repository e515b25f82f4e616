"""The rendered manifests run: every pod of an overlay started as local processes from its
containers' own command (the image's ENTRYPOINT, from deploy/Dockerfile), args and env, the way a
node would run them, with what a cluster provides emulated:

- each pod gets a loopback address of its own (127.0.0.x); inside a pod, 0.0.0.0 and 127.0.0.1
  are that address, so containers of one pod reach each other there, as they would;
- volumes are folders: the ConfigMap's files, the model PVC holding the test checkpoint, one
  folder per emptyDir shared by the pod's containers (the colocated KV arena among them);
- cluster DNS is a DNS server in the test: `dns:///NAME` targets ask it, and it answers a headless
  Service's name with its ready pods (readiness from the containers' readinessProbe), as the
  endpoints controller and CoreDNS would;
- a Service is reached at a ready pod's address and the targetPort it names.

Then the probes' health checks answer SERVING, a request streams through the prefill Service's
port, and each metrics port serves /metrics. This proves the manifests' flags, ports, files and
discovery mode are the ones the code accepts."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nxserve.client import Client
from nxserve.omp_env import share_cores
from nxserve.v1 import decode_pb2, decode_pb2_grpc
from tests.deploy.test_manifests import find, rendered
from tests.dns import DnsServer
from tests.k8s import ROOT
from tests.services import wait_until

pytestmark = pytest.mark.slow


def entrypoint() -> list[str]:
    """The runtime image's ENTRYPOINT, as this machine runs it (`nxserve` is nxserve.cli)."""
    runtime = (ROOT / "deploy" / "Dockerfile").read_text().split("AS runtime", 1)[1].split("\nFROM ", 1)[0]
    [command] = re.findall(r"^ENTRYPOINT (\[.*\])", runtime, flags=re.M)
    assert yaml.safe_load(command) == ["nxserve"]
    return [sys.executable, "-m", "nxserve.cli"]


@dataclass
class Container:
    pod: Pod
    spec: dict[str, Any]
    process: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return f"{self.pod.name}/{self.spec['name']}"

    def probe(self, kind: str) -> bool:
        """Whether the container's `kind` probe (a gRPC health check) passes now."""
        check = self.spec[kind]["grpc"]
        with grpc.insecure_channel(f"{self.pod.ip}:{check['port']}") as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=check.get("service", "")), timeout=1)
            except grpc.RpcError:
                return False
        return response.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class Pod:
    name: str
    ip: str
    labels: dict[str, str]
    folders: dict[str, Path]
    """Volume name -> the folder standing for it."""
    containers: list[Container] = field(default_factory=list)

    def ready(self) -> bool:
        return all(c.probe("readinessProbe") for c in self.containers)


class LocalNode:
    """Runs an overlay's Deployments as processes (see the module's docstring)."""

    def __init__(self, objects: list[dict[str, Any]], *, model: Path, root: Path) -> None:
        self.objects = objects
        self.model = model
        self.root = root
        self.dns = DnsServer()
        self.pods: list[Pod] = []
        self._stop = threading.Event()
        self._endpoints = threading.Thread(target=self._publish_endpoints, daemon=True)

    def _volume(self, pod_dir: Path, volume: dict[str, Any]) -> Path:
        folder = pod_dir / "volumes" / volume["name"]
        folder.mkdir(parents=True)
        if "configMap" in volume:
            config = find(self.objects, "ConfigMap", volume["configMap"]["name"])
            for key, text in config["data"].items():
                (folder / key).write_text(text)
        elif "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] == "nxserve-model", volume
            shutil.copytree(self.model, folder / "model")  # the PVC holds the checkpoint at model/
        else:
            assert "emptyDir" in volume, f"no local stand-in for volume {volume}"
        return folder

    def _translate(self, text: str, pod: Pod, mounts: list[tuple[str, Path]]) -> str:
        """A container's view of paths and addresses, as this machine's."""
        if mounts:  # one pass, longest mount path first, so a replacement is never translated again
            folders = dict(mounts)
            pattern = "|".join(re.escape(m) for m, _ in mounts)
            text = re.sub(rf"(?<![\w/])({pattern})(?=/|$|\s)", lambda m: str(folders[m.group(1)]), text)
        text = re.sub(r"\b(0\.0\.0\.0|127\.0\.0\.1)\b", pod.ip, text)
        return text.replace("dns:///", f"dns://127.0.0.1:{self.dns.port}/")  # the cluster's DNS: the test's server

    def start(self) -> None:
        command = entrypoint()
        deployments = [o for o in self.objects if o["kind"] == "Deployment"]
        index = 10
        for deployment in deployments:
            template = deployment["spec"]["template"]
            for replica in range(deployment["spec"]["replicas"]):
                name = f"{deployment['metadata']['name']}-{replica}"
                pod_dir = self.root / name
                pod = Pod(name=name, ip=f"127.0.0.{index}", labels=template["metadata"]["labels"], folders={})
                index += 1
                pod.folders = {v["name"]: self._volume(pod_dir, v) for v in template["spec"]["volumes"]}
                translated: set[Path] = set()
                self.pods.append(pod)
                threads = sum(
                    d["spec"]["replicas"] * int(c["resources"]["limits"]["cpu"])
                    for d in deployments
                    for c in d["spec"]["template"]["spec"]["containers"]
                )
                for spec in template["spec"]["containers"]:
                    container = Container(pod=pod, spec=spec)
                    pod.containers.append(container)
                    mounts = sorted(((m["mountPath"], pod.folders[m["name"]]) for m in spec["volumeMounts"]), key=lambda m: -len(m[0]))
                    for _, folder in mounts:  # flag files a container reads get the same translation, once per pod
                        for f in sorted(set(folder.glob("*.args")) - translated):
                            f.write_text(self._translate(f.read_text(), pod, mounts))
                            translated.add(f)
                    argv = [*command, *(self._translate(a, pod, mounts) for a in spec.get("args", []))]
                    env = self._env(spec, pod, deployment)
                    share_cores(env, threads=threads)
                    log = (pod_dir / f"{spec['name']}.log").open("w")
                    container.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=pod_dir)
        self._endpoints.start()

    def _env(self, spec: dict[str, Any], pod: Pod, deployment: dict[str, Any]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        fields = {"metadata.name": pod.name, "metadata.namespace": deployment["metadata"]["namespace"]}
        for var in spec.get("env", []):
            if "value" in var:  # $(NAME) refers to a variable defined before it, as Kubernetes expands it
                env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
            else:
                env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
        return env

    def _publish_endpoints(self) -> None:
        """A headless Service's name resolves to its ready pods (short name and FQDN)."""
        while not self._stop.wait(0.3):
            for service in (o for o in self.objects if o["kind"] == "Service" and o["spec"].get("clusterIP") == "None"):
                selector = service["spec"]["selector"]
                ready = [p.ip for p in self.pods if selector.items() <= p.labels.items() and p.ready()]
                name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
                for host in (name, f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"):
                    self.dns.names[host] = ready

    def service_address(self, name: str) -> str:
        """HOST:PORT of the Service's first port on a ready pod behind it (its named targetPort)."""
        service = find(self.objects, "Service", name)
        port = service["spec"]["ports"][0]
        for pod in self.pods:
            if service["spec"]["selector"].items() <= pod.labels.items() and pod.ready():
                for c in pod.containers:
                    for p in c.spec.get("ports", []):
                        if p["name"] == port["targetPort"] or p["containerPort"] == port["targetPort"]:
                            return f"{pod.ip}:{p['containerPort']}"
        raise AssertionError(f"no ready pod behind Service {name}")

    def exited(self) -> list[str]:
        return [c.name for p in self.pods for c in p.containers if c.process and c.process.poll() is not None]

    def stop(self) -> None:
        self._stop.set()
        processes = [c.process for p in self.pods for c in p.containers if c.process]
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.dns.close()


@pytest.fixture
def node_for(svc_model: Path, tmp_path: Path) -> Iterator:
    nodes: list[LocalNode] = []

    def make(overlay: str) -> LocalNode:
        node = LocalNode(rendered(overlay), model=svc_model, root=tmp_path / overlay)
        nodes.append(node)
        node.start()
        return node

    yield make
    for node in nodes:
        node.stop()


def _load(target: str) -> decode_pb2.GetLoadResponse:
    with grpc.insecure_channel(target) as channel:
        return decode_pb2_grpc.DecodeStub(channel).GetLoad(decode_pb2.GetLoadRequest(), timeout=5)


def _logs(node: LocalNode) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in node.root.rglob("*.log"))


@pytest.mark.parametrize("overlay", ["cpu", "colocated"])
def test_rendered_pods_serve_a_request(node_for, overlay: str) -> None:
    node: LocalNode = node_for(overlay)
    containers = [c for p in node.pods for c in p.containers]
    try:
        wait_until(
            lambda: not node.exited() and all(c.probe("startupProbe") for c in containers), timeout=180, what="every container's startup probe"
        )
    except AssertionError:
        raise AssertionError(f"exited: {node.exited()}\n{_logs(node)}") from None
    assert all(c.probe("readinessProbe") and c.probe("livenessProbe") for c in containers)
    target = node.service_address("nxserve-prefill")
    with Client(target) as client:
        decodes = sum(c.spec["args"][0] == "decode" for c in containers)
        routable = 1 if overlay == "colocated" else decodes  # colocated: each prefill routes to its pod's decode
        wait_until(lambda: client.model_info()["decode_replicas_up"] == routable, timeout=30, what=f"prefill routing to {routable} replica(s)")
        info = client.model_info()
        assert info["model"] == "model"  # --served-model-name from the ConfigMap
        chunks = list(client.generate("Hello from Kubernetes", max_new_tokens=8, ignore_eos=True))
        assert sum(len(c.token_ids) for c in chunks) == 8 and chunks[-1].finish_reason == "length"
    for pod in node.pods:
        for c in pod.containers:
            for port in c.spec["ports"]:
                if "metrics" in port["name"]:
                    with urllib.request.urlopen(f"http://{pod.ip}:{port['containerPort']}/metrics", timeout=5) as response:
                        assert b"nxserve_" in response.read()
    if overlay == "colocated":  # the KV went through the pod's shared-memory emptyDir, not as chunks
        loads = [_load(f"{p.ip}:50061") for p in node.pods]
        assert sum(x.shared_kv_requests for x in loads) == 1 and sum(x.chunked_kv_requests for x in loads) == 0
    assert node.exited() == []
