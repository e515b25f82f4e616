"""The public Generation service: validate, encode the prompt, hand the KV to a decode replica,
relay tokens and text. Protobuf is converted here (through `nxserve.rpc.convert`) and nowhere else;
errors are raised as `nxserve.rpc.errors` kinds, which the server's interceptor maps to status codes.

A Generate call, in order:

1. `_prepare`: the request's fields, validated (`InvalidRequest`).
2. `_open_decode`: a Decode stream opened on the least-loaded replica before context encoding,
   so setting it up on both sides (~0.7 ms measured here) overlaps the encoding.
3. `_prefill`: the prompt queued for the worker, encoded, its first token sampled in the graph.
4. `_hand_off`: the KV sent on that stream, or on the next replica while replicas are full or fail.
5. `_relay`: the replica's tokens relayed as they come, with text that never splits a character.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from nxcore import Engine, RequestRng, SamplingParams, StoppingCriteria
from nxcore.detokenizer import IncrementalDetokenizer
from nxcore.generate import GenerationResult
from nxcore.stopping import FinishReason, finish_reason
from nxserve.kv import KVSender
from nxserve.rpc import validate
from nxserve.rpc.convert import FINISH_FROM_PB, FINISH_TO_PB, decode_header, fingerprint_pb
from nxserve.rpc.errors import (
    Cancelled,
    DeadlineExceeded,
    EngineFailure,
    Internal,
    InvalidRequest,
    NoReplica,
    NotReady,
    Overloaded,
    ReplicaFailed,
    ServiceError,
    SharedMemoryUnreadable,
    Unauthenticated,
    Unsupported,
)
from nxserve.rpc.logs import access
from nxserve.rpc.metrics import OPERATION, PROVIDER, PrefillMetrics
from nxserve.rpc.status import error_of_call
from nxserve.rpc.tracing import extract_context, inject_metadata, record_error, span_in
from nxserve.rpc.validate import Limits
from nxserve.v1 import decode_pb2, generation_pb2_grpc
from nxserve.v1 import generation_pb2 as pb
from prefill_svc.router import DecodeRouter, Replica
from prefill_svc.worker import PrefillResult, PrefillWorker

log = logging.getLogger(__name__)
tracer = trace.get_tracer("nxserve.prefill_svc")


@dataclass
class Request:
    """One Generate call's state, from its validated fields to the tokens relayed so far."""

    id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stopping: StoppingCriteria
    stop_strings: tuple[str, ...]
    disable_speculation: bool
    rng: RequestRng
    stream_interval: int = 1
    """Tokens per message from decode at least: the request's stream_interval or the service's, the larger."""
    ctx: otel_context.Context = field(default_factory=otel_context.Context)
    """The trace context of its `generate` span: child spans go under it."""
    timeout: float | None = None
    """Seconds left to the caller's deadline when the call came in (None: none)."""
    result: GenerationResult = field(init=False)
    detok: IncrementalDetokenizer | None = None
    rng_offset: int = 0
    """Random numbers the request's stream has drawn by its latest token (from decode's token batches)."""
    moved: bool = False
    """It moved to another decode replica at least once (`_migrate`)."""
    finished: FinishReason | None = None
    """Why the tokens relayed so far already end it (the replica's final message may still come):
    a replica lost after that has nothing left to generate, so the request ends, it does not move."""
    replica: str = ""
    """The decode replica holding it (the last one, after moves)."""
    kv_transport: str = ""
    migrations: int = 0

    def __post_init__(self) -> None:
        self.result = GenerationResult(prompt_ids=self.prompt_ids)


@dataclass
class Outcome:
    """How a Generate call went, for its metrics and access line."""

    start: float
    """time.perf_counter() at arrival."""
    first_token_at: float | None = None
    code: str = "OK"
    """The gRPC status code's name it ended with."""
    error_type: str = ""
    """The error kind (nxserve.rpc.errors), when it failed."""
    request_id: str = ""
    """The request's id, once it was read (the first field checked: a refused request has one too)."""
    request: Request | None = None
    """Its fields, once they were read."""


@dataclass
class Opened:
    """A Decode stream opened ahead of the KV (see `_open_decode`)."""

    replica: Replica
    call: grpc.aio.StreamStreamCall


