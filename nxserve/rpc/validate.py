"""Bounds on every field that crosses a service boundary, checked before any work is done for it.

The servicers call these on each request as it arrives: before a prompt is tokenized, a KV chunk
assembled or a slot taken. A field out of bounds is `InvalidRequest` (INVALID_ARGUMENT) with a
message naming the field, the value (abridged) and the limit. `Limits` holds the bounds; those that
come from the model (vocabulary, buckets, sequence length) are read off the engine.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nxcore import SamplingParams, StoppingCriteria
from nxserve.rpc.errors import InvalidRequest
from nxserve.v1 import generation_pb2 as gen_pb2

PROMPT_BYTES_PER_TOKEN = 32
"""The default text limit is this many bytes per token of the largest bucket: a text that long
cannot fit the bucket with any tokenizer here (their tokens average 3-5 bytes of text; a run of
whitespace or punctuation makes one token of 16-ish), so refusing it costs no real prompt and
bounds what is tokenized at all (32 KiB for a 1024-token bucket)."""


MAX_STREAM_INTERVAL = 65536
"""The largest stream interval (generated tokens per streamed message) a flag or a request may ask for."""


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What one request may carry."""

    vocab_size: int
    """Token ids are 0..vocab_size-1."""
    max_prompt_tokens: int
    """The largest context-encoding bucket."""
    max_topk: int
    max_prompt_bytes: int
    """UTF-8 bytes of a text prompt or of a Tokenize text, checked before tokenizing."""
    max_request_id_bytes: int = 128
    max_stop_strings: int = 16
    max_stop_string_bytes: int = 256
    max_stop_token_ids: int = 64
    max_stream_interval: int = MAX_STREAM_INTERVAL

    @classmethod
    def for_engine(cls, engine: Any, *, max_prompt_bytes: int | None = None) -> Limits:
        """The limits of a service serving `engine` (its vocabulary and shapes)."""
        cfg = engine.config
        return cls(
            vocab_size=engine.model_config.vocab_size,
            max_prompt_tokens=cfg.max_prompt_len,
            max_topk=cfg.max_topk,
            max_prompt_bytes=max_prompt_bytes or PROMPT_BYTES_PER_TOKEN * cfg.max_prompt_len,
        )


def _show(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def request_id(value: str, limits: Limits) -> str:
    """The caller's request id, or a new one when empty. It is echoed in every response and log
    line: bounded, and printable ASCII so that it cannot forge log lines."""
    if not value:
        return uuid.uuid4().hex
    size = len(value.encode())
    if size > limits.max_request_id_bytes:
        raise InvalidRequest(f"request_id of {size} bytes is too long: allowed up to {limits.max_request_id_bytes}")
    if not (value.isascii() and value.isprintable()):
        raise InvalidRequest(f"request_id {_show(value)} is invalid: allowed printable ASCII only")
    return value


def text(value: str, limits: Limits, *, field: str) -> str:
    """A text to tokenize, bounded in bytes before anything else happens to it."""
    size = len(value.encode())
    if size > limits.max_prompt_bytes:
        raise InvalidRequest(
            f"{field} of {size} bytes is too long: allowed up to {limits.max_prompt_bytes} (--max-prompt-bytes; a prompt "
            f"must fit the largest context bucket, {limits.max_prompt_tokens} tokens, anyway)"
        )
    return value


def token_ids(ids: Sequence[int], limits: Limits, *, field: str, max_count: int) -> list[int]:
    """Token ids in the vocabulary, at most `max_count` of them."""
    if len(ids) > max_count:
        raise InvalidRequest(f"{field} has {len(ids)} token ids: allowed up to {max_count}")
    bad = [t for t in ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise InvalidRequest(f"{field}: token ids {bad[:8]} out of range: allowed 0..{limits.vocab_size - 1} (vocab_size)")
    return list(ids)


def prompt_ids(ids: Sequence[int], limits: Limits, *, field: str = "prompt") -> list[int]:
    """A tokenized prompt: non-empty, within the vocabulary and the largest bucket."""
    if not ids:
        raise InvalidRequest(f"the {field} is empty")
    if len(ids) > limits.max_prompt_tokens:
        raise InvalidRequest(f"{field} of {len(ids)} tokens is longer than the largest context bucket ({limits.max_prompt_tokens} tokens)")
    return token_ids(ids, limits, field=field, max_count=limits.max_prompt_tokens)


def sampling(pb: gen_pb2.SamplingParameters, limits: Limits) -> SamplingParams:
    """The sampling settings: temperature finite and >= 0, top_p in (0, 1] (0 is unset), top_k
    within the in-graph candidate set."""
    if not (math.isfinite(pb.temperature) and pb.temperature >= 0):
        raise InvalidRequest(f"sampling.temperature={pb.temperature} is invalid: allowed a finite number >= 0 (0 is greedy)")
    if pb.top_p != 0 and not (0 < pb.top_p <= 1):
        raise InvalidRequest(f"sampling.top_p={pb.top_p} is invalid: allowed (0, 1], or 0 for unset")
    if pb.top_k > limits.max_topk:
        raise InvalidRequest(f"sampling.top_k={pb.top_k} is invalid: allowed 0..{limits.max_topk} (max_topk; 0 means max_topk)")
    return SamplingParams(
        temperature=pb.temperature,
        top_k=pb.top_k,
        top_p=pb.top_p if pb.top_p > 0 else 1.0,
        seed=pb.seed if pb.HasField("seed") else None,
    )


DEFAULT_MAX_NEW_TOKENS = 16


def stream_interval(value: int, limits: Limits, *, field: str = "stream_interval") -> int:
    """Tokens per streamed message at least: 0 (the server's setting) up to max_stream_interval."""
    if value > limits.max_stream_interval:
        raise InvalidRequest(f"{field}={value} is invalid: allowed 0..{limits.max_stream_interval} (0: the server's --stream-interval)")
    return value


def stopping(pb: gen_pb2.StoppingParameters, limits: Limits) -> tuple[StoppingCriteria, tuple[str, ...]]:
    """The stopping settings: stop token ids in the vocabulary, stop strings bounded in count and
    size. max_new_tokens 0 is 16; past the slot's length generation stops there anyway."""
    stop_ids = token_ids(pb.stop_token_ids, limits, field="stopping.stop_token_ids", max_count=limits.max_stop_token_ids)
    if len(pb.stop_strings) > limits.max_stop_strings:
        raise InvalidRequest(f"stopping.stop_strings has {len(pb.stop_strings)} strings: allowed up to {limits.max_stop_strings}")
    for i, stop in enumerate(pb.stop_strings):
        size = len(stop.encode())
        if size > limits.max_stop_string_bytes:
            raise InvalidRequest(f"stopping.stop_strings[{i}] of {size} bytes is too long: allowed up to {limits.max_stop_string_bytes}")
    criteria = StoppingCriteria(max_new_tokens=pb.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, stop_token_ids=tuple(stop_ids), ignore_eos=pb.ignore_eos)
    return criteria, tuple(pb.stop_strings)
