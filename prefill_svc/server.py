"""The public Generation service: validate, encode the prompt, hand the KV to a decode replica,
relay tokens and text. Protobuf is converted here and nowhere else."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from opentelemetry import trace

from nxcore import Engine, RequestRng, SamplingParams, StoppingCriteria
from nxcore.detokenizer import IncrementalDetokenizer
from nxcore.generate import FinishReason, GenerationResult, finish_reason
from nxcore.kv_wire import DEFAULT_CHUNK_BYTES, KVArena
from nxserve.decode_codec import is_shm_unreadable
from nxserve.grpc_common import FINISH_FROM_PB, FINISH_TO_PB, sampling_from_pb, stopping_from_pb
from nxserve.tracing import extract_context, inject_metadata, span_in
from nxserve.v1 import generation_pb2 as pb, generation_pb2_grpc
from prefill_svc.kv_sender import NoAck, decode_header, send_kv
from prefill_svc.router import DecodeRouter, NoReplica
from prefill_svc.worker import PrefillQueueFull, PrefillResult, PrefillWorker

log = logging.getLogger(__name__)
tracer = trace.get_tracer("nxserve.prefill_svc")

class InvalidRequest(Exception):
    pass


@dataclass
class Prepared:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stopping: StoppingCriteria
    stop_strings: tuple[str, ...]
    disable_speculation: bool = False


def _ns(monotonic_s: float) -> int:
    """A time.monotonic() instant as epoch nanoseconds, for spans recorded after the fact."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    """Registered before the server starts (so health answers while loading); `attach` makes it serve."""

    def __init__(self, *, model_name: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.model_name = model_name
        self.chunk_bytes = chunk_bytes
        self.engine: Engine | None = None

    def attach(self, *, engine: Engine, worker: PrefillWorker, router: DecodeRouter, tokenizer,  # noqa: ANN001
               arena: KVArena | None = None) -> None:
        self.worker = worker
        self.router = router
        self.arena = arena
        """Shared-memory arena for KV to replicas that share its directory (router: Replica.shm)."""
        self.tokenizer = tokenizer
        self.engine = engine

    async def _require_ready(self, context: grpc.aio.ServicerContext) -> None:
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the prefill service is still loading its model: retry when health reports SERVING")

    # ------------------------------------------------------------------ small RPCs

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        await self._require_ready(context)
        cfg, mc = self.engine.config, self.engine.model_config
        return pb.ModelInfoResponse(
            model=self.model_name, architecture=mc.model_type, dtype=cfg.dtype, buckets=list(cfg.buckets),
            batch_size=max((r.total_slots for r in self.router.usable()), default=0), ctx_batch_size=cfg.ctx_batch_size, max_prompt_tokens=cfg.max_prompt_len,
            max_total_tokens=cfg.seq_len, vocab_size=mc.vocab_size, decode_replicas=len(self.router.replicas),
            fingerprint=self.engine.fingerprint, decode_replicas_up=len(self.router.usable()),
        )

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        await self._require_ready(context)
        hf = getattr(self.tokenizer, "hf", None)
        if hf is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.model_name} has no tokenizer files")
        ids = hf(request.text, add_special_tokens=request.add_special_tokens)["input_ids"]
        return pb.TokenizeResponse(token_ids=ids, tokens=hf.convert_ids_to_tokens(ids))

    # ------------------------------------------------------------------ Generate

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        await self._require_ready(context)
        parent = extract_context(context.invocation_metadata())
        with span_in(tracer, "generate", parent=parent, kind=trace.SpanKind.SERVER) as (span, ctx):
            try:
                req = self._prepare(request)
            except InvalidRequest as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            span.set_attributes({
                "nxserve.request_id": req.request_id,
                "gen_ai.request.model": self.model_name,
                "gen_ai.request.max_tokens": req.stopping.max_new_tokens,
                "gen_ai.request.temperature": req.sampling.temperature,
                "gen_ai.usage.input_tokens": len(req.prompt_ids),
            })
            rng = RequestRng(req.sampling.seed)
            req.sampling = dataclasses.replace(req.sampling, seed=rng.seed)
            opened = self._open_decode(context, ctx)
            prefill = None
            try:
                prefill = await self._prefill(req, rng, context, ctx)
                result = GenerationResult(prompt_ids=req.prompt_ids, output_ids=[prefill.first_token])
                detok = IncrementalDetokenizer(self.tokenizer, stop_strings=req.stop_strings)
                first = pb.GenerateResponse(request_id=req.request_id, token_ids=[prefill.first_token],
                                            text=detok.add([prefill.first_token]), prompt_token_ids=req.prompt_ids)
                reason = FinishReason.STOP if detok.stopped else finish_reason(
                    result, stopping=req.stopping, eos_token_ids=self.engine.model_config.eos_token_ids, seq_len=self.engine.config.seq_len)
                if reason is not None:
                    first.text += detok.flush()
                    yield self._finalize(first, req, result, reason, span)
                    return
                yield first
                async for response in self._decode(req, rng, prefill, result, detok, context, span, ctx, opened):
                    yield response
            finally:
                if prefill is not None:
                    self.worker.release(prefill)  # its arena region, unless the hand-off did
                if opened is not None:
                    opened[1].cancel()  # no-op once the call is over; frees it when no KV was sent

    def _prepare(self, request: pb.GenerateRequest) -> Prepared:
        cfg = self.engine.config
        kind = request.WhichOneof("prompt")
        if kind == "text":
            try:
                prompt_ids = self.tokenizer.encode(request.text)
            except FileNotFoundError as exc:
                raise InvalidRequest(str(exc)) from None
        elif kind == "token_ids":
            prompt_ids = list(request.token_ids.ids)
            vocab = self.engine.model_config.vocab_size
            bad = [t for t in prompt_ids if t >= vocab]
            if bad:
                raise InvalidRequest(f"token ids {bad[:8]} out of range: allowed 0..{vocab - 1} (vocab_size)")
        else:
            raise InvalidRequest("no prompt: set text or token_ids")
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty")
        if len(prompt_ids) > cfg.max_prompt_len:
            raise InvalidRequest(
                f"prompt of {len(prompt_ids)} tokens is longer than the largest context bucket ({cfg.max_prompt_len} tokens)"
            )
        try:
            sampling = sampling_from_pb(request.sampling)
            sampling.validate(max_topk=cfg.max_topk)
            stopping, stop_strings = stopping_from_pb(request.stopping)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        return Prepared(request_id=request.request_id or uuid.uuid4().hex, prompt_ids=prompt_ids, sampling=sampling,
                        stopping=stopping, stop_strings=stop_strings, disable_speculation=request.disable_speculation)

    async def _prefill(self, req: Prepared, rng: RequestRng, context: grpc.aio.ServicerContext, ctx) -> PrefillResult:  # noqa: ANN001
        try:
            future = self.worker.submit(req.prompt_ids, req.sampling, rng)
        except PrefillQueueFull as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        try:
            result: PrefillResult = await future
        except asyncio.CancelledError:  # the result may have come with the cancellation: its region
            if future.done() and not future.cancelled() and future.exception() is None:
                self.worker.release(future.result())
            raise
        finally:
            future.cancel()
        queue_span = tracer.start_span("queue", context=ctx, start_time=_ns(result.enqueued_at))
        queue_span.end(end_time=_ns(result.started_at))
        encode_span = tracer.start_span("context_encoding", context=ctx, start_time=_ns(result.started_at),
                                        attributes={"nxserve.batch": result.batch, "nxserve.prompt_tokens": len(req.prompt_ids)})
        encode_span.end(end_time=_ns(result.finished_at))
        return result

    def _open_decode(self, context: grpc.aio.ServicerContext, ctx):  # noqa: ANN001, ANN202
        """(replica, call): a Decode stream on the least-loaded replica, or None when there is none
        now. `Generate` opens one before context encoding, so that setting the stream up on both
        sides (~0.7 ms measured here) overlaps the encoding instead of delaying the KV hand-off."""
        try:
            replica = self.router.pick()
        except NoReplica:
            return None
        return replica, replica.stub.Decode(metadata=inject_metadata(ctx), timeout=context.time_remaining())

    async def _hand_off(self, req: Prepared, rng: RequestRng, prefill: PrefillResult, context: grpc.aio.ServicerContext,
                        ctx, opened):  # noqa: ANN001, ANN202
        """Send the KV on `opened` (see `_open_decode`) while its replica is usable, else on a
        stream opened now on the least-loaded replica, then on the others in turn while they fail
        or are full; returns (replica, call) after the ack."""
        draft = (self.worker.draft, prefill.draft_kv) if prefill.draft_kv is not None else None
        header = decode_header(
            self.engine, prefill.kv, request_id=req.request_id, prompt_ids=req.prompt_ids, sampling=req.sampling,
            stopping=req.stopping, stop_strings=req.stop_strings, first_token=prefill.first_token, rng_offset=rng.offset,
            draft=draft, disable_speculation=req.disable_speculation,
        )
        tried: set[str] = set()
        busy: list[str] = []
        while True:
            if opened is not None and opened[0] in self.router.usable():
                replica, call = opened
            else:
                if opened is not None:
                    opened[1].cancel()
                try:
                    replica = self.router.pick(tried)
                except NoReplica as exc:
                    if busy:  # every replica that could take it is full
                        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "; ".join(busy))
                    await context.abort(exc.code, str(exc))
                call = replica.stub.Decode(metadata=inject_metadata(ctx), timeout=context.time_remaining())
            opened = None  # used once: a retry opens a new stream
            tried.add(replica.target)
            arena = self.arena if replica.shm else None
            try:
                with span_in(tracer, "kv_transfer", parent=ctx, attributes={"nxserve.decode_replica": replica.target}) as (span, _):
                    sent = await send_kv(call, header, prefill.kv, chunk_bytes=self.chunk_bytes, draft_kv=prefill.draft_kv,
                                         arena=arena, shared=prefill.shared)
                    span.set_attributes({"nxserve.kv_transport": "shm" if sent.shared else "chunks",
                                         "nxserve.kv_bytes": sent.bytes_sent, "nxserve.kv_transfer_ms": sent.seconds * 1000,
                                         "nxserve.decode_queue_ms": sent.queue_ms, "nxserve.decode_slot": sent.slot,
                                         "nxserve.kv_gbps": sent.bytes_sent / max(sent.seconds, 1e-9) / 1e9})
                return replica, call
            except NoAck as exc:
                await context.abort(grpc.StatusCode.INTERNAL, f"decode replica {replica.target}: {exc}")
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                # A write to a call that already failed raises InvalidStateError; the status says why.
                code, details = await call.code(), await call.details()
                if arena is not None and code == grpc.StatusCode.FAILED_PRECONDITION and \
                        is_shm_unreadable(await call.trailing_metadata()):
                    self.router.shm_failed(replica, details)
                    tried.discard(replica.target)  # again, with chunks
                    continue
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    busy.append(f"decode replica {replica.target}: {details}")
                    continue
                if code == grpc.StatusCode.UNAVAILABLE:
                    self.router.mark_down(replica, f"{code.name}: {details}")
                    continue
                await context.abort(code, f"decode replica {replica.target}: {details}")

    async def _decode(self, req: Prepared, rng: RequestRng, prefill: PrefillResult, result: GenerationResult,
                      detok: IncrementalDetokenizer, context: grpc.aio.ServicerContext, span: trace.Span,
                      ctx, opened) -> AsyncIterator[pb.GenerateResponse]:  # noqa: ANN001
        replica, call = await self._hand_off(req, rng, prefill, context, ctx, opened)
        self.worker.release(prefill)  # decode holds the KV now: free prefill's copies
        try:
            with span_in(tracer, "decoding", parent=ctx, attributes={"nxserve.decode_replica": replica.target}):
                while True:
                    message = await call.read()
                    if message is grpc.aio.EOF:
                        await context.abort(grpc.StatusCode.UNAVAILABLE, f"decode replica {replica.target} closed the stream without a final message")
                    kind = message.WhichOneof("kind")
                    if kind == "tokens":
                        ids = list(message.tokens.token_ids)
                        result.output_ids.extend(ids)
                        yield pb.GenerateResponse(request_id=req.request_id, token_ids=ids, text=detok.add(ids))
                    elif kind == "final":
                        f = message.final
                        span.set_attributes({
                            "nxserve.decode_steps": f.steps, "nxserve.speculation.proposed_tokens": f.proposed_tokens,
                            "nxserve.speculation.accepted_tokens": f.accepted_tokens,
                            "nxserve.speculation.acceptance_rate": f.accepted_tokens / f.proposed_tokens if f.proposed_tokens else 0.0,
                            "nxserve.tokens_per_step": f.decoded_tokens / f.steps if f.steps else 0.0,
                        })
                        last = pb.GenerateResponse(request_id=req.request_id, text=detok.flush())
                        yield self._finalize(last, req, result, FINISH_FROM_PB[message.final.finish_reason], span)
                        return
        except grpc.aio.AioRpcError as exc:
            code = exc.code() if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else grpc.StatusCode.UNAVAILABLE
            await context.abort(code, f"decode replica {replica.target} failed mid-request: {exc.code().name}: {exc.details()}")
        finally:
            call.cancel()

    @staticmethod
    def _finalize(response: pb.GenerateResponse, req: Prepared, result: GenerationResult, reason: FinishReason,
                  span: trace.Span) -> pb.GenerateResponse:
        response.finish_reason = FINISH_TO_PB[reason]
        response.usage.prompt_tokens = len(req.prompt_ids)
        response.usage.completion_tokens = len(result.output_ids)
        span.set_attributes({"gen_ai.usage.output_tokens": len(result.output_ids), "gen_ai.response.finish_reasons": [str(reason)]})
        return response

