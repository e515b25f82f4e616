"""The context-encoding worker: one thread owns the prefill engine.

The worker's loop runs on the service's `EngineThread`, the thread that also loaded and warmed up
the engine (see nxcore.engine_thread for why it must be one thread). Prompts wait in a bounded
queue; the worker takes up to ctx_batch_size of them, splits them into context-encoding calls
that pad the least (`nxcore.prefill_plan`, at most --max-prefill-tokens each), and each call
encodes its prompts at once (the first token is sampled in the graph), exports each prompt's KV
and frees the slot at once, so the engine's slots only live for one call. Results go back through
asyncio futures.

Each prompt's KV (the draft model's after the target's) is exported into an `OutboundKV`: a region
of the shared-memory arena when one is free, sealed there while the bytes are still in this core's
cache, so a replica that shares the arena reads it there without another copy on this side. The
request owns it from then on and releases it once decode holds the KV or the request is over.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import time
from dataclasses import dataclass, field

from nxcore import Engine, RequestRng, SamplingParams, SequenceRequest
from nxcore.engine_thread import EngineThread
from nxcore.prefill_plan import DEFAULT_MAX_TOKENS, plan_context_calls
from nxserve.kv import OutboundKV, engine_layout
from nxserve.kv.shm import KVArena
from nxserve.rpc.errors import NotReady, Overloaded
from nxserve.rpc.metrics import PrefillMetrics
from nxserve.rpc.turns import CoreTurns

log = logging.getLogger(__name__)


@dataclass
class PrefillJob:
    prompt_ids: list[int]
    sampling: SamplingParams
    rng: RequestRng
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass
class PrefillResult:
    first_token: int
    kv: OutboundKV
    """The prompt's KV (and the draft's): the request releases it once decode holds it, or when it ends."""
    enqueued_at: float
    started_at: float
    """time.monotonic() when the context-encoding call (shared by the batch) started."""
    finished_at: float
    """time.monotonic() when it and the KV export finished."""
    batch: int
    """Prompts encoded in the same call."""


class PrefillWorker:
    """Encodes queued prompts in batches on the engine's thread and hands back each one's first
    token and exported KV (`PrefillResult`) through an asyncio future."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_queue: int,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        draft: Engine | None = None,
        thread: EngineThread,
        arena: KVArena | None = None,
        metrics: PrefillMetrics | None = None,
        turns: CoreTurns | None = None,
    ) -> None:
        self.engine = engine
        self.turns = turns or CoreTurns(None)
        """Each batch (its calls' encoding and KV export) is a priority turn on shared cores: it goes
        before the next decode step, and takes the prompts queued by the time the turn came."""
        self.draft = draft
        """Draft model for speculative decoding: its prompt KV travels to decode with the target's."""
        self.arena = arena
        """Where KV is exported when a region is free (else into new tensors)."""
        self.max_queue = max_queue
        self.max_tokens = max_tokens
        """Padded prompt tokens per context-encoding call at most (a longer prompt gets a call of its own)."""
        self.metrics = metrics
        self._queue: queue.Queue[PrefillJob | None] = queue.Queue(maxsize=max_queue)
        self._thread = thread
        """Where the engines were loaded: the loop runs there."""
        self._running: concurrent.futures.Future | None = None
        self._stopping = False

    def start(self) -> None:
        self._running = self._thread.start_loop(self._run, what="prefill worker")

    def stop(self) -> None:
        self._stopping = True
        self._queue.put(None)
        if self._running is not None:
            concurrent.futures.wait([self._running], timeout=10)

    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, prompt_ids: list[int], sampling: SamplingParams, rng: RequestRng) -> asyncio.Future:
        """Queue a validated prompt; the future gives its PrefillResult. Overloaded when the queue is full."""
        if self._stopping:
            raise NotReady("the prefill service is shutting down")
        loop = asyncio.get_running_loop()
        job = PrefillJob(prompt_ids=prompt_ids, sampling=sampling, rng=rng, future=loop.create_future(), loop=loop)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"{self.max_queue} prompts already wait for context encoding (max_queue): retry later") from None
        return job.future

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            # The turn first, then the batch: prompts that arrive while a decode step finishes share the turn.
            with self.turns.priority():
                jobs = self._batch_with(first)
                for call in self._calls(jobs):
                    if call := [j for j in call if not j.future.cancelled()]:
                        self._encode(call)

    def _batch_with(self, first: PrefillJob) -> list[PrefillJob]:
        """`first` and the prompts queued behind it, up to ctx_batch_size, less the cancelled ones."""
        jobs = [first]
        while len(jobs) < self.engine.config.ctx_batch_size:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # stop after this call
                self._queue.put(None)
                break
            jobs.append(job)
        return [j for j in jobs if not j.future.cancelled()]

    def _calls(self, jobs: list[PrefillJob]) -> list[list[PrefillJob]]:
        """The batch split into context-encoding calls (`nxcore.prefill_plan`), cheapest first."""
        cfg = self.engine.config
        plan = plan_context_calls(
            [len(j.prompt_ids) for j in jobs], buckets=cfg.buckets, row_buckets=cfg.ctx_batch_buckets, max_tokens=self.max_tokens
        )
        return [[jobs[i] for i in call] for call in plan]

    def _encode(self, jobs: list[PrefillJob]) -> None:
        start = time.monotonic()
        requests = [SequenceRequest(slot=i, token_ids=j.prompt_ids, sampling=j.sampling, rng=j.rng) for i, j in enumerate(jobs)]
        engines = [e for e in (self.engine, self.draft) if e is not None]
        outputs: list[OutboundKV] = []
        try:
            tokens = self.engine.context_encode(requests)
            for r in requests:
                outputs.append(OutboundKV.reserve(self.arena, [engine_layout(e, len(r.token_ids)) for e in engines]))
            for r, kv in zip(requests, outputs):
                kv.export(0, self.engine, r.slot)
            if self.draft is not None:
                self._encode_draft(requests, outputs)
            for kv in outputs:
                kv.seal()
        except Exception as exc:  # validated before submit; anything here is reported per request
            log.exception("context encoding failed")
            for kv in outputs:
                kv.release()
            for j in jobs:
                j.loop.call_soon_threadsafe(_set_exception, j.future, exc)
            return
        finally:
            for r in requests:
                self.engine.free(r.slot)
        end = time.monotonic()
        log.debug("encoded %d prompt(s) in %.1f ms", len(jobs), (end - start) * 1000)
        for j, token, kv in zip(jobs, tokens, outputs):
            result = PrefillResult(first_token=token, kv=kv, enqueued_at=j.enqueued_at, started_at=start, finished_at=end, batch=len(jobs))
            j.loop.call_soon_threadsafe(_set_result, j.future, result)
        if self.metrics is not None:  # after the results are on their way
            bucket = self.engine.bucket_for(max(len(j.prompt_ids) for j in jobs))
            self.metrics.encoding_time.record(end - start, {"nxserve.bucket": bucket, "nxserve.rows": len(jobs)})

    def _encode_draft(self, requests: list[SequenceRequest], outputs: list[OutboundKV]) -> None:
        """The draft model's prompt KV (its sampled token is not used, so greedy with a fixed seed)."""
        assert self.draft is not None
        greedy = [SequenceRequest(slot=r.slot, token_ids=r.token_ids, sampling=SamplingParams(), rng=RequestRng(0)) for r in requests]
        try:
            self.draft.context_encode(greedy)
            for r, kv in zip(requests, outputs):
                kv.export(1, self.draft, r.slot)
        finally:
            for r in requests:
                self.draft.free(r.slot)


def _set_result(future: asyncio.Future, result: PrefillResult) -> None:
    if future.done():  # cancelled while it was encoded: nobody else will release its KV
        result.kv.release()
    else:
        future.set_result(result)


def _set_exception(future: asyncio.Future, exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)
