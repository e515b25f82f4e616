"""The Decode service over real gRPC (a cluster of real processes): what it refuses and with which
status, and that a refused stream leaves every slot free."""

from __future__ import annotations

import asyncio
import threading
import zlib
from pathlib import Path

import grpc
import pytest
import torch

from nxcore import Engine
from nxcore.kv_cache import KVSnapshot
from nxserve.cluster import LocalCluster
from nxserve.kv import DecodeStub
from nxserve.kv.shm import KVArena
from nxserve.rpc.errors import InvalidRequest, KVCorrupted, ModelMismatch, SharedMemoryUnreadable
from nxserve.v1 import decode_pb2, decode_pb2_grpc
from nxserve.v1 import generation_pb2 as pb
from tests.services import SLOTS, error_kind, wait_all_free

pytestmark = pytest.mark.slow

KV_BYTES = 2 * 2 * 2 * 3 * 16 * 4  # K and V, 2 layers x 2 KV heads x 3 tokens x head_dim 16, float32
OTHER_MODEL = decode_pb2.ModelFingerprint(digest="0123456789abcdef", architecture="qwen3", dtype="float32")


def _header(engine: Engine, **changes) -> decode_pb2.DecodeRequest:
    fp = decode_pb2.ModelFingerprint(digest=engine.fingerprint, architecture="llama", dtype="float32")
    layout = decode_pb2.KvLayout(num_layers=2, num_kv_heads=2, head_dim=16, n_tokens=3, dtype="float32")
    header = decode_pb2.DecodeHeader(
        request_id="t", prompt_token_ids=[5, 6, 7], first_token=9, fingerprint=fp, layout=layout, stopping=pb.StoppingParameters(max_new_tokens=4)
    )
    for key, value in changes.items():
        getattr(header, key).CopyFrom(value)
    return decode_pb2.DecodeRequest(header=header)


def _chunk(data: bytes, crc32: int) -> decode_pb2.DecodeRequest:
    return decode_pb2.DecodeRequest(chunk=decode_pb2.KvChunk(layer_start=0, layer_end=2, token_start=0, token_end=3, data=data, crc32=crc32))


COMMIT = decode_pb2.DecodeRequest(commit=decode_pb2.Commit())


def test_decode_refuses_other_model_and_corrupted_chunks(cluster: LocalCluster, svc_engine: Engine) -> None:
    with grpc.insecure_channel(cluster.decode_targets[0]) as ch:
        stub = decode_pb2_grpc.DecodeStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Decode(iter([_header(svc_engine, fingerprint=OTHER_MODEL)]), timeout=10))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and error_kind(err.value) is ModelMismatch
        assert "qwen3/float32/0123456789abcdef" in err.value.details() and svc_engine.fingerprint in err.value.details()

        data = bytes(KV_BYTES)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Decode(iter([_header(svc_engine), _chunk(data, zlib.crc32(data) ^ 1), COMMIT]), timeout=10))
        assert err.value.code() == grpc.StatusCode.DATA_LOSS and "CRC-32" in err.value.details()

        kinds = [m.WhichOneof("kind") for m in stub.Decode(iter([_header(svc_engine), _chunk(data, zlib.crc32(data)), COMMIT]), timeout=10)]
        assert kinds[0] == "ack" and kinds[-1] == "final"

        with pytest.raises(grpc.RpcError) as err:  # a stream must start with its header
            list(stub.Decode(iter([COMMIT]), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "must start with a header" in err.value.details()
    assert all(s.free_slots == SLOTS for s in wait_all_free(cluster))


def _header_only(stub: decode_pb2_grpc.DecodeStub, header: decode_pb2.DecodeRequest) -> grpc.RpcError:
    """Send `header` and keep the request side open, as a shared-memory sender does while it waits
    for the ack; the error the replica answers with."""
    answered = threading.Event()

    def requests():
        yield header
        answered.wait(10)

    try:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Decode(requests(), timeout=10))
    finally:
        answered.set()
    return err.value


def test_decode_refuses_shared_regions_it_cannot_or_must_not_read(cluster: LocalCluster, svc_engine: Engine, shm_dir: Path) -> None:
    """A header naming a shared region is the whole request: the replica answers it without waiting
    for more messages (and ignores a commit an older sender still writes)."""
    region = decode_pb2.SharedKv(name="nxserve-kv-" + "0" * 32, offset=0, nbytes=KV_BYTES, crc32=0)
    with grpc.insecure_channel(cluster.decode_targets[0]) as ch:
        stub = decode_pb2_grpc.DecodeStub(ch)
        err = _header_only(stub, _header(svc_engine, shared_kv=region))  # no such arena: send chunks
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "send chunks" in err.details()
        assert error_kind(err) is SharedMemoryUnreadable
        with pytest.raises(grpc.RpcError) as old_sender:
            list(stub.Decode(iter([_header(svc_engine, shared_kv=region), COMMIT]), timeout=10))
        assert old_sender.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        outside = decode_pb2.SharedKv(name="../../etc/passwd", offset=0, nbytes=region.nbytes)
        err = _header_only(stub, _header(svc_engine, shared_kv=outside))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "nxserve-kv-<32 hex digits>" in err.details()
        assert error_kind(err) is InvalidRequest

        arena = KVArena(shm_dir, 1 << 16)  # a real region whose bytes no longer match the CRC-32 the header gives
        try:
            kv = KVSnapshot(keys=torch.randn(2, 2, 3, 16), values=torch.randn(2, 2, 3, 16))
            good = arena.put([kv]).sealed
            corrupted = decode_pb2.SharedKv(name=good.name, offset=good.offset, nbytes=good.nbytes, crc32=good.crc32 ^ 1)
            err = _header_only(stub, _header(svc_engine, shared_kv=corrupted))
            assert err.code() == grpc.StatusCode.DATA_LOSS and "CRC-32" in err.details() and error_kind(err) is KVCorrupted
        finally:
            arena.close()
    assert all(s.free_slots == SLOTS for s in wait_all_free(cluster))


def test_a_rejected_stream_reports_the_replicas_status_to_a_sender_still_writing(cluster: LocalCluster, svc_engine: Engine) -> None:
    """The replica rejects at the header but reads the stream to its commit before aborting: aborting
    while the sender still writes turns the status into INTERNAL on a grpc aio sender (grpc/grpc#36066)."""
    data = bytes(KV_BYTES)
    chunk = _chunk(data, zlib.crc32(data))

    async def send() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(cluster.decode_targets[0]) as channel:
            call = DecodeStub(channel).Decode(timeout=10)
            await call.write(_header(svc_engine, fingerprint=OTHER_MODEL))
            for _ in range(300):  # written as prefill writes its chunks, while the replica has already decided
                await call.write(chunk)
            await call.write(COMMIT)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            return err.value

    for _ in range(3):
        err = asyncio.run(send())
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "qwen3/float32/0123456789abcdef" in err.details()
    assert all(s.free_slots == SLOTS for s in wait_all_free(cluster))


def test_reflection_lists_services(cluster: LocalCluster) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    for target, name in [(cluster.target, "nxserve.v1.Generation"), (cluster.decode_targets[0], "nxserve.v1.Decode")]:
        with grpc.insecure_channel(target) as ch:
            services = ProtoReflectionDescriptorDatabase(ch).get_services()
        assert name in services and "grpc.health.v1.Health" in services
