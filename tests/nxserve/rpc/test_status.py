"""The one mapping from nxserve's errors to gRPC status codes, through a real grpc aio server on
loopback: every kind keeps its code and comes back as the same kind, anything else is INTERNAL
with an error id the log repeats, and no call ends with UNKNOWN."""

from __future__ import annotations

import asyncio
import logging
import re

import grpc
import pytest

from nxcore.errors import EngineError, TPRankError
from nxserve.rpc import errors
from nxserve.rpc.status import STATUS_CODES, ErrorInterceptor, error_from_rpc, status_of
from nxserve.v1 import generation_pb2 as pb
from nxserve.v1 import generation_pb2_grpc

EXPECTED = {
    errors.InvalidRequest: "INVALID_ARGUMENT",
    errors.Unauthenticated: "UNAUTHENTICATED",
    errors.Overloaded: "RESOURCE_EXHAUSTED",
    errors.NotReady: "UNAVAILABLE",
    errors.NoReplica: "UNAVAILABLE",
    errors.ReplicaFailed: "UNAVAILABLE",
    errors.EngineFailure: "UNAVAILABLE",
    errors.ModelMismatch: "FAILED_PRECONDITION",
    errors.Unsupported: "FAILED_PRECONDITION",
    errors.SharedMemoryUnreadable: "FAILED_PRECONDITION",
    errors.KVCorrupted: "DATA_LOSS",
    errors.LeaseExpired: "ABORTED",
    errors.DeadlineExceeded: "DEADLINE_EXCEEDED",
    errors.Cancelled: "CANCELLED",
    errors.Internal: "INTERNAL",
}


def test_every_kind_of_the_taxonomy_has_one_code() -> None:
    kinds = {k for k in vars(errors).values() if isinstance(k, type) and issubclass(k, errors.ServiceError) and k is not errors.ServiceError}
    assert set(STATUS_CODES) == kinds == set(EXPECTED)
    assert {k: c.name for k, c in STATUS_CODES.items()} == EXPECTED


class Raising(generation_pb2_grpc.GenerationServicer):
    """Raises `self.error` from a unary call, and from a stream after one message."""

    error: BaseException = ValueError()

    async def ModelInfo(self, request, context):
        raise self.error

    async def Generate(self, request, context):
        yield pb.GenerateResponse(request_id="before the error")
        raise self.error

    async def Tokenize(self, request, context):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "aborted by the handler itself")


async def _calls(servicer: Raising, cases: list[BaseException]) -> list[tuple[grpc.aio.AioRpcError, grpc.aio.AioRpcError, int]]:
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    out = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            for error in cases:
                servicer.error = error
                with pytest.raises(grpc.aio.AioRpcError) as unary:
                    await stub.ModelInfo(pb.ModelInfoRequest(), timeout=5)
                received = 0
                with pytest.raises(grpc.aio.AioRpcError) as stream:
                    async for _ in stub.Generate(pb.GenerateRequest(), timeout=5):
                        received += 1
                out.append((unary.value, stream.value, received))
            with pytest.raises(grpc.aio.AioRpcError) as aborted:
                await stub.Tokenize(pb.TokenizeRequest(), timeout=5)
            assert aborted.value.code() == grpc.StatusCode.PERMISSION_DENIED  # the handler's own abort passes unchanged
    finally:
        await server.stop(0)
    return out


def test_each_kind_reaches_the_caller_with_its_code_and_comes_back_as_itself() -> None:
    cases = [kind(f"{kind.__name__} happened") for kind in EXPECTED]
    for error, (unary, stream, received) in zip(cases, asyncio.run(_calls(Raising(), cases))):
        for call in (unary, stream):
            assert call.code().name == EXPECTED[type(error)] and call.details() == str(error)
            back = error_from_rpc(call.code(), call.details(), call.trailing_metadata(), peer="replica")
            assert type(back) is type(error) and str(back) == f"replica: {error}"
        assert received == 1  # the stream's message before the error arrived


def test_engine_errors_and_unexpected_exceptions_are_mapped_never_unknown(caplog: pytest.LogCaptureFixture) -> None:
    cases: list[BaseException] = [EngineError("slot 9 out of range"), TPRankError("TP rank 1 died"), KeyError("bug")]
    with caplog.at_level(logging.ERROR, logger="nxserve.rpc.status"):
        results = asyncio.run(_calls(Raising(), cases))
    (engine, _, _), (rank, _, _), (bug, bug_stream, _) = results
    assert engine.code() == grpc.StatusCode.INVALID_ARGUMENT and engine.details() == "slot 9 out of range"
    assert rank.code() == grpc.StatusCode.UNAVAILABLE and "TP rank 1 died" in rank.details()
    for call in (bug, bug_stream):
        assert call.code() == grpc.StatusCode.INTERNAL and "bug" not in call.details()
        error_id = re.search(r"internal error ([0-9a-f]{12}) \(KeyError\)", call.details()).group(1)
        [record] = [r for r in caplog.records if error_id in r.getMessage()]
        assert record.exc_info is not None  # the traceback is in the log, under the same id


def test_a_status_from_a_server_that_is_not_nxserves_maps_by_its_code() -> None:
    assert isinstance(error_from_rpc(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", (), peer="p"), errors.Overloaded)
    assert isinstance(error_from_rpc(grpc.StatusCode.FAILED_PRECONDITION, "x", (), peer="p"), errors.ModelMismatch)
    assert isinstance(error_from_rpc(grpc.StatusCode.UNKNOWN, "x", (), peer="p"), errors.Internal)
    code, _, metadata = status_of(errors.SharedMemoryUnreadable("no arena"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and metadata == (("nxserve-error", "SharedMemoryUnreadable"),)
    code, _, metadata = status_of(errors.Overloaded("full", retry_after_ms=120))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and ("grpc-retry-pushback-ms", "120") in metadata
