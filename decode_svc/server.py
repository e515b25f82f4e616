"""The internal Decode gRPC service: receives a request's KV cache, runs it in the continuous
batch, streams tokens back. Protobuf is converted here (through `nxserve.rpc.convert`) and nowhere
else; errors are raised as `nxserve.rpc.errors` kinds, which the server's interceptor maps to
status codes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from opentelemetry import trace

from decode_svc.loop import Acked, DecodeJob, DecodeLoop, Event, Failed, Finished, Tokens
from nxcore import Engine, RequestRng, SamplingParams, StoppingCriteria
from nxserve.kv import DecodeRequests, KVReceiver, Layout, engine_layout
from nxserve.kv.codec import DecodeMessage, EmptyStream
from nxserve.rpc import validate
from nxserve.rpc.convert import FINISH_TO_PB
from nxserve.rpc.errors import InvalidRequest, ModelMismatch, NotReady, Overloaded, ServiceError
from nxserve.rpc.logs import access
from nxserve.rpc.metrics import DecodeMetrics
from nxserve.rpc.tracing import extract_context, record_error, span_in
from nxserve.rpc.validate import Limits
from nxserve.v1 import decode_pb2, decode_pb2_grpc

tracer = trace.get_tracer("nxserve.decode_svc")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Header:
    """A Decode header's fields, checked (`check_header`)."""

    request_id: str
    prompt_ids: list[int]
    first_token: int
    sampling: SamplingParams
    stopping: StoppingCriteria
    stop_strings: tuple[str, ...]
    rng_offset: int
    speculate: bool
    stream_interval: int = 1


def check_header(engine: Engine, header: decode_pb2.DecodeHeader, limits: Limits, *, draft: Engine | None = None) -> Header:
    """Every field of the header against this replica, before any KV is read: the model (ModelMismatch),
    the KV layouts (the draft's too), then the request's own fields (InvalidRequest)."""
    theirs = header.fingerprint
    mine = (engine.fingerprint, engine.model_config.model_type, engine.config.dtype)
    if (theirs.digest, theirs.architecture, theirs.dtype) != mine:
        raise ModelMismatch(
            f"model fingerprint mismatch: request has {theirs.architecture}/{theirs.dtype}/{theirs.digest}, "
            f"this decode replica serves {mine[1]}/{mine[2]}/{mine[0]}"
        )
    n_tokens = len(header.prompt_token_ids)
    if not 1 <= n_tokens < engine.config.seq_len:
        raise InvalidRequest(f"prompt of {n_tokens} tokens: allowed 1..{engine.config.seq_len - 1} (this replica's seq_len, less one)")
    expected = engine_layout(engine, n_tokens)
    if Layout.from_pb(header.layout) != expected:
        raise ModelMismatch(f"KV layout {Layout.from_pb(header.layout)} does not match this replica's {expected}")
    if header.HasField("draft_layout"):
        if draft is None:
            raise ModelMismatch(
                "the request carries draft-model KV, but this replica has no draft model: start it with the same "
                "--speculation draft:DIR as prefill, or prefill without it"
            )
        if Layout.from_pb(header.draft_layout) != engine_layout(draft, n_tokens):
            raise ModelMismatch(
                f"draft KV layout {Layout.from_pb(header.draft_layout)} does not match this replica's draft model {engine_layout(draft, n_tokens)}"
            )
    prompt_ids = validate.token_ids(header.prompt_token_ids, limits, field="prompt_token_ids", max_count=engine.config.seq_len - 1)
    [first_token] = validate.token_ids([header.first_token], limits, field="first_token", max_count=1)
    stopping, stop_strings = validate.stopping(header.stopping, limits)
    max_draws = 1 + engine.config.seq_len * (engine.config.speculation_length + 1)
    if header.rng_offset > max_draws:
        raise InvalidRequest(
            f"rng_offset={header.rng_offset} is more random numbers than a request can have drawn here: allowed "
            f"0..{max_draws} (1 + seq_len x (speculation_length + 1))"
        )
    return Header(
        request_id=validate.request_id(header.request_id, limits),
        prompt_ids=prompt_ids,
        first_token=first_token,
        sampling=validate.sampling(header.sampling, limits),
        stopping=stopping,
        stop_strings=stop_strings,
        rng_offset=header.rng_offset,
        speculate=not header.disable_speculation,
        stream_interval=max(1, validate.stream_interval(header.stream_interval, limits)),
    )


