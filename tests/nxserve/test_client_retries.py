"""The client retries UNAVAILABLE before the first token (gRPC's retry policy, bounded) and never
after a token was delivered."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from nxserve.client import AsyncClient, Client
from nxserve.v1 import generation_pb2 as pb
from nxserve.v1 import generation_pb2_grpc


class Flaky(generation_pb2_grpc.GenerationServicer):
    """Fails the first `failures` calls with `code`, before (or, `after_token`, after) one token."""

    def __init__(self, failures: int, *, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, after_token: bool = False) -> None:
        self.failures, self.code, self.after_token = failures, code, after_token
        self.calls = 0
        self.lock = threading.Lock()

    async def Generate(self, request, context):
        with self.lock:
            self.calls += 1
            fail = self.calls <= self.failures
        if fail and not self.after_token:
            await context.abort(self.code, "not yet")
        yield pb.GenerateResponse(request_id="r", token_ids=[1], text="a")
        if fail:
            await context.abort(self.code, "lost after a token")
        yield pb.GenerateResponse(request_id="r", token_ids=[2], text="b", finish_reason=pb.FINISH_REASON_LENGTH)


async def _serve(servicer: Flaky) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("client_kind", ["sync", "async"])
def test_unavailable_before_the_first_token_is_retried_never_after(client_kind: str) -> None:
    async def run(servicer: Flaky) -> tuple[list[int] | str, int]:
        server, target = await _serve(servicer)
        try:
            if client_kind == "sync":

                def blocking() -> list[int]:
                    with Client(target, timeout=10) as client:
                        return client.generate_text([5], max_new_tokens=2).output_ids

                try:
                    return await asyncio.to_thread(blocking), servicer.calls
                except grpc.RpcError as exc:
                    return exc.code().name, servicer.calls
            async with AsyncClient(target, timeout=10) as client:
                try:
                    return (await client.generate_text([5], max_new_tokens=2)).output_ids, servicer.calls
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name, servicer.calls
        finally:
            await server.stop(0)

    assert asyncio.run(run(Flaky(2))) == ([1, 2], 3)  # two UNAVAILABLE, then served: the caller sees tokens only
    assert asyncio.run(run(Flaky(10))) == ("UNAVAILABLE", 4)  # bounded: 4 attempts in all
    assert asyncio.run(run(Flaky(1, after_token=True))) == ("UNAVAILABLE", 1)  # a token came: never sent again
    assert asyncio.run(run(Flaky(1, code=grpc.StatusCode.RESOURCE_EXHAUSTED))) == ("RESOURCE_EXHAUSTED", 1)
