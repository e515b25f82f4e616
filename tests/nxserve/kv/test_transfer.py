"""KV leases: a shared region lent to a replica that never acknowledges it is the sender's again
after the lease, and a receiver refuses a region whose lease has (nearly) run out."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
import torch

from nxcore.kv_cache import KVSnapshot
from nxserve.kv import SHM, DecodeRequests, DecodeStub, KVReceiver, KVSender, Layout, OutboundKV, add_decode_servicer
from nxserve.kv.shm import KVArena
from nxserve.kv.transfer import LEASE_MARGIN_MS, now_ms
from nxserve.rpc.errors import LeaseExpired, Overloaded
from nxserve.v1 import decode_pb2, decode_pb2_grpc


def _kv() -> tuple[OutboundKV, Layout]:
    kv = KVSnapshot(keys=torch.randn(2, 2, 3, 4), values=torch.randn(2, 2, 3, 4))
    layout = Layout.of(kv, "float32")
    return OutboundKV(layouts=(layout,), snapshots=[kv]), layout


class Silent(decode_pb2_grpc.DecodeServicer):
    """A replica that reads the header and never acknowledges it."""

    def __init__(self) -> None:
        self.headers: list[decode_pb2.DecodeHeader] = []

    async def Decode(self, request_iterator, context):
        requests = DecodeRequests(request_iterator)
        self.headers.append(await requests.header())
        await asyncio.sleep(30)
        yield decode_pb2.DecodeResponse()

    async def GetLoad(self, request, context):
        return decode_pb2.GetLoadResponse()


def test_a_region_never_acknowledged_is_the_senders_again_after_the_lease(tmp_path: Path) -> None:
    arena = KVArena(tmp_path, 1 << 16)
    kv, _ = _kv()
    sender = KVSender(arena=arena, chunk_bytes=1 << 20, lease_s=0.4)
    servicer = Silent()

    async def scenario() -> None:
        server = grpc.aio.server()
        add_decode_servicer(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = DecodeStub(channel).Decode()
                start = time.monotonic()
                with pytest.raises(Overloaded, match="no ack within the KV lease"):
                    await sender.send(call, decode_pb2.DecodeHeader(request_id="r"), kv, shared_memory=True, peer="silent replica")
                assert 0.35 < time.monotonic() - start < 5
                assert call.cancelled() or call.done()
        finally:
            await server.stop(0)

    asyncio.run(scenario())
    [header] = servicer.headers
    lease = header.shared_kv.lease_expires_unix_ms
    assert header.HasField("shared_kv") and lease <= now_ms()  # the lease the replica was given is over
    assert kv.region is not None and arena.regions_held == 1  # still the request's, to send elsewhere or release
    kv.release()
    assert arena.regions_held == 0
    arena.close()


def test_a_receiver_refuses_a_region_whose_lease_ends_within_the_margin(tmp_path: Path) -> None:
    arena = KVArena(tmp_path, 1 << 16)
    kv, layout = _kv()
    region = arena.put(kv.snapshots).sealed  # type: ignore[arg-type]
    receiver = KVReceiver(tmp_path)

    def header(expires_ms: int) -> decode_pb2.DecodeHeader:
        return decode_pb2.DecodeHeader(
            layout=layout.to_pb(),
            shared_kv=decode_pb2.SharedKv(
                name=region.name, offset=region.offset, nbytes=region.nbytes, crc32=region.crc32, lease_expires_unix_ms=expires_ms
            ),
        )

    async def receive(expires_ms: int):
        return await receiver.receive(header(expires_ms), DecodeRequests(_empty()))

    with pytest.raises(LeaseExpired):
        asyncio.run(receive(now_ms() + LEASE_MARGIN_MS // 2))
    received = asyncio.run(receive(now_ms() + LEASE_MARGIN_MS + 300))
    assert received.transport == SHM
    time.sleep(0.35)  # queued for a slot past the lease: the import refuses it, before reading a byte
    with pytest.raises(LeaseExpired):
        received.import_into(0, engine=None)  # type: ignore[arg-type]
    assert asyncio.run(receive(0)).lease_expires_ms == 0  # no lease (an older sender): taken as before
    arena.close()


async def _empty():
    return
    yield
