"""OpenAI request bodies to GenerateOptions, the refusals, the streamed JSON, the gRPC code -> HTTP status table."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from nxserve.client import Usage
from nxserve.openai.errors import ApiError, from_rpc
from nxserve.openai.protocol import Answer, parse_chat, parse_completion
from nxserve.openai.server import generate_options
from nxserve.rpc.validate import MAX_STREAM_INTERVAL


def test_completion_fields_map_to_options() -> None:
    plan = parse_completion(
        {"model": "m", "prompt": ["Hi"], "max_tokens": 7, "temperature": 0, "top_p": 0.5, "seed": -1, "stop": "x", "stream": True,
         "stream_options": {"include_usage": True}, "ignore_eos": True, "n": 1, "presence_penalty": 0, "user": "u"}
    )  # fmt: skip
    assert (plan.prompt, plan.max_tokens, plan.stream, plan.include_usage) == ("Hi", 7, True, True)
    assert plan.options == {"temperature": 0.0, "top_p": 0.5, "seed": 2**64 - 1, "stop_strings": ["x"], "ignore_eos": True}
    assert parse_completion({"prompt": [[5, 6]]}).prompt == [5, 6]
    assert parse_completion({"prompt": "a"}).options["temperature"] == 1.0  # OpenAI's default
    chat = parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "max_tokens": 3,
                       "max_completion_tokens": 5})  # fmt: skip
    assert chat.messages == [{"role": "user", "content": "a\nb"}] and chat.max_tokens == 5


def test_stream_interval_passes_when_streamed_and_is_the_largest_when_not() -> None:
    """vLLM's stream_interval extension goes to the gRPC call for a streamed request; one that is
    not streamed asks for the fewest messages (its text is only sent at the end anyway)."""
    streamed = parse_completion({"prompt": "a", "stream": True, "stream_interval": 6})
    assert generate_options(streamed, 9, "r") == {
        "temperature": 1.0,
        "ignore_eos": False,
        "stream_interval": 6,
        "max_new_tokens": 9,
        "request_id": "r",
    }
    assert "stream_interval" not in generate_options(parse_chat({"messages": [{"role": "user", "content": "a"}], "stream": True}), 9, "r")
    for body in ({"prompt": "a"}, {"prompt": "a", "stream_interval": 6}):
        assert generate_options(parse_completion(body), 9, "r")["stream_interval"] == MAX_STREAM_INTERVAL


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "a", "n": 2}, "n"),
        ({"prompt": "a", "logprobs": 0}, "logprobs"),
        ({"prompt": "a", "best_of": 3}, "best_of"),
        ({"prompt": "a", "echo": True}, "echo"),
        ({"prompt": "a", "temperature": -0.1}, "temperature"),
        ({"prompt": "a", "top_p": 0}, "top_p"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "a", "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": "a", "stop": [1]}, "stop"),
        ({"prompt": "a", "stream": "yes"}, "stream"),
        ({"prompt": "a", "stream_interval": 0}, "stream_interval"),
        ({"prompt": "a", "stream_interval": 65537}, "stream_interval"),
        ({"prompt": "a", "stream_interval": 2.5}, "stream_interval"),
    ],
)
def test_refused_completion_fields_name_the_field(body: dict, param: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_completion(body)
    assert (err.value.status, err.value.param) == (400, param)


def test_refused_chat_fields() -> None:
    for body, param in [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "a"}], "logprobs": True}, "logprobs"),
        ({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "json_object"}}, "response_format"),
    ]:
        with pytest.raises(ApiError) as err:
            parse_chat(body)
        assert (err.value.status, err.value.param) == (400, param)


def test_streamed_events_are_openai_json() -> None:
    answer = Answer("chat", "m")
    events = [answer.role(), answer.delta('a "quoted" é'), answer.finish("eos"), answer.usage(Usage(3, 2))]
    parsed = [json.loads(e.removeprefix(b"data: ")) for e in events]
    assert all(p["id"] == answer.id and p["object"] == "chat.completion.chunk" and p["model"] == "m" for p in parsed)
    assert parsed[1]["choices"] == [{"index": 0, "delta": {"content": 'a "quoted" é'}, "logprobs": None, "finish_reason": None}]
    assert parsed[2]["choices"][0]["finish_reason"] == "stop" and parsed[3]["usage"]["total_tokens"] == 5
    text = Answer("completion", "m")
    assert json.loads(text.delta("x").removeprefix(b"data: "))["choices"][0]["text"] == "x"
    assert text.whole("xy", "length", None)["choices"][0] == {"index": 0, "logprobs": None, "finish_reason": "length", "text": "xy"}


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.FAILED_PRECONDITION, 400),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.INTERNAL, 500),
        (grpc.StatusCode.DATA_LOSS, 500),
    ],
)
def test_grpc_codes_map_to_http_statuses(code: grpc.StatusCode, status: int) -> None:
    trailing = grpc.aio.Metadata(("grpc-retry-pushback-ms", "1500"))
    error = from_rpc(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details="why"))
    assert (error.status, error.message) == (status, "why")
    assert error.headers == ({"Retry-After": "2"} if status == 429 else {})


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_a_token_whose_text_is_held_still_gets_its_event(kind: str) -> None:
    """A streamed token that ends inside a multi-byte character has no text yet: its event goes out
    with "" (as vLLM's server sends it), so a client timing the first token sees it when it was
    generated; the text follows once the character is whole."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from nxcore.stopping import FinishReason
    from nxserve.client import GenerationChunk
    from nxserve.openai.server import _stream

    chunks = [
        GenerationChunk(request_id="r", token_ids=[7], text="", finish_reason=None),  # first byte of a character
        GenerationChunk(request_id="r", token_ids=[8], text="é", finish_reason=None),
        GenerationChunk(request_id="r", token_ids=[], text="", finish_reason=FinishReason.LENGTH, usage=Usage(prompt_tokens=3, completion_tokens=2)),
    ]

    async def source():
        for c in chunks:
            yield c

    async def handler(request: web.Request) -> web.StreamResponse:
        response, _ = await _stream(request, Answer(kind, "m"), source(), include_usage=True)
        return response

    async def run() -> list[dict]:
        app = web.Application()
        app.router.add_get("/", handler)
        async with TestClient(TestServer(app)) as client:
            body = await (await client.get("/")).text()
        events = [line.removeprefix("data: ") for line in body.split("\n\n") if line]
        assert events[-1] == "[DONE]"
        return [json.loads(e) for e in events[:-1]]

    events = asyncio.run(run())
    texts = [c.get("text", c.get("delta", {}).get("content")) for e in events for c in e["choices"] if c["finish_reason"] is None]
    role = [""] if kind == "chat" else []  # a chat stream opens with the role, content ""
    assert texts == [*role, "", "é"]
    assert events[-1]["usage"]["completion_tokens"] == 2
