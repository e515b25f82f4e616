"""The internal Decode gRPC service: receives a request's KV cache, runs it in the continuous
batch, streams tokens back. Protobuf is converted here and nowhere else."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NoReturn

import grpc
from opentelemetry import trace

from decode_svc.loop import Acked, DecodeJob, DecodeLoop, Event, Failed, Finished, QueueFull, Tokens
from nxcore import Engine, RequestRng
from nxcore.kv_cache import KVSnapshot
from nxcore.kv_wire import (
    KVAssembler, KVTransferError, Layout, SharedKV, SharedKVReader, SharedKVUnreadable, SharedRegion, valid_arena_name,
)
from nxserve.decode_codec import SHM_UNREADABLE, DecodeMessage, message_kind
from nxserve.grpc_common import FINISH_TO_PB, sampling_from_pb, stopping_from_pb
from nxserve.tracing import extract_context, span_in
from nxserve.v1 import decode_pb2, decode_pb2_grpc

log = logging.getLogger(__name__)
tracer = trace.get_tracer("nxserve.decode_svc")


def fingerprint_pb(engine: Engine) -> decode_pb2.ModelFingerprint:
    return decode_pb2.ModelFingerprint(
        digest=engine.fingerprint, architecture=engine.model_config.model_type, dtype=engine.config.dtype
    )


def layout_mismatch(engine: Engine, header: decode_pb2.DecodeHeader) -> str | None:
    """Why this engine cannot take the header's KV, or None."""
    mine = fingerprint_pb(engine)
    theirs = header.fingerprint
    if (theirs.digest, theirs.architecture, theirs.dtype) != (mine.digest, mine.architecture, mine.dtype):
        return (
            f"model fingerprint mismatch: request has {theirs.architecture}/{theirs.dtype}/{theirs.digest}, "
            f"this decode replica serves {mine.architecture}/{mine.dtype}/{mine.digest}"
        )
    cfg, lay = engine.model_config, header.layout
    expected = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, engine.config.dtype)
    got = (lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.dtype)
    if got != expected:
        return f"KV layout mismatch: request has (layers, kv_heads, head_dim, dtype)={got}, this replica expects {expected}"
    if lay.n_tokens != len(header.prompt_token_ids):
        return f"KV layout has {lay.n_tokens} tokens for a prompt of {len(header.prompt_token_ids)}"
    if lay.n_tokens >= engine.config.seq_len:
        return f"prompt of {lay.n_tokens} tokens leaves no room in this replica's seq_len ({engine.config.seq_len})"
    return None


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    """Registered before the server starts (so health answers while loading); `attach` makes it serve."""

    def __init__(self, *, shm_dir: Path | None = None) -> None:
        self.loop: DecodeLoop | None = None
        self.engine: Engine | None = None
        self.shared = SharedKVReader(shm_dir) if shm_dir is not None else None
        """Reads KV out of the arenas senders on this host keep in shm_dir (DecodeHeader.shared_kv);
        None: chunks only."""
        self.shm_probe = ""
        """The file advertised in GetLoad (created in the shared directory by the service once serving)."""
        self.shared_kv_requests = 0
        self.chunked_kv_requests = 0

    def attach(self, loop: DecodeLoop) -> None:
        self.loop, self.engine = loop, loop.engine

    async def _require_ready(self, context: grpc.aio.ServicerContext) -> None:
        if self.loop is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the decode service is still loading its model: retry when health reports SERVING")

    async def GetLoad(self, request: decode_pb2.GetLoadRequest, context: grpc.aio.ServicerContext) -> decode_pb2.GetLoadResponse:
        await self._require_ready(context)
        free, total, queued = self.loop.load()
        return decode_pb2.GetLoadResponse(
            free_slots=free, total_slots=total, queued_requests=queued, max_queue=self.loop.max_queue,
            fingerprint=self.engine.fingerprint, completed_requests=self.loop.completed, steps=self.loop.steps,
            shm_probe=self.shm_probe, shared_kv_requests=self.shared_kv_requests, chunked_kv_requests=self.chunked_kv_requests,
        )

    async def Decode(
        self, request_iterator: AsyncIterator[DecodeMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[decode_pb2.DecodeResponse]:
        """Requests come decoded by `nxserve.decode_codec.parse_request` (chunks as `ChunkMessage`)."""
        await self._require_ready(context)
        parent = extract_context(context.invocation_metadata())
        # Prefill opens the stream before it encodes the prompt: the request starts with its header.
        first = await anext(aiter(request_iterator), None)
        events: asyncio.Queue[Event] = asyncio.Queue()
        aio_loop = asyncio.get_running_loop()

        def emit(event: Event) -> None:
            aio_loop.call_soon_threadsafe(events.put_nowait, event)

        job: DecodeJob | None = None
        with span_in(tracer, "decode", parent=parent, kind=trace.SpanKind.SERVER) as (span, ctx):
            try:
                job = await self._receive(first, request_iterator, context, span, emit, ctx)
                try:
                    self.loop.submit(job)
                except QueueFull as exc:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
                async for response in self._relay(events, context, span):
                    yield response
            finally:
                if job is not None:
                    self.loop.cancel(job)

    async def _receive(self, first, requests, context, span, emit, ctx) -> DecodeJob:  # noqa: ANN001
        """Header (`first`, the stream's first message), checked before any KV is assembled (a
        rejected request's chunks are read and dropped, then the stream aborts: see `_reject`);
        then chunks and the commit, or, after a header naming a shared-memory region, nothing more."""
        if first is None or message_kind(first) != "header":
            await _reject(requests, context, grpc.StatusCode.INVALID_ARGUMENT, "a Decode stream must start with a header",
                          drain=first is not None and message_kind(first) != "commit")
        header = first.header
        span.set_attribute("nxserve.request_id", header.request_id)
        shm = header.HasField("shared_kv")
        drain = not shm  # a shared-memory header is the whole request
        problem = layout_mismatch(self.engine, header)
        if problem:
            await _reject(requests, context, grpc.StatusCode.FAILED_PRECONDITION, problem, drain=drain)
        if not self.loop.has_room():
            _, total, queued = self.loop.load()
            await _reject(
                requests, context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"all {total} decode slots are busy and {queued} requests wait (max_queue={self.loop.max_queue})",
                drain=drain,
            )
        shared = None
        if shm:
            ref = header.shared_kv
            shared = SharedRegion(name=ref.name, offset=ref.offset, nbytes=ref.nbytes, crc32=ref.crc32)
            if self.shared is None:
                await _reject(requests, context, grpc.StatusCode.FAILED_PRECONDITION,
                              "this decode replica takes KV as chunks only (no --kv-shm-dir, or not writable)",
                              drain=False, trailing_metadata=SHM_UNREADABLE)
            if not valid_arena_name(shared.name):
                await _reject(requests, context, grpc.StatusCode.INVALID_ARGUMENT,
                              f"shared KV arena name {shared.name!r} is not nxserve-kv-<32 hex digits>", drain=False)
        layouts = [header.layout] + ([header.draft_layout] if header.HasField("draft_layout") else [])
        received = await self._receive_kv(requests, context, layouts, ctx, shared)
        snapshots = received.snapshots if isinstance(received, SharedKV) else received
        stopping, stop_strings = stopping_from_pb(header.stopping)
        sampling = sampling_from_pb(header.sampling)
        return DecodeJob(
            request_id=header.request_id,
            prompt_ids=list(header.prompt_token_ids),
            first_token=header.first_token,
            kv=snapshots[0],
            draft_kv=snapshots[1] if len(snapshots) > 1 else None,
            speculate=not header.disable_speculation,
            sampling=sampling,
            rng=RequestRng(sampling.seed, offset=header.rng_offset),
            stopping=stopping,
            stop_strings=stop_strings,
            emit=emit,
            check_kv=received.verify if isinstance(received, SharedKV) else None,
        )

    async def _receive_kv(self, requests, context, layouts: list[decode_pb2.KvLayout], ctx,  # noqa: ANN001
                          shared: SharedRegion | None) -> list[KVSnapshot] | SharedKV:
        """Chunks until the commit, into one snapshot per KV set (target, then draft when sent); or,
        when the header named a shared region, the region with views of it, at once and without
        reading the stream further (the decode loop checks its CRC-32 and imports the views before
        it acks, after which the sender may reuse the region)."""
        with span_in(tracer, "kv_receive", parent=ctx, attributes={"nxserve.kv_transport": "shm" if shared else "chunks"}) as (span, _):
            kv_layouts = [Layout(num_layers=lay.num_layers, num_kv_heads=lay.num_kv_heads, n_tokens=lay.n_tokens,
                                 head_dim=lay.head_dim, dtype=lay.dtype) for lay in layouts]
            writing = shared is None  # whether the sender may still write (chunks before the commit)
            try:
                if shared is not None:
                    region = self.shared.read(shared, kv_layouts)  # checked by the loop: DecodeJob.check_kv
                    self.shared_kv_requests += 1
                    span.set_attribute("nxserve.kv_bytes", shared.nbytes)
                    return region
                assemblers = [KVAssembler(**dataclasses.asdict(lay)) for lay in kv_layouts]
                async for message in requests:
                    kind = message_kind(message)
                    if kind == "commit":
                        writing = False
                        break
                    if kind != "chunk":
                        raise KVTransferError(f"unexpected {kind} message after the header")
                    if message.kv_set >= len(assemblers):
                        raise KVTransferError(f"chunk for KV set {message.kv_set}, but the header announced {len(assemblers)} set(s)")
                    assemblers[message.kv_set].add(message.chunk)
                else:
                    writing = False
                    raise KVTransferError("the stream ended before the commit message")
                snapshots = [a.snapshot() for a in assemblers]
            except SharedKVUnreadable as exc:
                await _reject(requests, context, grpc.StatusCode.FAILED_PRECONDITION,
                              f"{exc}: the sender does not share this replica's --kv-shm-dir ({self.shared.directory}), send chunks",
                              drain=writing, trailing_metadata=SHM_UNREADABLE)
            except KVTransferError as exc:
                await _reject(requests, context, grpc.StatusCode.DATA_LOSS, str(exc), drain=writing)
            span.set_attribute("nxserve.kv_bytes", sum(a.bytes_received for a in assemblers))
            self.chunked_kv_requests += 1
            return snapshots

    async def _relay(self, events: asyncio.Queue, context, span) -> AsyncIterator[decode_pb2.DecodeResponse]:  # noqa: ANN001
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
                    span.set_attributes({
                        "nxserve.decoded_tokens": event.decoded_tokens,
                        "nxserve.decode_steps": event.steps,
                        "nxserve.speculation.proposed_tokens": event.proposed,
                        "nxserve.speculation.accepted_tokens": event.accepted,
                        "nxserve.speculation.acceptance_rate": event.accepted / event.proposed if event.proposed else 0.0,
                        "nxserve.tokens_per_step": event.decoded_tokens / event.steps if event.steps else 0.0,
                    })
                    yield decode_pb2.DecodeResponse(final=decode_pb2.DecodeFinal(
                        finish_reason=FINISH_TO_PB[event.reason], decoded_tokens=event.decoded_tokens, steps=event.steps,
                        proposed_tokens=event.proposed, accepted_tokens=event.accepted,
                    ))
                    return
                elif isinstance(event, Failed):
                    await context.abort(grpc.StatusCode.DATA_LOSS if event.data_loss else grpc.StatusCode.UNAVAILABLE, event.message)
            if tokens:
                yield decode_pb2.DecodeResponse(tokens=decode_pb2.TokenBatch(token_ids=tokens))


async def _reject(requests: AsyncIterator[DecodeMessage], context: grpc.aio.ServicerContext, code: grpc.StatusCode,
                  details: str, *, drain: bool = True, trailing_metadata: tuple[tuple[str, str], ...] = ()) -> NoReturn:
    """Abort the stream with `code`, once the sender has stopped writing (`drain`: read and drop its
    messages up to the commit or the end of the stream).

    Aborting while the sender still writes loses the status on its side: grpc aio replaces it with
    INTERNAL "Internal error from Core" when a write fails after the status arrived
    (grpc/grpc#36066), so a full replica would look broken instead of busy. The cost is receiving
    a rejected request's KV chunks, which are dropped without being assembled or checksummed.
    """
    if drain:
        async for message in requests:
            if message_kind(message) == "commit":
                break
    await context.abort(code, details, trailing_metadata)
