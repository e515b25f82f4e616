"""The OpenAI-compatible HTTP API, served with aiohttp over the public gRPC API (`nxserve.AsyncClient`).

    POST /v1/completions        POST /v1/chat/completions   (stream: server-sent events)
    GET  /v1/models             GET  /v1/models/{model}     GET /health

Each request becomes one `Generate` call (a chat one `Tokenize` first) on prefill, carrying the
caller's `Authorization: Bearer KEY` through, so prefill's `--api-keys-file` and
`--max-inflight-per-key` apply as they do to gRPC callers. A streamed response starts (status 200)
only once the first token came, so a request prefill refuses gets its HTTP status, not an error
inside a 200 stream; a call that fails later ends the stream with an error event. A client that
goes away cancels its gRPC call, which frees the decode slot.

aiohttp rather than starlette on uvicorn: `python -m bench.http_stacks` measured server CPU per
streamed event at 10.0-10.6 us for aiohttp, 12.5-15.0 us for uvicorn's default h11 parser and the
same as aiohttp for its httptools one (2-core VM, 16 streams of 1,000 events), and aiohttp is one
package with no ASGI layer between the handler and the socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, cast

import grpc
from aiohttp import web

from nxserve.client import AsyncClient, GenerateOptions, GenerationChunk, Usage
from nxserve.openai.chat import render
from nxserve.openai.errors import ApiError, from_rpc, invalid
from nxserve.openai.protocol import DEFAULT_COMPLETION_TOKENS, Answer, Plan, parse_chat, parse_completion
from nxserve.rpc.logs import access
from nxserve.rpc.validate import MAX_STREAM_INTERVAL, PROMPT_BYTES_PER_TOKEN

log = logging.getLogger(__name__)

INFO_TTL_S = 10.0
"""How long the served model's description (name, limits, chat template) is reused before the next
request fetches it again: one ModelInfo call per request would add a round trip to each."""
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _api_key(request: web.Request) -> str | None:
    """The caller's key from `Authorization: Bearer KEY` (None without the header), to pass to prefill."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, key = header.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key or not key.isascii() or not key.isprintable():
        raise ApiError(401, "Authorization must be 'Bearer KEY' with a printable ASCII key", type="authentication_error", code="invalid_api_key")
    return key


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as OpenAI's error JSON with its HTTP status."""
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers)
    except grpc.aio.AioRpcError as exc:
        error = from_rpc(exc)
        return web.json_response(error.body(), status=error.status, headers=error.headers)
    except web.HTTPException as exc:  # unknown path, wrong method, body too large
        if exc.status < 400:
            raise
        body = ApiError(exc.status, exc.reason, type="invalid_request_error" if exc.status < 500 else "server_error").body()
        return web.json_response(body, status=exc.status, headers={k: v for k, v in exc.headers.items() if k == "Allow"})


class Gateway:
    """The HTTP handlers over one AsyncClient of prefill's public API."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self._info: dict[str, Any] | None = None
        self._info_at = 0.0

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors], client_max_size=8 << 20)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_get("/health", self.health)
        return app

    async def info(self, api_key: str | None, *, fresh: bool = False) -> dict[str, Any]:
        """prefill's ModelInfo, reused for INFO_TTL_S unless `fresh`."""
        if fresh or self._info is None or time.monotonic() - self._info_at > INFO_TTL_S:
            self._info = await self.client.model_info(api_key=api_key)
            self._info_at = time.monotonic()
        return self._info

    # ---------------------------------------------------------------- models and health

    def _model_card(self, info: dict[str, Any]) -> dict[str, Any]:
        return {"id": info["model"], "object": "model", "created": 0, "owned_by": "nxserve", "max_model_len": info["max_total_tokens"]}

    async def models(self, request: web.Request) -> web.Response:
        info = await self.info(_api_key(request), fresh=True)  # with the caller's key: a refused key is refused here too
        return web.json_response({"object": "list", "data": [self._model_card(info)]})

    async def model(self, request: web.Request) -> web.Response:
        info = await self.info(_api_key(request), fresh=True)
        self._check_model(request.match_info["model"], info)
        return web.json_response(self._model_card(info))

    async def health(self, request: web.Request) -> web.Response:
        """200 while prefill reports SERVING on its gRPC health check (no API key needed), else 503."""
        if await self.client.serving(timeout=5.0):
            return web.json_response({"status": "ok"})
        return web.json_response(ApiError(503, "prefill is not serving").body(), status=503)

    @staticmethod
    def _check_model(model: str | None, info: dict[str, Any]) -> None:
        if model is not None and model != info["model"]:
            raise ApiError(404, f"the model {model!r} does not exist: this server serves {info['model']!r}", code="model_not_found", param="model")

    # ---------------------------------------------------------------- completions

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, parse_completion(await _json(request)))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, parse_chat(await _json(request)))

    async def _complete(self, request: web.Request, plan: Plan) -> web.StreamResponse:
        api_key = _api_key(request)
        info = await self.info(api_key)
        self._check_model(plan.model, info)
        prompt, max_tokens = plan.prompt, plan.max_tokens or DEFAULT_COMPLETION_TOKENS
        if plan.messages is not None:
            _check_messages_size(plan.messages, info["max_prompt_tokens"])  # bounds the template's work, before any
            text = await asyncio.to_thread(render, info["chat_template"], info["special_tokens"], plan.messages)
            prompt = await self.client.tokenize(text, add_special_tokens=False, api_key=api_key)  # the template wrote bos
            max_tokens = plan.max_tokens or max(1, info["max_total_tokens"] - len(prompt))
        assert prompt is not None
        answer = Answer(plan.kind, info["model"])
        options = generate_options(plan, max_tokens, answer.id)
        try:
            chunks = cast(AsyncGenerator[GenerationChunk, None], self.client.generate(prompt, api_key=api_key, **options))
        except (ValueError, TypeError, OverflowError) as exc:  # a value the request message cannot hold (e.g. an id past 2^64)
            raise invalid(str(exc)) from None
        start = time.perf_counter()
        async with aclosing(chunks):  # leaving early (an error, a client gone) cancels the gRPC call
            if plan.stream:
                response, usage = await _stream(request, answer, chunks, include_usage=plan.include_usage)
            else:
                response, usage = await _whole(answer, chunks)
        access(
            "%s %s %d tokens",
            request.method,
            request.path,
            usage.completion_tokens if usage else 0,
            span=None,
            request_id=answer.id,
            http_status=response.status,
            stream=plan.stream,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            duration_s=round(time.perf_counter() - start, 6),
        )
        return response


