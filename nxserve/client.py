"""Python client of the public `nxserve.v1.Generation` API, blocking (`Client`) and asyncio (`AsyncClient`).

    with Client("127.0.0.1:50051") as client:
        for chunk in client.generate("Once upon a time", max_new_tokens=24):
            print(chunk.text, end="", flush=True)
        result = client.generate_text([1, 15, 27], temperature=0.8, seed=7)

Protobuf stays inside this module: callers get `GenerationChunk`, `GenerationResult`, dicts and
lists. Errors are not translated: a failed call raises `grpc.RpcError` (`grpc.aio.AioRpcError` for
`AsyncClient`), whose `code()` and `details()` say what went wrong; arguments protobuf cannot hold
(a negative token id) raise `ValueError`/`TypeError` before anything is sent.

Each Generate call is a CLIENT span of its own (a child of the caller's active span, if any)
whose W3C trace context the call carries, so one trace runs from the client through prefill to
decode; with an OpenTelemetry SDK in the process the client also records
gen_ai.client.operation.duration and gen_ai.client.token.usage. Over TLS:
`Client(target, tls_ca="ca.pem", api_key="...")`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

import grpc
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace

from nxserve.rpc.tracing import inject_metadata
from nxserve.v1 import generation_pb2 as pb
from nxserve.v1 import generation_pb2_grpc as pb_grpc

FinishReason = Literal["length", "eos", "stop"]

RETRY_POLICY = {
    "methodConfig": [
        {
            "name": [{"service": "nxserve.v1.Generation"}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.2s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}
"""gRPC's own retries: a call that fails with UNAVAILABLE (no decode replica yet, a prefill service
shutting down or restarting) is sent again, up to 4 attempts in all with 0.2-2 s jittered backoff
(a `grpc-retry-pushback-ms` from the server overrides it). gRPC commits a streaming call once the
first response arrives, so a Generate is never retried after a token was delivered: the client
sees no repeated token. UNAVAILABLE after that is the error."""
RETRY_OPTIONS = [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(RETRY_POLICY))]

_FINISH_REASONS: dict[int, FinishReason] = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_STOP: "stop",
}


@dataclass(frozen=True)
class Usage:
    """Token counts of a finished request."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class GenerationChunk:
    """One streamed message: the tokens generated since the previous one."""

    request_id: str
    token_ids: list[int]
    # Text of these tokens; may be empty while a multi-byte character is incomplete.
    text: str
    # Set on the last chunk only.
    finish_reason: FinishReason | None
    # The prompt as the server encoded it, on the first chunk only.
    prompt_token_ids: list[int] = field(default_factory=list)
    # Set on the last chunk only.
    usage: Usage | None = None


