"""The context-encoding worker: one thread owns the prefill engine.

The worker's loop runs on the service's `EngineThread`, the thread that also loaded and warmed up
the engine (see nxcore.engine_thread for why it must be one thread). Prompts wait in a bounded queue; each call encodes up to ctx_batch_size of them at once (the
first token is sampled in the graph), exports each prompt's KV and frees the slot at once, so the
engine's slots only live for one call. Results go back through asyncio futures.

With a shared-memory arena the KV is exported straight into a region of it (the draft's after the
target's) and sealed there (its CRC-32 taken while the bytes are still in this core's cache), so a
replica that shares the arena reads it there without another copy on this side; the request
releases the region (`PrefillResult.shared`) once decode holds the KV or it is over.
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
from nxcore.kv_cache import KVSnapshot
from nxcore.kv_wire import KVArena, Layout, Reserved, SharedRegion

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
    kv: KVSnapshot | None
    """The prompt's KV; dropped (None) once a decode replica holds it."""
    draft_kv: KVSnapshot | None
    enqueued_at: float
    started_at: float
    """time.monotonic() when the context-encoding call (shared by the batch) started."""
    finished_at: float
    """time.monotonic() when it and the KV export finished."""
    batch: int
    """Prompts encoded in the same call."""
    shared: SharedRegion | None = None
    """The arena region `kv` (and `draft_kv`) view when they were exported there: the request
    releases it (`PrefillWorker.release`) once decode holds the KV, or when it ends."""


class PrefillQueueFull(Exception):
    pass


class PrefillWorker:
    def __init__(self, engine: Engine, *, max_queue: int, draft: Engine | None = None, thread: EngineThread,
                 arena: KVArena | None = None) -> None:
        self.engine = engine
        self.draft = draft
        """Draft model for speculative decoding: its prompt KV travels to decode with the target's."""
        self.arena = arena
        """Where KV is exported when a region is free (else into new tensors)."""
        self.max_queue = max_queue
        self._queue: queue.Queue[PrefillJob | None] = queue.Queue(maxsize=max_queue)
        self._thread = thread
        """Where the engines were loaded: the loop runs there."""
        self._running: concurrent.futures.Future | None = None

    def start(self) -> None:
        self._running = self._thread.start_loop(self._run, what="prefill worker")

    def stop(self) -> None:
        self._queue.put(None)
        if self._running is not None:
            concurrent.futures.wait([self._running], timeout=10)

    def queued(self) -> int:
        return self._queue.qsize()

    def release(self, result: PrefillResult) -> None:
        """Drop the result's KV (decode holds it, or the request is over) and free its arena region,
        if it still has one. Calling it again does nothing."""
        result.kv = result.draft_kv = None
        if result.shared is not None:
            self.arena.release(result.shared)
            result.shared = None

    def submit(self, prompt_ids: list[int], sampling: SamplingParams, rng: RequestRng) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        job = PrefillJob(prompt_ids=prompt_ids, sampling=sampling, rng=rng, future=loop.create_future(), loop=loop)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise PrefillQueueFull(
                f"{self.max_queue} prompts already wait for context encoding (max_queue): retry later"
            ) from None
        return job.future

    def _take_batch(self) -> list[PrefillJob] | None:
        first = self._queue.get()
        if first is None:
            return None
        jobs = [first]
        while len(jobs) < self.engine.config.ctx_batch_size:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)
                break
            jobs.append(job)
        return [j for j in jobs if not j.future.cancelled()]

    def _reserve(self, n_tokens: int) -> Reserved | None:
        """An arena region for one prompt's KV (the target's, then the draft's), when one is free."""
        if self.arena is None:
            return None
        return self.arena.reserve([kv_layout(e, n_tokens) for e in (self.engine, self.draft) if e is not None])

    def _encode_draft(self, requests: list[SequenceRequest], regions: list[Reserved | None]) -> list[KVSnapshot | None]:
        """The draft model's prompt KV (its sampled token is not used, so greedy with a fixed seed)."""
        if self.draft is None:
            return _unused(requests)
        greedy = [SequenceRequest(slot=r.slot, token_ids=r.token_ids, sampling=SamplingParams(), rng=RequestRng(0)) for r in requests]
        try:
            self.draft.context_encode(greedy)
            return [self.draft.export_kv(r.slot, len(r.token_ids), out=region.snapshots[1] if region else None)
                    for r, region in zip(requests, regions)]
        finally:
            for r in requests:
                self.draft.free(r.slot)

    def _run(self) -> None:
        while (jobs := self._take_batch()) is not None:
            if jobs:
                self._encode(jobs)

    def _encode(self, jobs: list[PrefillJob]) -> None:
        start = time.monotonic()
        requests = [SequenceRequest(slot=i, token_ids=j.prompt_ids, sampling=j.sampling, rng=j.rng) for i, j in enumerate(jobs)]
        regions: list[Reserved | None] = []
        try:
            tokens = self.engine.context_encode(requests)
            for r in requests:
                regions.append(self._reserve(len(r.token_ids)))
            snapshots = [self.engine.export_kv(r.slot, len(r.token_ids), out=region.snapshots[0] if region else None)
                         for r, region in zip(requests, regions)]
            draft_snapshots = self._encode_draft(requests, regions)
            sealed = [self.arena.seal(region) if region else None for region in regions]
        except Exception as exc:  # validated before submit; anything here is reported per request
            log.exception("context encoding failed")
            for region in regions:
                if region is not None:
                    self.arena.release(region)
            for j in jobs:
                j.loop.call_soon_threadsafe(_set_exception, j.future, exc)
            return
        finally:
            for r in requests:
                self.engine.free(r.slot)
        end = time.monotonic()
        log.debug("encoded %d prompt(s) in %.1f ms", len(jobs), (end - start) * 1000)
        for j, token, kv, draft_kv, region in zip(jobs, tokens, snapshots, draft_snapshots, sealed):
            result = PrefillResult(first_token=token, kv=kv, draft_kv=draft_kv, enqueued_at=j.enqueued_at, started_at=start,
                                   finished_at=end, batch=len(jobs), shared=region)
            j.loop.call_soon_threadsafe(self._set_result, j.future, result)

    def _set_result(self, future: asyncio.Future, result: PrefillResult) -> None:
        if future.done():  # cancelled while it was encoded: nobody else will release its region
            self.release(result)
        else:
            future.set_result(result)


def kv_layout(engine: Engine, n_tokens: int) -> Layout:
    """The layout of `n_tokens` of the engine's KV, as exported."""
    cfg = engine.model_config
    return Layout(cfg.num_layers, cfg.num_kv_heads, n_tokens, cfg.head_dim, engine.config.dtype)


def _unused(requests: list[SequenceRequest]) -> list[None]:
    return [None] * len(requests)


def _set_exception(future: asyncio.Future, exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)
