"""Helpers of the tests that start real services: waiting on a condition (never a fixed sleep),
decode replicas' load reports, the shared module-scoped cluster of `tests/*_svc/test_server.py`."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from nxcore import Engine, RuntimeConfig
from nxserve.client import Client
from nxserve.cluster import LocalCluster
from nxserve.rpc.errors import ServiceError
from nxserve.rpc.status import error_from_rpc
from nxserve.testing.model_factory import make_model
from nxserve.v1 import decode_pb2, decode_pb2_grpc

T = TypeVar("T")

SEQ_LEN = 256
SLOTS = 4
ENGINE_ARGS = ["--seq-len", str(SEQ_LEN), "--batch-size", str(SLOTS), "--threads", "1", "--dtype", "float32"]


def wait_until(condition: Callable[[], T], *, timeout: float = 10.0, what: str = "the condition") -> T:
    """Poll `condition` until it returns something true (returned) or `timeout` passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not hold within {timeout:.0f}s"
        time.sleep(0.02)


def error_kind(err: grpc.RpcError) -> type[ServiceError]:
    """The nxserve error kind a failed call's status stands for (`nxserve.rpc.status`)."""
    return type(error_from_rpc(err.code(), err.details(), err.trailing_metadata(), peer="test"))


def loads(targets: list[str]) -> list[decode_pb2.GetLoadResponse]:
    out = []
    for target in targets:
        with grpc.insecure_channel(target) as ch:
            out.append(decode_pb2_grpc.DecodeStub(ch).GetLoad(decode_pb2.GetLoadRequest(), timeout=5))
    return out


def wait_all_free(cluster: LocalCluster, timeout: float = 10.0) -> list[decode_pb2.GetLoadResponse]:
    """Every replica's load report once all its slots are free and nothing waits (or after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        state = loads(cluster.decode_targets)
        if all(s.free_slots == s.total_slots and s.queued_requests == 0 for s in state) or time.monotonic() > deadline:
            return state
        time.sleep(0.02)


def prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(n)
    return [torch.randint(4, 512, (int(length),), generator=gen).tolist() for length in torch.randint(3, 60, (n,), generator=gen)]


def scrape(port: int) -> dict[str, list[Any]]:
    """The samples of a /metrics page, by family name, parsed with prometheus_client's parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def sample(families: dict[str, list[Any]], family: str, sample: str, **labels: str) -> float:
    """The sum of `sample`'s values whose labels include `labels`."""
    return sum(s.value for s in families.get(family, []) if s.name == sample and labels.items() <= s.labels.items())


# ---------------------------------------------------------------- fixtures (imported by tests/conftest.py)


@pytest.fixture(scope="module")
def svc_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(arch="llama", preset="tiny", out=tmp_path_factory.mktemp("svc") / "tiny-llama", seed=3)


@pytest.fixture(scope="module")
def shm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared-memory directory of the module's cluster (any directory works; /dev/shm is RAM)."""
    return tmp_path_factory.mktemp("shm")


@pytest.fixture(scope="module")
def cluster(svc_model: Path, shm_dir: Path) -> Iterator[LocalCluster]:
    """1 prefill and 2 decode replicas sharing `shm_dir`, float32, 4 slots of 256 tokens each."""
    with LocalCluster(
        svc_model,
        decode_replicas=2,
        engine_args=[*ENGINE_ARGS, "--max-queue", "64", "--kv-shm-dir", str(shm_dir)],
        prefill_args=["--kv-shm-bytes", "4M"],
    ) as c:
        yield c
        assert c.exited() == []  # nothing crashed during the tests
    assert list(shm_dir.iterdir()) == []  # arena and probes removed on shutdown


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster.target) as c:
        yield c


@pytest.fixture(scope="module")
def svc_engine(svc_model: Path) -> Engine:
    """The same model in-process, as the cluster's services build it."""
    return Engine.from_pretrained(svc_model, RuntimeConfig(batch_size=SLOTS, seq_len=SEQ_LEN, dtype="float32"))