@dataclass(frozen=True)
class GenerationResult:
    """A whole completion, folded from its chunks."""

    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    # None only when the stream ended without a final message.
    finish_reason: FinishReason | None
    usage: Usage | None
    # Seconds from sending the request to the first generated token (None if none came).
    ttft_s: float | None
    # Seconds from sending the request to the end of the stream.
    elapsed_s: float
    request_id: str = ""

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens per second after the first one (None with fewer than two tokens)."""
        if self.ttft_s is None or len(self.output_ids) < 2 or self.elapsed_s <= self.ttft_s:
            return None
        return (len(self.output_ids) - 1) / (self.elapsed_s - self.ttft_s)


class GenerateOptions(TypedDict, total=False):
    """Keyword arguments of `generate` and `generate_text` (defaults in `_build_request`)."""

    max_new_tokens: int  # tokens to generate at most (16)
    temperature: float  # 0 is greedy (0.0)
    top_k: int  # sample among the k most likely tokens; 0 = the server's max_topk (0)
    top_p: float  # nucleus threshold in (0, 1] (1.0)
    seed: int | None  # per-request seed; None lets the server pick one (None)
    stop_token_ids: Sequence[int]  # token ids that end generation, kept in the output (())
    stop_strings: Sequence[str]  # strings that end generation; the text stops before them (())
    ignore_eos: bool  # keep generating past end-of-sequence tokens (False)
    request_id: str  # echoed in responses, logs and traces; "" lets the server pick one ("")
    disable_speculation: bool  # opt out of speculative decoding on the server (False)
    stream_interval: int  # generated tokens per streamed chunk at least; 0 = the server's --stream-interval (0)


def _build_request(
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    ignore_eos: bool = False,
    request_id: str = "",
    disable_speculation: bool = False,
    stream_interval: int = 0,
) -> pb.GenerateRequest:
    """The GenerateRequest for a prompt given as text (tokenized by the server) or token ids.

    temperature 0 is greedy; top_k 0 means the server's candidate width; seed None lets the
    server pick one; request_id "" lets the server pick one; stream_interval 0 is the server's
    (a smaller value than the server's is raised to it).
    """
    sampling = pb.SamplingParameters(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    stopping = pb.StoppingParameters(
        max_new_tokens=max_new_tokens,
        stop_token_ids=list(stop_token_ids),
        stop_strings=list(stop_strings),
        ignore_eos=ignore_eos,
    )
    request = pb.GenerateRequest(
        request_id=request_id, sampling=sampling, stopping=stopping, disable_speculation=disable_speculation, stream_interval=stream_interval
    )
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


def _chunk_from_pb(message: pb.GenerateResponse) -> GenerationChunk:
    usage = None
    if message.HasField("usage"):
        usage = Usage(prompt_tokens=message.usage.prompt_tokens, completion_tokens=message.usage.completion_tokens)
    return GenerationChunk(
        request_id=message.request_id,
        token_ids=list(message.token_ids),
        text=message.text,
        finish_reason=_FINISH_REASONS.get(message.finish_reason),
        prompt_token_ids=list(message.prompt_token_ids),
        usage=usage,
    )


def _field_value(message: Any, field: Any) -> Any:
    value = getattr(message, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return dict(value)
    return list(value) if field.is_repeated else value


def _message_to_dict(message: Any) -> dict[str, Any]:
    return {f.name: _field_value(message, f) for f in message.DESCRIPTOR.fields}


class _ResultBuilder:
    """Folds chunks into a GenerationResult, timing them from the builder's creation."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._ttft: float | None = None
        self._last: GenerationChunk | None = None
        self._prompt_ids: list[int] = []
        self._output_ids: list[int] = []
        self._texts: list[str] = []

    def add(self, chunk: GenerationChunk) -> None:
        if chunk.token_ids and self._ttft is None:
            self._ttft = time.perf_counter() - self._start
        self._prompt_ids = self._prompt_ids or chunk.prompt_token_ids
        self._output_ids.extend(chunk.token_ids)
        self._texts.append(chunk.text)
        self._last = chunk

    def result(self) -> GenerationResult:
        last = self._last
        return GenerationResult(
            prompt_ids=self._prompt_ids,
            output_ids=self._output_ids,
            text="".join(self._texts),
            finish_reason=last.finish_reason if last else None,
            usage=last.usage if last else None,
            ttft_s=self._ttft,
            elapsed_s=time.perf_counter() - self._start,
            request_id=last.request_id if last else "",
        )


_tracer = trace.get_tracer("nxserve.client")
_meter = metrics.get_meter("nxserve.client")
_operation_duration = _meter.create_histogram(
    "gen_ai.client.operation.duration",
    unit="s",
    description="Generate calls as the client saw them",
    explicit_bucket_boundaries_advisory=[0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92],
)
_token_usage = _meter.create_histogram(
    "gen_ai.client.token.usage",
    unit="{token}",
    description="Prompt and completion tokens of Generate calls",
    explicit_bucket_boundaries_advisory=[1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864],
)


@dataclass
class _Traced:
    """One Generate call's CLIENT span, its clock and what came back (for its attributes and metrics).
    Without an OpenTelemetry SDK in the process every part of it is a no-op."""

    span: trace.Span
    ctx: otel_context.Context
    start: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None

    def add(self, chunk: GenerationChunk) -> None:
        self.completion_tokens += len(chunk.token_ids)
        if chunk.prompt_token_ids:
            self.prompt_tokens = len(chunk.prompt_token_ids)
        if chunk.request_id:
            self.span.set_attribute("gen_ai.response.id", chunk.request_id)
        self.finish_reason = chunk.finish_reason or self.finish_reason

    def end(self, error: BaseException | None) -> None:
        attributes = {"gen_ai.operation.name": "text_completion", "gen_ai.provider.name": "nxserve"}
        if isinstance(error, grpc.RpcError):
            code = error.code()
            self.span.set_attributes({"rpc.grpc.status_code": code.value[0], "error.type": code.name})
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, f"{code.name}: {error.details()}"))
            attributes["error.type"] = code.name
        elif error is not None and not isinstance(error, GeneratorExit):
            self.span.record_exception(error)
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))
            attributes["error.type"] = type(error).__name__
        else:
            self.span.set_attribute("rpc.grpc.status_code", 1 if isinstance(error, GeneratorExit) else 0)
        self.span.set_attributes({"gen_ai.usage.input_tokens": self.prompt_tokens, "gen_ai.usage.output_tokens": self.completion_tokens})
        if self.finish_reason:
            self.span.set_attribute("gen_ai.response.finish_reasons", [self.finish_reason])
        self.span.end()
        _operation_duration.record(time.perf_counter() - self.start, attributes)
        _token_usage.record(self.prompt_tokens, {**attributes, "gen_ai.token.type": "input"})
        _token_usage.record(self.completion_tokens, {**attributes, "gen_ai.token.type": "output"})


