"""The internal Decode gRPC service: receives a request's KV cache, runs it in the continuous
batch, streams tokens back. Protobuf is converted here (through `nxserve.rpc.convert`) and nowhere
else; errors are raised as `nxserve.rpc.errors` kinds, which the server's interceptor maps to
status codes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from decode_svc.loop import Acked, DecodeJob, DecodeLoop, Event, Failed, Finished, Tokens
from nxcore import Engine, RequestRng
from nxserve.kv import DecodeRequests, KVReceiver
from nxserve.kv.codec import DecodeMessage
from nxserve.rpc.convert import FINISH_TO_PB, sampling_from_pb, stopping_from_pb
from nxserve.rpc.errors import ModelMismatch, NotReady, Overloaded, ServiceError
from nxserve.rpc.tracing import extract_context, span_in
from nxserve.v1 import decode_pb2, decode_pb2_grpc

tracer = trace.get_tracer("nxserve.decode_svc")


def check_header(engine: Engine, header: decode_pb2.DecodeHeader) -> None:
    """ModelMismatch unless this engine can take the header's KV."""
    theirs = header.fingerprint
    mine = (engine.fingerprint, engine.model_config.model_type, engine.config.dtype)
    if (theirs.digest, theirs.architecture, theirs.dtype) != mine:
        raise ModelMismatch(
            f"model fingerprint mismatch: request has {theirs.architecture}/{theirs.dtype}/{theirs.digest}, "
            f"this decode replica serves {mine[1]}/{mine[2]}/{mine[0]}"
        )
    cfg, lay = engine.model_config, header.layout
    expected = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, engine.config.dtype)
    got = (lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.dtype)
    if got != expected:
        raise ModelMismatch(f"KV layout mismatch: request has (layers, kv_heads, head_dim, dtype)={got}, this replica expects {expected}")
    if lay.n_tokens != len(header.prompt_token_ids):
        raise ModelMismatch(f"KV layout has {lay.n_tokens} tokens for a prompt of {len(header.prompt_token_ids)}")
    if lay.n_tokens >= engine.config.seq_len:
        raise ModelMismatch(f"prompt of {lay.n_tokens} tokens leaves no room in this replica's seq_len ({engine.config.seq_len})")


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    """Registered before the server starts (so health answers while loading); `attach` makes it serve."""

    def __init__(self, *, kv: KVReceiver) -> None:
        self.kv = kv
        self.loop: DecodeLoop | None = None

    def attach(self, loop: DecodeLoop) -> None:
        self.loop = loop

    def _ready(self) -> DecodeLoop:
        if self.loop is None:
            raise NotReady("the decode service is still loading its model: retry when health reports SERVING")
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

        job: DecodeJob | None = None
        with span_in(tracer, "decode", parent=parent, kind=trace.SpanKind.SERVER) as (span, ctx):
            try:
                try:
                    job = await self._receive(loop, requests, span, ctx, emit)
                    loop.submit(job)
                except ServiceError:
                    await requests.drain()  # see DecodeRequests: the sender must see this status
                    raise
                async for response in self._relay(events, span):
                    yield response
            finally:
                if job is not None:
                    loop.cancel(job)

    async def _receive(self, loop: DecodeLoop, requests: DecodeRequests, span: trace.Span, ctx, emit) -> DecodeJob:
        """The header (prefill opens the stream before it encodes the prompt: it comes first),
        checked before any KV is read; then the KV it announces."""
        header = await requests.header()
        span.set_attribute("nxserve.request_id", header.request_id)
        check_header(loop.engine, header)
        if not loop.has_room():
            _free, total, queued = loop.load()
            raise Overloaded(f"all {total} decode slots are busy and {queued} requests wait (max_queue={loop.max_queue})")
        transport = "shm" if header.HasField("shared_kv") else "chunks"
        with span_in(tracer, "kv_receive", parent=ctx, attributes={"nxserve.kv_transport": transport}) as (kv_span, _):
            kv = await self.kv.receive(header, requests)
            kv_span.set_attribute("nxserve.kv_bytes", kv.nbytes)
        stopping, stop_strings = stopping_from_pb(header.stopping)
        sampling = sampling_from_pb(header.sampling)
        return DecodeJob(
            request_id=header.request_id,
            prompt_ids=list(header.prompt_token_ids),
            output_ids=[header.first_token],
            kv=kv,
            speculate=not header.disable_speculation,
            sampling=sampling,
            rng=RequestRng(sampling.seed, offset=header.rng_offset),
            stopping=stopping,
            stop_strings=stop_strings,
            emit=emit,
        )

    async def _relay(self, events: asyncio.Queue, span: trace.Span) -> AsyncIterator[decode_pb2.DecodeResponse]:
        """Ack, token batches, final; tokens that piled up since the last send go out as one batch."""
        while True:
            event = await events.get()
            pending = [event]
            while not events.empty():
                pending.append(events.get_nowait())
            tokens: list[int] = []
            for event in pending:
                if isinstance(event, Tokens):
                    tokens.extend(event.token_ids)
                    continue
                if tokens:
                    yield decode_pb2.DecodeResponse(tokens=decode_pb2.TokenBatch(token_ids=tokens))
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
                yield decode_pb2.DecodeResponse(tokens=decode_pb2.TokenBatch(token_ids=tokens))