def generate_options(plan: Plan, max_tokens: int, request_id: str) -> GenerateOptions:
    """The gRPC call's options. A request that is not streamed asks for its tokens in as few messages
    as decode sends (the largest stream_interval: at the end, and once a second while it runs), as
    vLLM sends such a request only its final output: per-token messages through prefill and this
    gateway would be work for nothing."""
    options: GenerateOptions = {**plan.options, "max_new_tokens": max_tokens, "request_id": request_id}
    if not plan.stream:
        options["stream_interval"] = MAX_STREAM_INTERVAL
    return options


def _check_messages_size(messages: list[dict[str, str]], max_prompt_tokens: int) -> None:
    """Refuse messages whose text alone exceeds what prefill takes by default (--max-prompt-bytes:
    PROMPT_BYTES_PER_TOKEN per token of the largest bucket), before the template renders them."""
    limit = PROMPT_BYTES_PER_TOKEN * max_prompt_tokens
    size = sum(len(v.encode()) for m in messages for v in m.values())
    if len(messages) > max_prompt_tokens or size > limit:
        raise invalid(
            f"messages of {size} bytes in {len(messages)} messages are too long: allowed up to {limit} bytes "
            f"and {max_prompt_tokens} messages (the server's longest prompt is {max_prompt_tokens} tokens)",
            param="messages",
        )


async def _json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nesting too deep to parse
        raise invalid(f"the request body is not JSON: {type(exc).__name__}: {str(exc)[:200]}") from None


async def _whole(answer: Answer, chunks: AsyncIterator[GenerationChunk]) -> tuple[web.Response, Usage | None]:
    texts, last = [], None
    async for chunk in chunks:
        texts.append(chunk.text)
        last = chunk
    usage = last.usage if last else None
    return web.json_response(answer.whole("".join(texts), last.finish_reason if last else None, usage)), usage


async def _stream(
    request: web.Request, answer: Answer, chunks: AsyncIterator[GenerationChunk], *, include_usage: bool
) -> tuple[web.StreamResponse, Usage | None]:
    """Server-sent events, one per gRPC message with tokens: the status goes out with the first token.
    A message whose text is empty (its tokens end inside a multi-byte character; the text follows
    with a later token) still gets its event, with "" for text, as vLLM's server sends it: a client
    timing the first token (vLLM's load generator counts any event with choices) sees it when it was
    generated. Skipping those events delayed the first event of one request in 48 of vLLM's random
    prompts by ~420 ms (17 tokens), which was the whole p99 TTFT of `bench.peers.vllm_serve`."""
    iterator = aiter(chunks)
    chunk = await anext(iterator, None)  # a refusal raises here, before any byte of the response
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    out = [answer.role()] if answer.kind == "chat" else []
    reason, usage = None, None
    try:
        while chunk is not None:
            if chunk.text or chunk.token_ids:
                out.append(answer.delta(chunk.text))
            if chunk.finish_reason:
                reason, usage = chunk.finish_reason, chunk.usage
            if out:
                await response.write(out[0] if len(out) == 1 else b"".join(out))
                out = []
            chunk = await anext(iterator, None)
    except grpc.aio.AioRpcError as exc:  # the 200 is sent: the error becomes the stream's last event
        await response.write(from_rpc(exc).sse() + Answer.DONE)
        return response, usage
    tail = answer.finish(reason) + (answer.usage(usage) if include_usage else b"") + Answer.DONE
    await response.write(tail)
    await response.write_eof()
    return response, usage