class _Base:
    """What both clients share: target, default deadline, credentials and per-call metadata.

    `tls_ca` (a PEM file) makes the connection TLS, trusting that CA; `tls=True` trusts the
    system's roots instead. `api_key` is sent as `authorization: Bearer KEY` on every call."""

    def __init__(self, target: str, timeout: float | None, *, tls_ca: str | Path | None, tls: bool, api_key: str | None) -> None:
        self.target = target
        self.timeout = timeout
        self._credentials = None
        if tls_ca is not None or tls:
            self._credentials = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes() if tls_ca is not None else None)
        self._auth: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def _call_args(self, timeout: float | None, ctx: otel_context.Context | None = None, api_key: str | None = None) -> dict[str, Any]:
        """Deadline (the call's, else the client's), the API key (the call's, else the client's) and the
        trace context (`ctx`'s, else the active one)."""
        auth = (("authorization", f"Bearer {api_key}"),) if api_key else self._auth
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": auth + inject_metadata(ctx)}

    def _start(self, request: pb.GenerateRequest) -> _Traced:
        """The CLIENT span of a Generate call (a child of the caller's active span, if any) and its clock."""
        host, _, port = self.target.rpartition(":")
        span = _tracer.start_span(
            "generate",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "text_completion",
                "gen_ai.provider.name": "nxserve",
                "rpc.system": "grpc",
                "rpc.service": "nxserve.v1.Generation",
                "rpc.method": "Generate",
                "server.address": host,
                "server.port": int(port) if port.isdigit() else 0,
                "gen_ai.request.max_tokens": request.stopping.max_new_tokens,
                "gen_ai.request.temperature": request.sampling.temperature,
            },
        )
        if request.request_id:
            span.set_attribute("nxserve.request_id", request.request_id)
        return _Traced(span=span, ctx=trace.set_span_in_context(span), start=time.perf_counter())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"


