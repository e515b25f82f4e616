"""TLS credentials that follow their files, API keys that follow theirs, and the per-key cap on calls
in flight, on real grpc aio servers on loopback with certificates made in the test."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nxserve.pki import CA
from nxserve.rpc.errors import Unauthenticated
from nxserve.rpc.security import ApiKeys, ChannelTLS, ClientGate, TLSFiles
from nxserve.rpc.status import ErrorInterceptor
from nxserve.v1 import generation_pb2 as pb
from nxserve.v1 import generation_pb2_grpc


def _peer_name(port: int, ca: Path) -> str:
    """The common name of the certificate a new TLS connection to the port is served."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw, server_hostname="localhost") as tls:
        subject = dict(x[0] for x in tls.getpeercert()["subject"])
    return subject["commonName"]


async def _health(port: int, tls: ChannelTLS | None) -> str:
    channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", tls.credentials()) if tls else grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    async with channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return "OK"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name


async def _serve(files: TLSFiles) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", files.credentials())
    await server.start()
    return server, port


def test_tls_and_mtls_refuse_what_they_must_and_rotated_certificates_apply_to_new_connections(tmp_path: Path) -> None:
    ca, other_ca = CA.create(tmp_path / "ca"), CA.create(tmp_path / "other", name="another CA")
    server = ca.issue(tmp_path / "s", "first-server")
    client, stranger = ca.issue(tmp_path / "c", "client", client=True), other_ca.issue(tmp_path / "x", "stranger", client=True)
    expired_client = ca.issue(tmp_path / "e", "expired-client", client=True, expired=True)
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(server.cert, live / "cert.pem")
    shutil.copy(server.key, live / "key.pem")
    files = TLSFiles(cert=live / "cert.pem", key=live / "key.pem", client_ca=ca.cert)

    async def scenario() -> None:
        srv, port = await _serve(files)
        try:
            assert await _health(port, ChannelTLS(ca=ca.cert, cert=client.cert, key=client.key)) == "OK"
            assert await _health(port, ChannelTLS(ca=ca.cert)) == "UNAVAILABLE"  # no client certificate
            assert await _health(port, ChannelTLS(ca=ca.cert, cert=stranger.cert, key=stranger.key)) == "UNAVAILABLE"
            assert await _health(port, ChannelTLS(ca=ca.cert, cert=expired_client.cert, key=expired_client.key)) == "UNAVAILABLE"
            assert await _health(port, ChannelTLS(ca=other_ca.cert, cert=client.cert, key=client.key)) == "UNAVAILABLE"  # untrusted server
            assert await _health(port, None) == "UNAVAILABLE"  # plaintext to a TLS port
            rotated = ca.issue(tmp_path / "r", "second-server")
            shutil.copy(rotated.key, live / "key.new")
            shutil.copy(rotated.cert, live / "cert.new")
            (live / "key.new").replace(live / "key.pem")
            (live / "cert.new").replace(live / "cert.pem")
            assert await _health(port, ChannelTLS(ca=ca.cert, cert=client.cert, key=client.key)) == "OK"
        finally:
            await srv.stop(0)

    asyncio.run(scenario())

    async def public() -> None:  # a server without client authentication: what name does a new connection see
        plain = TLSFiles(cert=live / "cert.pem", key=live / "key.pem")
        srv, port = await _serve(plain)
        try:
            assert await asyncio.to_thread(_peer_name, port, ca.cert) == "second-server"
            expired = ca.issue(tmp_path / "ex", "expired-server", expired=True)
            shutil.copy(expired.key, live / "key.pem")
            shutil.copy(expired.cert, live / "cert.pem")
            assert await _health(port, ChannelTLS(ca=ca.cert)) == "UNAVAILABLE"  # an expired server certificate is refused
        finally:
            await srv.stop(0)

    asyncio.run(public())


def test_api_keys_are_read_again_when_their_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# one key per line\nfirst-key\n\nsecond-key\n")
    now = [0.0]
    keys = ApiKeys(path, recheck_s=1.0, clock=lambda: now[0])
    assert keys.check([("authorization", "Bearer first-key")]) == "first-key"
    assert keys.check([("authorization", "bearer second-key")]) == "second-key"
    for metadata, match in [
        ([], "needs an API key"),
        ([("authorization", "Basic abc")], "Bearer KEY"),
        ([("authorization", "Bearer nope")], "unknown API key"),
    ]:
        with pytest.raises(Unauthenticated, match=match):
            keys.check(metadata)
    path.write_text("third-key\n")  # a rotated Secret
    assert keys.check([("authorization", "Bearer first-key")]) == "first-key"  # not read again within a second
    now[0] = 1.5
    assert keys.check([("authorization", "Bearer third-key")]) == "third-key"
    with pytest.raises(Unauthenticated, match="unknown API key"):
        keys.check([("authorization", "Bearer first-key")])
    path.write_text("")
    now[0] = 3.0
    assert keys.check([("authorization", "Bearer third-key")]) == "third-key"  # an empty file keeps the old keys
    with pytest.raises(ValueError, match="has no keys"):
        ApiKeys(path)


class Slow(generation_pb2_grpc.GenerationServicer):
    """A Generate that streams until released; ModelInfo answers at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def Generate(self, request, context):
        yield pb.GenerateResponse(request_id="started")
        await self.release.wait()

    async def ModelInfo(self, request, context):
        return pb.ModelInfoResponse(model="m")


def test_the_gate_checks_keys_and_caps_each_keys_calls_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("alpha\nbeta\n")
    gate = ClientGate(services=["nxserve.v1.Generation"], keys=ApiKeys(path), max_inflight=1)

    async def scenario() -> None:
        servicer = Slow()
        server = grpc.aio.server(interceptors=[ErrorInterceptor(), gate])
        generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = generation_pb2_grpc.GenerationStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ModelInfo(pb.ModelInfoRequest(), timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)  # health stays open
                alpha, beta = (("authorization", "Bearer alpha"),), (("authorization", "Bearer beta"),)
                running = stub.Generate(pb.GenerateRequest(), metadata=alpha, timeout=10)
                assert (await running.read()).request_id == "started"
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ModelInfo(pb.ModelInfoRequest(), metadata=alpha, timeout=5)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-inflight-per-key=1" in err.value.details()
                assert dict(err.value.trailing_metadata())["grpc-retry-pushback-ms"] == "250"
                assert (await stub.ModelInfo(pb.ModelInfoRequest(), metadata=beta, timeout=5)).model == "m"  # another key's share
                servicer.release.set()
                assert await running.read() is grpc.aio.EOF
                assert await running.code() == grpc.StatusCode.OK
                await asyncio.sleep(0)  # the handler's `finally` runs once the stream is over
                assert gate.inflight == {}  # the stream's end gave its share back
                assert (await stub.ModelInfo(pb.ModelInfoRequest(), metadata=alpha, timeout=5)).model == "m"
        finally:
            await server.stop(0)

    asyncio.run(scenario())
