"""nxserve.client (and `nxserve client`) against an in-process fake Generation server: conversions,
trace-context propagation, cancellation and error propagation. No model, no real services."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider

from nxserve.cli import main
from nxserve.client import AsyncClient, Client, GenerationChunk, GenerationResult, Usage
from nxserve.v1 import generation_pb2 as pb
from nxserve.v1 import generation_pb2_grpc as pb_grpc

PROMPT_IDS = [1, 20, 21]
STREAM = [  # what the fake streams for every prompt, as the client should convert it
    GenerationChunk(request_id="req-1", token_ids=[5], text="a", finish_reason=None, prompt_token_ids=PROMPT_IDS),
    GenerationChunk(request_id="req-1", token_ids=[6, 7], text="bc", finish_reason=None),
    GenerationChunk(request_id="req-1", token_ids=[8], text="", finish_reason="eos", usage=Usage(prompt_tokens=3, completion_tokens=4)),
]


class FakeGeneration(pb_grpc.GenerationServicer):
    """Test double of the transport: streams STREAM, records requests and metadata.

    Prompt text "fail" aborts with RESOURCE_EXHAUSTED after one message; "hang" sends one message
    and then waits until the client cancels.
    """

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.cancelled = threading.Event()

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        if request.text == "hang":  # ends only when the client cancels
            context.add_callback(self.cancelled.set)
        yield pb.GenerateResponse(request_id="req-1", token_ids=[5], text="a", prompt_token_ids=PROMPT_IDS)
        if request.text == "fail":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "decode queue is full")
        if request.text == "hang":
            while context.is_active():
                threading.Event().wait(0.01)
            return
        yield pb.GenerateResponse(request_id="req-1", token_ids=[6, 7], text="bc")
        yield pb.GenerateResponse(
            request_id="req-1",
            token_ids=[8],
            finish_reason=pb.FINISH_REASON_EOS,
            usage=pb.Usage(prompt_tokens=3, completion_tokens=4),
        )

    def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfoResponse:
        return pb.ModelInfoResponse(model="/m", architecture="llama", dtype="float32", buckets=[128, 256], batch_size=8, decode_replicas=2)

    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        if not request.text:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty text")
        ids = [1] if request.add_special_tokens else []
        return pb.TokenizeResponse(token_ids=ids + [ord(c) for c in request.text], tokens=list(request.text))


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, FakeGeneration]]:
    fake = FakeGeneration()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_GenerationServicer_to_server(fake, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}", fake
    srv.stop(grace=None)


def check_result(result: GenerationResult) -> None:
    assert (result.prompt_ids, result.output_ids, result.text) == (PROMPT_IDS, [5, 6, 7, 8], "abc")
    assert (result.finish_reason, result.usage, result.request_id) == ("eos", Usage(3, 4), "req-1")
    assert result.ttft_s is not None and 0 <= result.ttft_s <= result.elapsed_s


def test_generate_streams_plain_chunks_and_builds_the_request(server) -> None:
    target, fake = server
    with Client(target, timeout=5) as client:
        chunks = list(
            client.generate(
                "hello",
                max_new_tokens=7,
                temperature=0.5,
                top_k=3,
                top_p=0.9,
                seed=11,
                stop_token_ids=[2],
                stop_strings=["\n"],
                ignore_eos=True,
                request_id="mine",
            )
        )
        assert chunks == STREAM
        req = fake.requests[-1]
        assert (req.WhichOneof("prompt"), req.text, req.request_id) == ("text", "hello", "mine")
        assert (req.sampling.temperature, req.sampling.top_k, req.sampling.seed) == (0.5, 3, 11)
        assert req.sampling.top_p == pytest.approx(0.9)
        assert (req.stopping.max_new_tokens, list(req.stopping.stop_token_ids), list(req.stopping.stop_strings), req.stopping.ignore_eos) == (
            7,
            [2],
            ["\n"],
            True,
        )

        list(client.generate(PROMPT_IDS))
        req = fake.requests[-1]
        assert (req.WhichOneof("prompt"), list(req.token_ids.ids)) == ("token_ids", PROMPT_IDS)
        assert not req.sampling.HasField("seed") and req.stopping.max_new_tokens == 16 and req.sampling.top_p == 1.0


def test_generate_text_model_info_tokenize(server) -> None:
    target, _ = server
    with Client(target) as client:
        check_result(client.generate_text("hello"))
        info = client.model_info()
        assert info["architecture"] == "llama" and info["buckets"] == [128, 256] and info["decode_replicas"] == 2
        assert type(info["buckets"]) is list and info["max_total_tokens"] == 0
        assert client.tokenize("hi") == [104, 105]
        assert client.tokenize("hi", add_special_tokens=True) == [1, 104, 105]


def test_async_client_same_api(server) -> None:
    target, fake = server

    async def scenario() -> None:
        async with AsyncClient(target, timeout=5) as client:
            chunks = [c async for c in client.generate(PROMPT_IDS, seed=3)]
            assert chunks == STREAM and fake.requests[-1].sampling.seed == 3
            results = await asyncio.gather(client.generate_text("x"), client.generate_text([4, 5]))
            for r in results:
                check_result(r)
            assert (await client.model_info())["batch_size"] == 8
            assert await client.tokenize("ab", add_special_tokens=True) == [1, 97, 98]
            with pytest.raises(grpc.RpcError) as err:
                [c async for c in client.generate("fail")]
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(grpc.RpcError) as err:
                await client.tokenize("")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(scenario())


def test_trace_context_travels_in_metadata(server) -> None:
    target, fake = server
    tracer = TracerProvider().get_tracer("test")
    with Client(target) as client:
        list(client.generate("no span"))
        assert "traceparent" not in fake.metadata[-1]
        with tracer.start_as_current_span("caller") as span:
            list(client.generate("traced"))
        trace_id = f"{span.get_span_context().trace_id:032x}"
        assert fake.metadata[-1]["traceparent"].split("-")[1] == trace_id

    async def traced_async() -> None:
        async with AsyncClient(target) as client:
            with tracer.start_as_current_span("async caller") as span:
                await client.generate_text("traced")
            return f"{span.get_span_context().trace_id:032x}"

    trace_id = asyncio.run(traced_async())
    assert fake.metadata[-1]["traceparent"].split("-")[1] == trace_id


def test_errors_propagate_with_their_status(server) -> None:
    target, _ = server
    with Client(target) as client:
        chunks = client.generate("fail")
        assert next(chunks).token_ids == [5]
        with pytest.raises(grpc.RpcError) as err:
            next(chunks)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.details() == "decode queue is full"
        with pytest.raises(grpc.RpcError) as err:
            client.tokenize("")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ValueError):
            client.generate([-1])  # not a uint32: refused before sending
    with Client("127.0.0.1:1", timeout=2) as client, pytest.raises(grpc.RpcError) as err:
        client.model_info()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_leaving_the_stream_early_cancels_the_request(server) -> None:
    target, fake = server
    fake.cancelled.clear()
    with Client(target) as client:
        for _chunk in client.generate("hang"):
            break
        assert fake.cancelled.wait(3)


def test_cli_client_json_stream_and_errors(server, capsys) -> None:
    target, _ = server
    assert main(["client", "--target", target, "--prompt", "hi", "--prompt-ids", "1,2", "--stop", "x", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [{"prompt_ids": PROMPT_IDS, "output_ids": [5, 6, 7, 8], "text": "abc", "finish_reason": "eos"}] * 2
    assert main(["client", "--target", target, "--prompt", "hi"]) == 0
    assert capsys.readouterr().out == "abc\n"
    assert main(["client", "--target", target, "--prompt", "fail"]) == 2
    assert "nxserve client: error: RESOURCE_EXHAUSTED: decode queue is full" in capsys.readouterr().err


def test_import_nxserve_stays_light() -> None:
    code = "import sys, nxserve; assert 'grpc' not in sys.modules; from nxserve import Client; assert 'grpc' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
