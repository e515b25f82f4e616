"""OpenAI's request and response JSON, translated at the boundary (as TGI's from_pb/to_pb do).

`parse_completion` and `parse_chat` turn a request body into a `Plan`: the prompt (or messages),
the `nxserve.client.GenerateOptions` the gRPC call takes, and how to answer (stream or not, usage
in the stream). A field the gateway cannot honour is refused with 400 naming it, never silently
ignored; fields that change nothing (`user`, penalties at their neutral values) pass.
`Answer` builds the JSON of one response, whole or as server-sent events; streamed chunks are
written from a prefix and suffix made once per request, so a token costs one `json.dumps` of its
text (bench/openai_gateway.py times what a token costs through the gateway).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from nxserve.client import FinishReason, GenerateOptions, Usage
from nxserve.openai.errors import invalid
from nxserve.rpc.validate import MAX_STREAM_INTERVAL

Kind = Literal["completion", "chat"]

DEFAULT_COMPLETION_TOKENS = 16
"""max_tokens of a completion that does not say (OpenAI's default for /v1/completions). A chat
completion that does not say may fill the context, as OpenAI's does."""
_NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "min_p": 0, "min_tokens": 0}
"""Sampling fields nxserve does not implement, accepted only at the value that changes nothing."""
_FINISH = {"length": "length", "eos": "stop", "stop": "stop"}


@dataclass(frozen=True)
class Plan:
    """One request as the gateway runs it."""

    kind: Kind
    model: str | None
    """The model asked for (None: the served one)."""
    prompt: str | list[int] | None
    """A completion's prompt: text (the server adds bos) or token ids."""
    messages: list[dict[str, Any]] | None
    """A chat's messages, content flattened to text."""
    options: GenerateOptions
    max_tokens: int | None
    """Tokens to generate at most; None: the default of the kind."""
    stream: bool
    include_usage: bool