class Client(_Base):
    """Blocking client. `timeout` is the default deadline of every call in seconds (None: none)."""

    def __init__(
        self, target: str, *, timeout: float | None = None, tls_ca: str | Path | None = None, tls: bool = False, api_key: str | None = None
    ) -> None:
        super().__init__(target, timeout, tls_ca=tls_ca, tls=tls, api_key=api_key)
        if self._credentials is None:
            self._channel = grpc.insecure_channel(target, options=RETRY_OPTIONS)
        else:
            self._channel = grpc.secure_channel(target, self._credentials, options=RETRY_OPTIONS)
        self._stub = pb_grpc.GenerationStub(self._channel)

    def generate(self, prompt: str | Sequence[int], *, timeout: float | None = None, **options: Unpack[GenerateOptions]) -> Iterator[GenerationChunk]:
        """Send the request now; iterating yields its chunks as they arrive.

        Leaving the iteration early cancels the request. Raises grpc.RpcError while iterating.
        """
        request = _build_request(prompt, **options)
        traced = self._start(request)
        call = self._stub.Generate(request, **self._call_args(timeout, traced.ctx))
        return self._chunks(call, traced)

    @staticmethod
    def _chunks(call: Any, traced: _Traced) -> Iterator[GenerationChunk]:
        error: BaseException | None = None
        try:
            for message in call:
                chunk = _chunk_from_pb(message)
                traced.add(chunk)
                yield chunk
        except BaseException as exc:
            error = exc
            raise
        finally:
            call.cancel()  # no-op once the stream has ended
            traced.end(error)

    def generate_text(self, prompt: str | Sequence[int], *, timeout: float | None = None, **options: Unpack[GenerateOptions]) -> GenerationResult:
        """Generate and wait for the whole completion."""
        builder = _ResultBuilder()
        for chunk in self.generate(prompt, timeout=timeout, **options):
            builder.add(chunk)
        return builder.result()

    def model_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The served model and its shapes (the fields of ModelInfoResponse)."""
        return _message_to_dict(self._stub.ModelInfo(pb.ModelInfoRequest(), **self._call_args(timeout)))

    def tokenize(self, text: str, add_special_tokens: bool = False, *, timeout: float | None = None) -> list[int]:
        """Token ids of `text` in the served model's tokenizer."""
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return list(self._stub.Tokenize(request, **self._call_args(timeout)).token_ids)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client (grpc.aio); create it inside the event loop that uses it.

    Each call also takes `api_key`, sent instead of the client's own for that call (a gateway
    passing its callers' keys through)."""

    def __init__(
        self, target: str, *, timeout: float | None = None, tls_ca: str | Path | None = None, tls: bool = False, api_key: str | None = None
    ) -> None:
        super().__init__(target, timeout, tls_ca=tls_ca, tls=tls, api_key=api_key)
        if self._credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=RETRY_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(target, self._credentials, options=RETRY_OPTIONS)
        self._stub = pb_grpc.GenerationStub(self._channel)

    def generate(
        self, prompt: str | Sequence[int], *, timeout: float | None = None, api_key: str | None = None, **options: Unpack[GenerateOptions]
    ) -> AsyncIterator[GenerationChunk]:
        """Send the request now; `async for` yields its chunks as they arrive.

        Leaving the iteration early cancels the request. Raises grpc.aio.AioRpcError while iterating.
        """
        request = _build_request(prompt, **options)
        traced = self._start(request)
        call = self._stub.Generate(request, **self._call_args(timeout, traced.ctx, api_key))
        return self._chunks(call, traced)

    @staticmethod
    async def _chunks(call: Any, traced: _Traced) -> AsyncIterator[GenerationChunk]:
        error: BaseException | None = None
        try:
            async for message in call:
                chunk = _chunk_from_pb(message)
                traced.add(chunk)
                yield chunk
        except BaseException as exc:
            error = exc
            raise
        finally:
            call.cancel()
            traced.end(error)

    async def generate_text(
        self, prompt: str | Sequence[int], *, timeout: float | None = None, api_key: str | None = None, **options: Unpack[GenerateOptions]
    ) -> GenerationResult:
        builder = _ResultBuilder()
        async for chunk in self.generate(prompt, timeout=timeout, api_key=api_key, **options):
            builder.add(chunk)
        return builder.result()

    async def model_info(self, *, timeout: float | None = None, api_key: str | None = None) -> dict[str, Any]:
        return _message_to_dict(await self._stub.ModelInfo(pb.ModelInfoRequest(), **self._call_args(timeout, api_key=api_key)))

    async def tokenize(self, text: str, add_special_tokens: bool = False, *, timeout: float | None = None, api_key: str | None = None) -> list[int]:
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return list((await self._stub.Tokenize(request, **self._call_args(timeout, api_key=api_key))).token_ids)

    async def serving(self, *, timeout: float | None = None) -> bool:
        """Whether the server's standard health check reports nxserve.v1.Generation SERVING (no API key needed)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        request = health_pb2.HealthCheckRequest(service="nxserve.v1.Generation")
        try:
            reply = await health_pb2_grpc.HealthStub(self._channel).Check(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