@dataclass
class _Stream:
    """One Decode stream, for its metrics and access line."""

    start: float
    """time.perf_counter() when it opened."""
    request_id: str = ""
    """From its header (none until the header came)."""
    job: DecodeJob | None = None
    finished: bool = False
    """Its final message was handed to gRPC: a cancel after it (prefill had all it needed) is no failure."""
    code: str = "OK"
    error_type: str = ""


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    """Registered before the server starts (so health answers while loading); `attach` makes it serve."""

    def __init__(self, *, kv: KVReceiver, model_name: str = "") -> None:
        self.kv = kv
        self.model_name = model_name
        self.metrics = DecodeMetrics()
        self.loop: DecodeLoop | None = None
        self.draining = False
        """SIGTERM came: new streams and load reports are refused (UNAVAILABLE), so prefill stops routing here."""

    def attach(self, loop: DecodeLoop, *, limits: Limits) -> None:
        self.limits = limits
        self.loop = loop

    def _ready(self) -> DecodeLoop:
        if self.loop is None:
            raise NotReady("the decode service is still loading its model: retry when health reports SERVING")
        if self.draining:
            raise NotReady("the decode replica is shutting down")
        return self.loop

    async def GetLoad(self, request: decode_pb2.GetLoadRequest, context: grpc.aio.ServicerContext) -> decode_pb2.GetLoadResponse:
        loop = self._ready()
        free, total, queued = loop.load()
        return decode_pb2.GetLoadResponse(
            free_slots=free,
            total_slots=total,
            queued_requests=queued,
            max_queue=loop.max_queue,
            fingerprint=loop.engine.fingerprint,
            completed_requests=loop.completed,
            steps=loop.steps,
            shm_probe=self.kv.probe_name,
            shared_kv_requests=self.kv.received["shm"],
            chunked_kv_requests=self.kv.received["chunks"],
        )

    async def Decode(
        self, request_iterator: AsyncIterator[DecodeMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[decode_pb2.DecodeResponse]:
        """Requests come decoded by `nxserve.kv.codec.parse_request` (chunks as `ChunkMessage`)."""
        loop = self._ready()
        parent = extract_context(context.invocation_metadata())
        requests = DecodeRequests(request_iterator)
        events: asyncio.Queue[Event] = asyncio.Queue()
        aio_loop = asyncio.get_running_loop()

        def emit(event: Event) -> None:
            aio_loop.call_soon_threadsafe(events.put_nowait, event)

        stream = _Stream(start=time.perf_counter())
        with span_in(tracer, "decode", parent=parent, kind=trace.SpanKind.SERVER, attributes={"gen_ai.request.model": self.model_name}) as (
            span,
            ctx,
        ):
            try:
                try:
                    stream.job = await self._receive(loop, requests, span, ctx, emit, stream)
                    loop.submit(stream.job)
                except EmptyStream:  # opened ahead, closed unused: nothing to answer
                    stream.code = ""
                    span.set_attribute("nxserve.unused", True)
                    return
                except ServiceError:
                    await requests.drain()  # see DecodeRequests: the sender must see this status
                    raise
                async for response in self._relay(events, span, stream):
                    yield response
            except BaseException as exc:  # GeneratorExit too: the caller left the stream
                if stream.finished and isinstance(exc, GeneratorExit | asyncio.CancelledError):
                    raise
                stream.code, stream.error_type = record_error(span, exc, context=context)
                raise
            finally:
                if stream.job is not None:
                    loop.cancel(stream.job)
                self._record(stream, span)

    def _record(self, stream: _Stream, span: trace.Span) -> None:
        """The stream's metrics and access line. A stream prefill opened ahead and closed before
        sending a header (its request ended at prefill) was no request: it is not counted."""
        seconds = time.perf_counter() - stream.start
        if not stream.request_id and stream.code in ("", "CANCELLED"):
            log.debug("a stream opened ahead closed unused after %.1f ms", seconds * 1000)
            return
        m, job = self.metrics, stream.job
        m.requests.add(1, {"rpc.grpc.status_code": stream.code})
        if job is not None and job.proposed:
            m.proposed.add(job.proposed)
            m.accepted.add(job.accepted)
        decoded = max(len(job.output_ids) - 1, 0) if job else 0
        access(
            "decode %s %s: %d tokens in %d steps, %.1f ms",
            stream.request_id or "-",
            stream.code,
            decoded,
            job.steps if job else 0,
            seconds * 1000,
            span=span,
            request_id=stream.request_id,
            status_code=stream.code,
            error_type=stream.error_type,
            decoded_tokens=decoded,
            steps=job.steps if job else 0,
            slot=job.slot if job else None,
            kv_transport=job.transport if job else "",
            duration_ms=round(seconds * 1000, 2),
            model=self.model_name,
        )

    async def _receive(self, loop: DecodeLoop, requests: DecodeRequests, span: trace.Span, ctx, emit, stream: _Stream) -> DecodeJob:
        """The header (prefill opens the stream before it encodes the prompt: it comes first),
        checked before any KV is read; then the KV it announces."""
        raw = await requests.header()
        header = check_header(loop.engine, raw, self.limits, draft=loop.draft)
        span.set_attribute("nxserve.request_id", header.request_id)
        stream.request_id = header.request_id
        if not loop.has_room():
            _, total, queued = loop.load()
            raise Overloaded(f"all {total} decode slots are busy and {queued} requests wait (max_queue={loop.max_queue})")
        transport = "shm" if raw.HasField("shared_kv") else "chunks"
        with span_in(tracer, "kv_receive", parent=ctx, attributes={"nxserve.kv_transport": transport}) as (kv_span, _):
            kv = await self.kv.receive(raw, requests)
            kv_span.set_attribute("nxserve.kv_bytes", kv.nbytes)
        return DecodeJob(
            transport=kv.transport,
            request_id=header.request_id,
            prompt_ids=header.prompt_ids,
            output_ids=[header.first_token],
            kv=kv,
            speculate=header.speculate,
            sampling=header.sampling,
            rng=RequestRng(header.sampling.seed, offset=header.rng_offset),
            stopping=header.stopping,
            stop_strings=header.stop_strings,
            stream_interval=header.stream_interval,
            emit=emit,
        )

    async def _relay(self, events: asyncio.Queue, span: trace.Span, stream: _Stream) -> AsyncIterator[decode_pb2.DecodeResponse]:
        """Ack, token batches, final; tokens that piled up since the last send go out as one batch."""
        while True:
            event = await events.get()
            pending = [event]
            while not events.empty():
                pending.append(events.get_nowait())
            tokens: list[int] = []
            rng_offset = 0
            for event in pending:
                if isinstance(event, Tokens):
                    tokens.extend(event.token_ids)
                    rng_offset = event.rng_offset
                    continue
                if tokens:
                    yield decode_pb2.DecodeResponse(tokens=decode_pb2.TokenBatch(token_ids=tokens, rng_offset=rng_offset))
                    tokens = []
                if isinstance(event, Acked):
                    span.set_attribute("nxserve.slot", event.slot)
                    span.add_event("kv_in_slot", {"queue_ms": event.queue_ms})
                    try:
                        yield decode_pb2.DecodeResponse(ack=decode_pb2.Ack(slot=event.slot, queue_ms=event.queue_ms))
                    finally:  # written, or the call is over: the decode loop waits for one or the other
                        event.sent.set()
                elif isinstance(event, Finished):
                    span.set_attributes(
                        {
                            "nxserve.decoded_tokens": event.decoded_tokens,
                            "nxserve.decode_steps": event.steps,
                            "nxserve.speculation.proposed_tokens": event.proposed,
                            "nxserve.speculation.accepted_tokens": event.accepted,
                            "nxserve.speculation.acceptance_rate": event.accepted / event.proposed if event.proposed else 0.0,
                            "nxserve.tokens_per_step": event.decoded_tokens / event.steps if event.steps else 0.0,
                        }
                    )
                    stream.finished = True
                    yield decode_pb2.DecodeResponse(
                        final=decode_pb2.DecodeFinal(
                            finish_reason=FINISH_TO_PB[event.reason],
                            decoded_tokens=event.decoded_tokens,
                            steps=event.steps,
                            proposed_tokens=event.proposed,
                            accepted_tokens=event.accepted,
                        )
                    )
                    return
                elif isinstance(event, Failed):
                    raise event.error
            if tokens:
                yield decode_pb2.DecodeResponse(tokens=decode_pb2.TokenBatch(token_ids=tokens, rng_offset=rng_offset))