def _get(body: dict[str, Any], name: str, types: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise invalid(f"{name} must be {_names(types)}, got {value!r}", param=name)
    if not isinstance(value, types):
        raise invalid(f"{name} must be {_names(types)}, got {type(value).__name__}", param=name)
    return value


def _names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def _number(body: dict[str, Any], name: str, *, lo: float, hi: float, lo_open: bool = False) -> float | None:
    value = _get(body, name, (int, float))
    if value is None:
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer past float's range
        raise invalid(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got an integer of {len(str(value))} digits", param=name) from None
    if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
        raise invalid(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", param=name)
    return float(value)


def _refuse_unsupported(body: dict[str, Any], kind: Kind) -> None:
    n = _get(body, "n", int, 1)
    if n != 1:
        raise invalid(f"n must be 1: nxserve returns one choice per request (got {n}); send {n} requests instead", param="n")
    if _get(body, "best_of", int, 1) != 1:
        raise invalid("best_of is not supported (only 1)", param="best_of")
    logprobs = body.get("logprobs")
    if (kind == "completion" and logprobs is not None) or (kind == "chat" and logprobs) or body.get("top_logprobs") is not None:
        raise invalid("logprobs are not supported: the nxserve API returns no token probabilities", param="logprobs")
    if body.get("echo"):
        raise invalid("echo is not supported", param="echo")
    if body.get("suffix"):
        raise invalid("suffix is not supported", param="suffix")
    if body.get("logit_bias"):
        raise invalid("logit_bias is not supported", param="logit_bias")
    for name in ("tools", "functions", "tool_choice", "function_call"):
        if body.get(name) not in (None, [], "none"):
            raise invalid(f"{name} is not supported: no tool calling", param=name)
    if (_get(body, "response_format", dict) or {"type": "text"}).get("type") != "text":
        raise invalid("response_format must be text: no structured output", param="response_format")
    for name, neutral in _NEUTRAL.items():
        if _get(body, name, (int, float), neutral) != neutral:
            raise invalid(f"{name} is not supported (only {neutral})", param=name)


def _options(body: dict[str, Any], kind: Kind) -> tuple[GenerateOptions, int | None]:
    """The sampling and stopping options, and max_tokens (None when not given)."""
    options: GenerateOptions = {}
    temperature = _number(body, "temperature", lo=0, hi=1e6)
    options["temperature"] = 1.0 if temperature is None else temperature  # OpenAI's default is 1
    top_p = _number(body, "top_p", lo=0, hi=1, lo_open=True)
    if top_p is not None:
        options["top_p"] = top_p
    top_k = _get(body, "top_k", int)  # vLLM's extension; -1 and 0 mean all (the server's max_topk)
    if top_k is not None:
        if top_k < -1:
            raise invalid(f"top_k must be -1, 0 or positive, got {top_k}", param="top_k")
        options["top_k"] = max(top_k, 0)
    seed = _get(body, "seed", int)
    if seed is not None:
        options["seed"] = seed % 2**64  # OpenAI's seeds are signed 64-bit, nxserve's unsigned
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise invalid("stop must be a string or a list of strings", param="stop")
        options["stop_strings"] = [s for s in stops if s]
    stop_ids = _get(body, "stop_token_ids", list)  # vLLM's extension
    if stop_ids:
        options["stop_token_ids"] = _token_ids(stop_ids, "stop_token_ids")
    options["ignore_eos"] = bool(_get(body, "ignore_eos", bool, False))  # vLLM's extension
    stream_interval = _get(body, "stream_interval", int)  # vLLM's extension: tokens per streamed chunk at least
    if stream_interval is not None:
        if not 1 <= stream_interval <= MAX_STREAM_INTERVAL:
            raise invalid(f"stream_interval must be in 1..{MAX_STREAM_INTERVAL}, got {stream_interval}", param="stream_interval")
        options["stream_interval"] = stream_interval
    names = ("max_completion_tokens", "max_tokens") if kind == "chat" else ("max_tokens",)
    max_tokens = next((v for v in (_get(body, name, int) for name in names) if v is not None), None)
    if max_tokens is not None and max_tokens < 1:
        raise invalid(f"{names[-1]} must be at least 1, got {max_tokens}", param=names[-1])
    return options, max_tokens


def _token_ids(value: list[Any], param: str) -> list[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise invalid(f"{param} must be a list of non-negative token ids", param=param)
    return value


def _common(body: Any, kind: Kind) -> tuple[str | None, GenerateOptions, int | None, bool, bool]:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    _refuse_unsupported(body, kind)
    options, max_tokens = _options(body, kind)
    stream = bool(_get(body, "stream", bool, False))
    include_usage = bool((_get(body, "stream_options", dict) or {}).get("include_usage", False))
    return _get(body, "model", str), options, max_tokens, stream, include_usage


def parse_completion(body: Any) -> Plan:
    """A /v1/completions request: one prompt, as text or token ids (a list of one of either too)."""
    model, options, max_tokens, stream, include_usage = _common(body, "completion")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise invalid(f"one prompt per request (got {len(prompt)}): send them as separate requests", param="prompt")
    if isinstance(prompt, list) and prompt:
        prompt = _token_ids(prompt, "prompt")
    elif not isinstance(prompt, str):
        raise invalid("prompt must be a string or a non-empty list of token ids", param="prompt")
    return Plan("completion", model, prompt, None, options, max_tokens, stream, include_usage)


def parse_chat(body: Any) -> Plan:
    """A /v1/chat/completions request: messages with text content (a string or text parts)."""
    model, options, max_tokens, stream, include_usage = _common(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", param="messages")
    flat = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(f"messages[{i}] must be an object with a role", param="messages")
        kept = {"role": message["role"], "content": _text(message.get("content"), f"messages[{i}].content")}  # what a template reads
        if isinstance(message.get("name"), str):
            kept["name"] = message["name"]
        flat.append(kept)
    return Plan("chat", model, None, flat, options, max_tokens, stream, include_usage)


def _text(content: Any, param: str) -> str:
    """A message's content as text: a string, or text parts joined by newlines (as vLLM joins them)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise invalid(f"{param} must be a string or a list of text parts: only text is supported", param=param)


def finish_reason(reason: FinishReason | None) -> str | None:
    """OpenAI's finish_reason for nxserve's: an end-of-sequence token or a stop is "stop"."""
    return _FINISH.get(reason) if reason else None


def usage_json(usage: Usage | None) -> dict[str, int]:
    prompt, completion = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Answer:
    """The JSON of one response: `whole` for a plain one; `role`, `delta`, `finish`, `usage` and
    `DONE` are its server-sent events when streamed."""

    DONE = b"data: [DONE]\n\n"

    def __init__(self, kind: Kind, model: str) -> None:
        self.kind = kind
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        head = {"id": self.id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion", "created": self.created, "model": model}
        self._head = json.dumps(head, separators=(",", ":"))[:-1]
        text_key = '"delta":{"content":' if kind == "chat" else '"text":'
        self._delta_prefix = f'data: {self._head},"choices":[{{"index":0,{text_key}'.encode()
        self._delta_suffix = (b"}" if kind == "chat" else b"") + b',"logprobs":null,"finish_reason":null}]}\n\n'

    def role(self) -> bytes:
        """A chat stream's first event: the assistant's role."""
        return self._event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})

    def delta(self, text: str) -> bytes:
        return self._delta_prefix + json.dumps(text, ensure_ascii=False).encode() + self._delta_suffix

    def finish(self, reason: FinishReason | None) -> bytes:
        body: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason(reason)}
        if self.kind == "chat":
            body["delta"] = {}
        else:
            body["text"] = ""
        return self._event({"choices": [body]})

    def usage(self, usage: Usage | None) -> bytes:
        return self._event({"choices": [], "usage": usage_json(usage)})

    def _event(self, fields: dict[str, Any]) -> bytes:
        return f"data: {self._head},{json.dumps(fields, ensure_ascii=False, separators=(',', ':'))[1:]}\n\n".encode()

    def whole(self, text: str, reason: FinishReason | None, usage: Usage | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason(reason)}
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        kind = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice], "usage": usage_json(usage)}