def _ns(monotonic_s: float) -> int:
    """A time.monotonic() instant as epoch nanoseconds, for spans recorded after the fact."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


class Lost(Exception):
    """The replica holding a request failed it (not the caller's own deadline or cancel): move it."""

    def __init__(self, replica: Replica, error: ServiceError) -> None:
        super().__init__(str(error))
        self.replica, self.error = replica, error


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    """Registered before the server starts (so health answers while loading); `attach` makes it serve."""

    def __init__(self, *, model_name: str, max_migrations: int = 2, stall_timeout_s: float = 15.0, stream_interval: int = 1) -> None:
        self.model_name = model_name
        self.stream_interval = stream_interval
        """Generated tokens per message at least, for every request (--stream-interval; a request may ask for more)."""
        self.engine: Engine | None = None
        self.max_migrations = max_migrations
        """How often one request may move to another decode replica (--max-migrations)."""
        self.stall_timeout_s = stall_timeout_s
        """A replica that sends no token for this long has failed the request (--stall-timeout-s)."""
        self.migrations = 0
        self.metrics = PrefillMetrics()
        self.draining = False
        """SIGTERM came: new requests are refused (UNAVAILABLE) while running ones finish."""

    def attach(self, *, engine: Engine, worker: PrefillWorker, router: DecodeRouter, tokenizer, kv: KVSender, limits: Limits) -> None:
        self.limits = limits
        self.worker = worker
        self.metrics.observe(queue_depth=worker.queued, replicas_routable=lambda: len(router.usable()))
        self.router = router
        self.kv = kv
        self.tokenizer = tokenizer
        self.engine = engine

    def _ready(self) -> Engine:
        if self.engine is None:
            raise NotReady("the prefill service is still loading its model: retry when health reports SERVING")
        return self.engine

    def _accepting(self) -> Engine:
        engine = self._ready()
        if self.draining:
            raise NotReady("the prefill service is shutting down: send the request to another one")
        return engine

    # ------------------------------------------------------------------ small RPCs

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        engine = self._ready()
        cfg, mc = engine.config, engine.model_config
        return pb.ModelInfoResponse(
            model=self.model_name,
            architecture=mc.model_type,
            dtype=cfg.dtype,
            buckets=list(cfg.buckets),
            batch_size=max((r.total_slots for r in self.router.usable()), default=0),
            ctx_batch_size=cfg.ctx_batch_size,
            max_prompt_tokens=cfg.max_prompt_len,
            max_total_tokens=cfg.seq_len,
            vocab_size=mc.vocab_size,
            decode_replicas=len(self.router.replicas),
            kv_regions_held=self.kv.arena.regions_held if self.kv.arena else 0,
            migrations=self.migrations,
            fingerprint=engine.fingerprint,
            decode_replicas_up=len(self.router.usable()),
            batch_invariant=cfg.batch_invariant,
            chat_template=self.tokenizer.chat_template or "",
            special_tokens=self.tokenizer.special_tokens if self.tokenizer.chat_template else {},
        )

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        self._ready()
        ids = await self._tokenize(validate.text(request.text, self.limits, field="text"), add_special_tokens=request.add_special_tokens)
        return pb.TokenizeResponse(token_ids=ids, tokens=self.tokenizer.tokens_of(ids))

    # ------------------------------------------------------------------ Generate

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        """The call's telemetry around `_generate`: the span (its GenAI attributes, and the status
        code it ends with), the metrics and the access line."""
        call = Outcome(start=time.perf_counter())
        parent = extract_context(context.invocation_metadata())
        attributes = {"gen_ai.operation.name": OPERATION, "gen_ai.provider.name": PROVIDER, "gen_ai.request.model": self.model_name}
        with span_in(tracer, "generate", parent=parent, kind=trace.SpanKind.SERVER, attributes=attributes) as (span, ctx):
            try:
                async for response in self._generate(request, context, span, ctx, call):
                    if call.first_token_at is None and response.token_ids:
                        call.first_token_at = time.perf_counter()
                    yield response
            except BaseException as exc:  # GeneratorExit too: the caller left the stream
                call.code, call.error_type = record_error(span, exc, context=context)
                raise
            finally:
                self._record(call, span)

    async def _generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, span: trace.Span, ctx: otel_context.Context, call: Outcome
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Prepare, encode, hand off, relay (the module's docstring has the steps)."""
        self._accepting()
        call.request_id = validate.request_id(request.request_id, self.limits)
        span.set_attributes({"nxserve.request_id": call.request_id, "gen_ai.response.id": call.request_id})
        req = await self._prepare(request, call.request_id)
        call.request = req
        req.ctx, req.timeout = ctx, context.time_remaining()
        sampling, stopping = req.sampling, req.stopping
        span.set_attributes(
            {
                "gen_ai.request.max_tokens": stopping.max_new_tokens,
                "gen_ai.request.temperature": sampling.temperature,
                "gen_ai.request.top_p": sampling.top_p,
                "gen_ai.request.top_k": sampling.top_k,
                "gen_ai.request.seed": sampling.seed or 0,
                "gen_ai.usage.input_tokens": len(req.prompt_ids),
            }
        )
        opened = self._open_decode(req)
        prefill = None
        try:
            prefill = await self._prefill(req)
            first = pb.GenerateResponse(request_id=req.id, prompt_token_ids=req.prompt_ids)
            reason = self._add_tokens(req, first, [prefill.first_token])
            if reason is not None:
                yield self._finalize(req, first, reason, span)
                return
            yield first
            replica, decode_call = await self._hand_off(req, prefill, opened)
            prefill.kv.release()  # decode holds the KV now: free prefill's copies
            async for response in self._stream(req, replica, decode_call, span):
                yield response
        finally:
            if prefill is not None:
                prefill.kv.release()  # its arena region, unless the hand-off did
            if opened is not None:
                opened.call.cancel()  # no-op once the call is over; frees it when no KV was sent

    def _record(self, call: Outcome, span: trace.Span) -> None:
        """The request's metrics and access line, once it ended (well or not)."""
        end = time.perf_counter()
        duration = end - call.start
        req = call.request
        attributes: dict[str, str] = {"gen_ai.operation.name": OPERATION, "gen_ai.provider.name": PROVIDER, "gen_ai.request.model": self.model_name}
        if call.error_type:
            attributes["error.type"] = call.error_type
        m = self.metrics
        m.request_duration.record(duration, attributes)
        m.requests.add(1, {"rpc.grpc.status_code": call.code})
        prompt_tokens = len(req.prompt_ids) if req else 0
        completion_tokens = len(req.result.output_ids) if req else 0
        m.tokens.add(prompt_tokens, {**attributes, "gen_ai.token.type": "input"})
        m.tokens.add(completion_tokens, {**attributes, "gen_ai.token.type": "output"})
        ttft = call.first_token_at - call.start if call.first_token_at is not None else None
        if call.code == "OK" and ttft is not None:
            m.time_to_first_token.record(ttft, attributes)
            if completion_tokens > 1 and call.first_token_at is not None:
                m.time_per_output_token.record((end - call.first_token_at) / (completion_tokens - 1), attributes)
        access(
            "request %s %s: %d prompt + %d completion tokens in %.1f ms",
            call.request_id or "-",
            call.code,
            prompt_tokens,
            completion_tokens,
            duration * 1000,
            span=span,
            request_id=call.request_id,
            status_code=call.code,
            error_type=call.error_type,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            ttft_ms=round(ttft * 1000, 2) if ttft is not None else None,
            duration_ms=round(duration * 1000, 2),
            decode_replica=req.replica if req else "",
            kv_transport=req.kv_transport if req else "",
            migrations=req.migrations if req else 0,
            model=self.model_name,
        )

    async def _prepare(self, request: pb.GenerateRequest, request_id: str) -> Request:
        """The request's fields (its id, already checked), every one checked against `self.limits`
        before any work; a text prompt is bounded in bytes first, then tokenized off the event loop."""
        limits = self.limits
        sampling = validate.sampling(request.sampling, limits)
        stopping, stop_strings = validate.stopping(request.stopping, limits)
        stream_interval = max(validate.stream_interval(request.stream_interval, limits), self.stream_interval)
        kind = request.WhichOneof("prompt")
        if kind == "text":
            prompt_ids = await self._tokenize(validate.text(request.text, limits, field="text"))
        elif kind == "token_ids":
            prompt_ids = list(request.token_ids.ids)
        else:
            raise InvalidRequest("no prompt: set text or token_ids")
        prompt_ids = validate.prompt_ids(prompt_ids, limits)
        rng = RequestRng(sampling.seed)
        return Request(
            id=request_id,
            prompt_ids=prompt_ids,
            sampling=dataclasses.replace(sampling, seed=rng.seed),
            stopping=stopping,
            stop_strings=stop_strings,
            disable_speculation=request.disable_speculation,
            stream_interval=stream_interval,
            rng=rng,
            detok=IncrementalDetokenizer(self.tokenizer, stop_strings=stop_strings),
        )

    async def _tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a (bounded) text, computed on a worker thread: tokenizing on the event loop
        stalled every other stream and the health checks for as long as it took."""
        if not self.tokenizer.has_text:
            raise Unsupported(f"{self.model_name} has no tokenizer files: send token ids instead of text")
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    def _open_decode(self, req: Request, exclude: set[str] = frozenset(), busy: list[str] | None = None) -> Opened | None:  # type: ignore[assignment]
        """A Decode stream on the least-loaded replica not in `exclude`; None when there is none now,
        or, from a hand-off (`busy` given), Overloaded when the replicas that could take it are full."""
        try:
            replica = self.router.pick(exclude)
        except NoReplica:
            if busy is None:
                return None
            if busy:
                raise Overloaded("; ".join(busy)) from None
            raise
        return Opened(replica, replica.stub.Decode(metadata=inject_metadata(req.ctx), timeout=req.timeout))

    async def _prefill(self, req: Request) -> PrefillResult:
        result = await self._encode(req.prompt_ids, req.sampling, req.rng)
        req.rng_offset = req.rng.offset
        self.metrics.queue_time.record(result.started_at - result.enqueued_at)
        queue_span = tracer.start_span("queue", context=req.ctx, start_time=_ns(result.enqueued_at))
        queue_span.end(end_time=_ns(result.started_at))
        encode_span = tracer.start_span(
            "context_encoding",
            context=req.ctx,
            start_time=_ns(result.started_at),
            attributes={"nxserve.batch": result.batch, "nxserve.prompt_tokens": len(req.prompt_ids)},
        )
        encode_span.end(end_time=_ns(result.finished_at))
        return result

    async def _encode(self, prompt_ids: list[int], sampling: SamplingParams, rng: RequestRng) -> PrefillResult:
        """The worker's context encoding of `prompt_ids`, its KV released if the call is cancelled."""
        future = self.worker.submit(prompt_ids, sampling, rng)
        try:
            result: PrefillResult = await future
        except asyncio.CancelledError:  # the result may have come with the cancellation: its KV
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().kv.release()
            raise
        finally:
            future.cancel()
        return result

    def _header(self, req: Request) -> decode_pb2.DecodeHeader:
        """The Decode header of the request as it stands: its prompt and every generated token but
        the last as the context the KV covers, the last as the token to feed next, the random
        stream's position, and what is left of max_new_tokens. At the first hand-off that is the
        prompt and the token context encoding sampled; after a migration, everything so far."""
        engine = self._ready()
        output = req.result.output_ids
        return decode_header(
            request_id=req.id,
            prompt_ids=[*req.prompt_ids, *output[:-1]],
            sampling=req.sampling,
            stopping=dataclasses.replace(req.stopping, max_new_tokens=req.stopping.max_new_tokens - (len(output) - 1)),
            stop_strings=req.stop_strings,
            first_token=output[-1],
            rng_offset=req.rng_offset,
            fingerprint=fingerprint_pb(digest=engine.fingerprint, architecture=engine.model_config.model_type, dtype=engine.config.dtype),
            disable_speculation=req.disable_speculation,
            stream_interval=req.stream_interval,
        )

    async def _hand_off(
        self, req: Request, prefill: PrefillResult, opened: Opened | None, tried: set[str] | None = None
    ) -> tuple[Replica, grpc.aio.StreamStreamCall]:
        """Send the KV on `opened` while its replica is usable, else on a stream opened now on the
        least-loaded replica not `tried`; then on the others in turn while they are full
        (Overloaded once all are) or fail (marked down). A replica that cannot read the arena gets
        the KV again as chunks. Returns the replica and its call once it acknowledged the KV."""
        header = self._header(req)
        tried = set(tried or ())
        busy: list[str] = []
        while True:
            if opened is None or opened.replica not in self.router.usable():
                if opened is not None:
                    opened.call.cancel()
                opened = self._open_decode(req, tried, busy)
            assert opened is not None
            replica, call = opened.replica, opened.call
            opened = None  # used once: a retry opens a new stream
            tried.add(replica.target)
            try:
                with span_in(tracer, "kv_transfer", parent=req.ctx, attributes={"nxserve.decode_replica": replica.target}) as (span, _):
                    sent = await self.kv.send(call, header, prefill.kv, shared_memory=replica.shm, peer=replica.name)
                    span.set_attributes(
                        {
                            "nxserve.kv_transport": sent.transport,
                            "nxserve.kv_bytes": sent.bytes_sent,
                            "nxserve.kv_transfer_ms": sent.seconds * 1000,
                            "nxserve.decode_queue_ms": sent.queue_ms,
                            "nxserve.decode_slot": sent.slot,
                            "nxserve.kv_gbps": sent.bytes_sent / max(sent.seconds, 1e-9) / 1e9,
                        }
                    )
                transport = {"nxserve.kv.transport": sent.transport}
                self.metrics.kv_bytes.add(sent.bytes_sent, transport)
                self.metrics.kv_time.record(sent.seconds, transport)
                req.replica, req.kv_transport = replica.target, sent.transport
                return replica, call
            except SharedMemoryUnreadable as exc:
                self.router.shm_failed(replica, str(exc))
                tried.discard(replica.target)  # again, with chunks
            except Overloaded as exc:
                busy.append(str(exc))
            except (ReplicaFailed, NotReady, EngineFailure, Internal) as exc:
                # Internal: the replica's own fault, or its process died mid-stream and the transport
                # ended the call with INTERNAL (an RST_STREAM, no status of ours): as `_relay`, the
                # request goes to another replica.
                self.router.mark_down(replica, str(exc))

    async def _stream(self, req: Request, replica: Replica, call: grpc.aio.StreamStreamCall, span: trace.Span) -> AsyncIterator[pb.GenerateResponse]:
        """`_relay` from the replica holding the request; when it fails, the request moves to
        another one (`_migrate`), at most --max-migrations times, and the client's stream goes on."""
        migrations = 0
        while True:
            try:
                async for response in self._relay(req, replica, call, span):
                    yield response
                return
            except Lost as lost:
                if req.finished is not None:  # the last tokens ended it: nothing to move
                    yield self._finalize(req, pb.GenerateResponse(request_id=req.id), req.finished, span)
                    return
                if migrations >= self.max_migrations:
                    raise ReplicaFailed(
                        f"{lost.error}; the request was moved {migrations} time(s) already (--max-migrations={self.max_migrations})"
                    ) from None
                migrations += 1
                replica, call = await self._migrate(req, lost, migrations)

    async def _relay(self, req: Request, replica: Replica, call: grpc.aio.StreamStreamCall, span: trace.Span) -> AsyncIterator[pb.GenerateResponse]:
        """The replica's token batches as responses, then the final one. A failure the replica's
        (its stream broke, it ended without a final, it shut down, no token for --stall-timeout-s)
        is `Lost`; the caller's own (deadline, cancel) goes to the client."""
        try:
            with span_in(tracer, "decoding", parent=req.ctx, attributes={"nxserve.decode_replica": replica.target}):
                while True:
                    try:  # call.read, not iteration: the ack was read with it; asyncio.timeout, not wait_for,
                        # which wrapped every token's read in a task of its own (a pass of the event loop more)
                        async with asyncio.timeout(self.stall_timeout_s):
                            message = await call.read()
                    except TimeoutError:
                        raise Lost(
                            replica, ReplicaFailed(f"{replica.name} sent no token for {self.stall_timeout_s:g} s (--stall-timeout-s)")
                        ) from None
                    if message is grpc.aio.EOF:
                        raise Lost(replica, ReplicaFailed(f"{replica.name} closed the stream without a final message"))
                    kind = message.WhichOneof("kind")
                    if kind == "tokens":
                        response = pb.GenerateResponse(request_id=req.id)
                        reason = self._add_tokens(req, response, list(message.tokens.token_ids))
                        req.rng_offset = message.tokens.rng_offset or req.rng_offset
                        req.finished = reason
                        if reason == FinishReason.STOP and req.moved:  # a stop string across the move: only this side saw all the text
                            yield self._finalize(req, response, reason, span)
                            return
                        yield response
                    elif kind == "final":
                        f = message.final
                        span.set_attributes(
                            {
                                "nxserve.decode_steps": f.steps,
                                "nxserve.speculation.proposed_tokens": f.proposed_tokens,
                                "nxserve.speculation.accepted_tokens": f.accepted_tokens,
                                "nxserve.speculation.acceptance_rate": f.accepted_tokens / f.proposed_tokens if f.proposed_tokens else 0.0,
                                "nxserve.tokens_per_step": f.decoded_tokens / f.steps if f.steps else 0.0,
                            }
                        )
                        yield self._finalize(req, pb.GenerateResponse(request_id=req.id), FINISH_FROM_PB[f.finish_reason], span)
                        return
        except grpc.aio.AioRpcError:
            error: ServiceError = await error_of_call(call, peer=replica.name)
            if isinstance(error, DeadlineExceeded | Cancelled | InvalidRequest | Unauthenticated):
                raise error from None
            raise Lost(replica, error) from None
        finally:
            call.cancel()

    async def _migrate(self, req: Request, lost: Lost, attempt: int) -> tuple[Replica, grpc.aio.StreamStreamCall]:
        """Move the request to another replica: encode its prompt and every generated token but the
        last into new KV (greedy with a throwaway random stream: the token it samples is not used),
        and hand that over with the request's own random stream where the lost replica left it."""
        if not isinstance(lost.error, EngineFailure):
            self.router.mark_down(lost.replica, str(lost.error))
        context = [*req.prompt_ids, *req.result.output_ids[:-1]]
        if len(context) > self.limits.max_prompt_tokens:
            raise ReplicaFailed(
                f"{lost.error}; the request cannot move: its {len(context)} tokens exceed the largest context "
                f"bucket ({self.limits.max_prompt_tokens})"
            ) from None
        log.warning("request %s: %s; moving it with %d generated token(s) (move %d)", req.id, lost.error, len(req.result.output_ids), attempt)
        attributes = {
            "nxserve.from_replica": lost.replica.target,
            "nxserve.reason": str(lost.error)[:200],
            "nxserve.generated_tokens": len(req.result.output_ids),
            "nxserve.migration": attempt,
        }
        with span_in(tracer, "migration", parent=req.ctx, attributes=attributes) as (span, _):
            encoded = await self._encode(context, SamplingParams(), RequestRng(0))
            try:
                req.moved = True
                replica, call = await self._hand_off(req, encoded, None, tried={lost.replica.target})
            finally:
                encoded.kv.release()
            span.set_attribute("nxserve.to_replica", replica.target)
        self.migrations += 1
        req.migrations += 1
        self.metrics.migrations.add(1)
        return replica, call

    def _add_tokens(self, req: Request, response: pb.GenerateResponse, tokens: list[int]) -> FinishReason | None:
        """Put `tokens` and their text into `response`; why the request ends with them (None: it goes on)."""
        assert req.detok is not None
        req.result.output_ids.extend(tokens)
        response.token_ids.extend(tokens)
        response.text = req.detok.add(tokens)
        engine = self._ready()
        if req.detok.stopped:
            return FinishReason.STOP
        return finish_reason(
            req.result.output_ids,
            prompt_len=len(req.prompt_ids),
            stopping=req.stopping,
            eos_token_ids=engine.model_config.eos_token_ids,
            seq_len=engine.config.seq_len,
        )

    def _finalize(self, req: Request, response: pb.GenerateResponse, reason: FinishReason, span: trace.Span) -> pb.GenerateResponse:
        assert req.detok is not None
        response.text += req.detok.flush()
        response.finish_reason = FINISH_TO_PB[reason]
        response.usage.prompt_tokens = len(req.prompt_ids)
        response.usage.completion_tokens = len(req.result.output_ids)
        span.set_attributes(
            {
                "gen_ai.usage.output_tokens": len(req.result.output_ids),
                "gen_ai.response.finish_reasons": [str(reason)],
                "gen_ai.response.model": self.model_name,
            }
        )
        return response
