"""Prefill's --stream-interval is a floor under each request's stream_interval (vLLM's semantics),
and a request's value is bounded before any work."""

from __future__ import annotations

import asyncio

import pytest

from nxserve.rpc.errors import InvalidRequest
from nxserve.rpc.validate import Limits
from nxserve.v1 import generation_pb2 as pb
from prefill_svc.server import GenerationServicer


def test_the_services_stream_interval_is_a_floor_under_each_requests() -> None:
    servicer = GenerationServicer(model_name="m", stream_interval=3)
    servicer.limits = Limits(vocab_size=100, max_prompt_tokens=32, max_topk=8, max_prompt_bytes=1024)
    servicer.tokenizer = None  # token-id prompts are not tokenized

    def prepared(interval: int) -> int:
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6]), stream_interval=interval)
        return asyncio.run(servicer._prepare(request, "r")).stream_interval

    assert [prepared(n) for n in (0, 1, 3, 5, 65536)] == [3, 3, 3, 5, 65536]
    with pytest.raises(InvalidRequest, match=r"stream_interval=65537 is invalid: allowed 0\.\.65536"):
        prepared(65537)


def test_a_text_prompts_stream_interval_is_checked_before_it_is_tokenized() -> None:
    """No tokenizer here: a text prompt would fail at tokenizing, so the bound's error shows it came first."""
    servicer = GenerationServicer(model_name="m")
    servicer.limits = Limits(vocab_size=100, max_prompt_tokens=32, max_topk=8, max_prompt_bytes=1024)
    servicer.tokenizer = None
    with pytest.raises(InvalidRequest, match="stream_interval=65537"):
        asyncio.run(servicer._prepare(pb.GenerateRequest(text="hello", stream_interval=65537), "r"))
