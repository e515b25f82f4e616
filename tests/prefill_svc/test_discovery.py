"""Decode replicas found through DNS (`--decode dns://...`): a DNS server inside the test (dnspython
messages over UDP) answers a name with replicas on 127.0.0.2, 127.0.0.3, ... all on one port, as a
headless Service answers with its ready pods; prefill routes to replicas as they appear and stops
routing to those that leave, whose streams still finish."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nxserve.client import Client
from nxserve.cluster import _free_ports
from nxserve.rpc.discovery import DiscoveryError, DnsName, parse_decode, resolve
from nxserve.v1 import decode_pb2, decode_pb2_grpc
from tests.dns import DnsServer
from tests.services import wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer()
    yield server
    server.close()


def test_parse_decode_entries() -> None:
    targets, names = parse_decode("10.0.0.5:50061,dns:///decode.ns.svc.cluster.local:50061,dns://10.96.0.10/d:7,dns://[::1]:5353/e:8,[::1]:9")
    assert targets == ["10.0.0.5:50061", "[::1]:9"]
    assert names == [
        DnsName("decode.ns.svc.cluster.local", 50061),
        DnsName("d", 7, ("10.96.0.10", 53)),
        DnsName("e", 8, ("::1", 5353)),
    ]
    assert str(names[1]) == "dns://10.96.0.10:53/d:7"
    for bad, says in [
        ("dns:decode:1", "dns:///NAME:PORT"),
        ("dns:///decode", "HOST:PORT"),
        ("decode", "HOST:PORT"),
        ("dns://dns.example/decode:1", "must be an IP address"),
        ("decode:70000", "allowed 1..65535"),
        (",", "no decode replicas"),
    ]:
        with pytest.raises(ValueError, match=says):
            parse_decode(bad)


def test_resolve_at_a_server_and_through_the_system(dns_server: DnsServer) -> None:
    dns_server.names["decode.test"] = ["127.0.0.2", "127.0.0.3"]
    at = DnsName("decode.test", 50061, ("127.0.0.1", dns_server.port))
    assert asyncio.run(resolve(at)) == {"127.0.0.2:50061", "127.0.0.3:50061"}
    dns_server.names["decode.test"] = []  # a headless Service with no ready pod
    assert asyncio.run(resolve(at)) == set()
    assert asyncio.run(resolve(DnsName("gone.test", 1, ("127.0.0.1", dns_server.port)))) == set()  # NXDOMAIN
    assert "127.0.0.1:7" in asyncio.run(resolve(DnsName("localhost", 7)))  # the system resolver (/etc/hosts)
    assert asyncio.run(resolve(DnsName("no-such-name.invalid", 7))) == set()
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a server that never answers
    silent.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(DiscoveryError, match="cannot resolve"):
            asyncio.run(resolve(DnsName("decode.test", 1, ("127.0.0.1", silent.getsockname()[1])), timeout_s=0.3))
    finally:
        silent.close()


def _spawn(module: str, args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", module, *args], stdout=out, stderr=subprocess.STDOUT, env=env)


def _serving(target: str, service: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status
        except grpc.RpcError:
            return False
    return status == health_pb2.HealthCheckResponse.SERVING


def _load(target: str) -> decode_pb2.GetLoadResponse:
    with grpc.insecure_channel(target) as channel:
        return decode_pb2_grpc.DecodeStub(channel).GetLoad(decode_pb2.GetLoadRequest(), timeout=5)


def _completed(target: str) -> int:
    return _load(target).completed_requests


@pytest.mark.slow
def test_routing_follows_replicas_behind_one_name(svc_model: Path, dns_server: DnsServer, tmp_path: Path) -> None:
    port, prefill_port = _free_ports(2)
    engine = ["--model", str(svc_model), "--seq-len", "256", "--batch-size", "2", "--threads", "1", "--dtype", "float32"]
    hosts = ["127.0.0.2", "127.0.0.3"]
    replicas = {h: _spawn("decode_svc", [*engine, "--host", h, "--port", str(port)], tmp_path / f"decode-{h}.log") for h in hosts}
    dns_server.names["decode.test"] = ["127.0.0.2"]
    prefill = _spawn(
        "prefill_svc",
        [*engine, "--port", str(prefill_port), "--decode", f"dns://127.0.0.1:{dns_server.port}/decode.test:{port}", "--decode-resolve-s", "0.3"],
        tmp_path / "prefill.log",
    )
    procs = [prefill, *replicas.values()]
    target = f"127.0.0.1:{prefill_port}"
    try:
        wait_until(lambda: all(_serving(f"{h}:{port}", "nxserve.v1.Decode") for h in hosts), timeout=120, what="both replicas serving")
        wait_until(lambda: _serving(target, "nxserve.v1.Generation"), timeout=120, what="prefill serving")
        with Client(target) as client:
            info = wait_until(
                lambda: (i := client.model_info())["decode_replicas_up"] == 1 and i, what="prefill routing to the one replica DNS names"
            )
            assert info["decode_replicas"] == 1
            for _ in range(3):
                assert len(client.generate_text([5, 6, 7], max_new_tokens=4, ignore_eos=True).output_ids) == 4
            assert (_completed(f"127.0.0.2:{port}"), _completed(f"127.0.0.3:{port}")) == (3, 0)

            dns_server.names["decode.test"] = hosts  # scaled up
            wait_until(lambda: client.model_info()["decode_replicas_up"] == 2, what="prefill routing to the new replica")
            for _ in range(4):
                client.generate_text([5, 6, 7], max_new_tokens=4, ignore_eos=True)
            assert _completed(f"127.0.0.3:{port}") > 0

            # 127.0.0.2 leaves DNS (its pod is being deleted) while a long stream runs on it: the stream
            # finishes there, and no new request goes to it.
            before = _completed(f"127.0.0.2:{port}")
            long_streams = [client.generate([9, 10, 11], max_new_tokens=200, ignore_eos=True) for _ in range(2)]
            firsts = [next(s) for s in long_streams]
            assert all(f.token_ids for f in firsts)
            load = wait_until(lambda: (x := _load(f"127.0.0.2:{port}")).free_slots < x.total_slots and x, what="a long stream on 127.0.0.2")
            on_leaving = load.total_slots - load.free_slots  # least-loaded routing put one there, or both
            dns_server.names["decode.test"] = ["127.0.0.3"]
            wait_until(lambda: client.model_info()["decode_replicas"] == 1, what="prefill dropping the replica that left DNS")
            results = [sum(len(c.token_ids) for c in s) + len(f.token_ids) for s, f in zip(long_streams, firsts, strict=True)]
            assert results == [200, 200]
            assert _completed(f"127.0.0.2:{port}") == before + on_leaving  # its streams finished on the draining channel
            for _ in range(3):
                client.generate_text([5, 6, 7], max_new_tokens=4, ignore_eos=True)
            assert _completed(f"127.0.0.2:{port}") == before + on_leaving  # nothing new went there

            dns_server.names.pop("decode.test")  # NXDOMAIN: no replica at all
            wait_until(lambda: client.model_info()["decode_replicas"] == 0, what="prefill dropping every replica")
            with pytest.raises(grpc.RpcError) as err:
                client.generate_text([5, 6, 7], max_new_tokens=4)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "decode.test" in err.value.details()
            dns_server.names["decode.test"] = ["127.0.0.3"]  # back
            wait_until(lambda: client.model_info()["decode_replicas_up"] == 1, what="prefill finding the replica again")
            assert len(client.generate_text([5, 6, 7], max_new_tokens=4, ignore_eos=True).output_ids) == 4
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
