"""The continuous-batching loop: one thread owns the engine and runs one step per iteration over
every running request. It is the service's `EngineThread`, the thread that also loaded and warmed
up the engine (see nxcore.engine_thread for why it must be one thread).

Requests arrive with their KV (already received and its layout checked), wait in a bounded queue
for a free slot, are imported into it and acknowledged, and from then on join every step. The
scheduling itself is nxcore's (`nxcore.scheduler`), the one `nxcore.generate` runs: this loop adds
the lock the gRPC side needs, the import and ack at admission, and events. A finished or cancelled
request frees its slot at once, and the next waiting request takes it before the next step.
Events (ack, tokens, final, failure) go back through each request's `emit` callback, which the
gRPC layer makes thread-safe; tokens once the request's stream_interval of them wait (fewer, larger
messages through every service that relays them).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nxcore import Engine
from nxcore.detokenizer import Decoder
from nxcore.engine_thread import EngineThread
from nxcore.scheduler import Scheduler, Sequence, SequenceStatus
from nxcore.speculation import DraftProposer, Proposer
from nxcore.stopping import FinishReason
from nxserve.kv import ReceivedKV
from nxserve.rpc.errors import EngineFailure, NotReady, Overloaded, ServiceError
from nxserve.rpc.metrics import DecodeMetrics
from nxserve.rpc.turns import CoreTurns

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Acked:
    slot: int
    queue_ms: float
    sent: threading.Event = field(default_factory=threading.Event, compare=False)
    """Set by the gRPC layer once the ack is written (or the call is over)."""


ACK_WAIT_S = 0.005
"""How long the loop waits, after admitting requests, for their acks to be written before it runs
the next step. A step keeps the cores (and, eager, mostly the GIL) for several milliseconds, during
which the event loop that writes the ack barely runs: without the wait a 1.6 MB shared-memory
hand-off took 4-15 ms instead of ~2 in a quarter of the cases (measured here). The wait is a
fraction of a millisecond when the event loop is free, and bounded when it is not."""


MAX_UNSENT_S = 1.0
"""Tokens held back for a request's stream_interval are sent once the oldest has waited this long,
however few: prefill takes a replica that sends a request nothing for --stall-timeout-s for a
stuck one, and a caller of a slow stream still sees progress."""


@dataclass(frozen=True)
class Tokens:
    token_ids: list[int]
    rng_offset: int
    """Random numbers the request has drawn after these tokens (where another replica resumes it)."""


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    decoded_tokens: int
    steps: int = 0
    proposed: int = 0
    accepted: int = 0


@dataclass(frozen=True)
class Failed:
    error: ServiceError
    """Why: KVCorrupted (its KV failed its check at import), EngineFailure, NotReady (shutting down)."""


Event = Acked | Tokens | Finished | Failed


@dataclass(eq=False, kw_only=True)
class DecodeJob(Sequence):
    """A request on this replica: a sequence whose first token came from prefill (`output_ids`
    starts with it), with its KV until admission and the callback its events go to."""

    request_id: str
    kv: ReceivedKV | None
    """The prompt's KV until it is imported into a slot (it may view the sender's shared memory,
    which the sender reuses once it has the ack)."""
    emit: Callable[[Event], None]
    enqueued_at: float = field(default_factory=time.monotonic)
    transport: str = ""
    """How its KV came (shm, chunks)."""
    stream_interval: int = 1
    """Its tokens are emitted once this many wait (and when it finishes): fewer, larger messages."""
    unsent: list[int] = field(default_factory=list)
    """Tokens generated and not emitted yet (fewer than stream_interval)."""
    unsent_since: float = 0.0
    """The loop's clock when the oldest of `unsent` was generated."""


class DecodeLoop:
    """Runs requests' token generation in a continuous batch on the engine's thread. The gRPC side
    calls `submit`, `cancel`, `load` and `has_room` from its event loop, under the loop's lock; the
    engine is only touched on the loop's thread. `clock` times the wait for a slot (queue_ms) and how
    long tokens are held back (MAX_UNSENT_S)."""

    def __init__(
        self,
        engine: Engine,
        *,
        tokenizer: Decoder | None,
        max_queue: int,
        proposer: Proposer | None = None,
        thread: EngineThread,
        clock: Callable[[], float] = time.monotonic,
        metrics: DecodeMetrics | None = None,
        turns: CoreTurns | None = None,
    ) -> None:
        self.engine = engine
        self.turns = turns or CoreTurns(None)
        """Each step (with the draft's prompt encodings before it) is one turn on shared cores."""
        self.metrics = metrics or DecodeMetrics()
        self.proposer = proposer
        self.max_queue = max_queue
        self.scheduler: Scheduler[DecodeJob] = Scheduler(engine, proposer=proposer, tokenizer=tokenizer)
        self.clock = clock
        self._cond = threading.Condition()
        self._stop = False
        self._draining = False
        self._thread = thread
        """Where the engines were loaded: the loop runs there."""
        self._loop: concurrent.futures.Future | None = None
        self.steps = 0
        self.completed = 0

    @property
    def draft(self) -> Engine | None:
        """The draft model's engine, when this replica speculates with one."""
        return self.proposer.draft if isinstance(self.proposer, DraftProposer) else None

    def start(self) -> None:
        self._loop = self._thread.start_loop(self._run, what="decode loop")

    def drain(self, timeout: float) -> int:
        """Take no new request (`submit` raises NotReady) and wait up to `timeout` seconds for the
        running and waiting ones to finish; returns how many are left. `stop` then hands those back:
        they fail with NotReady, which prefill answers by moving each to another replica."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._draining = True
            while self.scheduler.has_unfinished() and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(min(left, 0.1))
            return len(self.scheduler.running) + len(self.scheduler.waiting)

    def stop(self, timeout: float | None = None) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._loop is not None:
            concurrent.futures.wait([self._loop], timeout=timeout)

    # ------------------------------------------------------------- called from the gRPC side

    def has_room(self) -> bool:
        with self._cond:
            return len(self.scheduler.waiting) < self.max_queue or self.scheduler.free_slot_count() > 0

    def submit(self, job: DecodeJob) -> None:
        """Queue a request; Overloaded when every slot is busy and the queue is full."""
        with self._cond:
            if self._stop or self._draining:
                raise NotReady("the decode service is shutting down")
            waiting = len(self.scheduler.waiting)
            if waiting >= self.max_queue and self.scheduler.free_slot_count() == 0:
                raise Overloaded(
                    f"all {self.engine.config.batch_size} decode slots are busy and {waiting} requests "
                    f"wait (max_queue={self.max_queue}): retry later or add decode replicas"
                )
            job.enqueued_at = self.clock()
            self.scheduler.add(job)
            self._cond.notify_all()

    def cancel(self, job: DecodeJob) -> None:
        """Drop the request (its slot is freed before the next step). Idempotent."""
        with self._cond:
            if not job.status.is_finished():
                job.status = SequenceStatus.CANCELLED
                self._cond.notify_all()

    def load(self) -> tuple[int, int, int]:
        """(free slots, total slots, queued requests)."""
        with self._cond:
            return self.scheduler.free_slot_count(), self.engine.config.batch_size, len(self.scheduler.waiting)

    def idle(self) -> bool:
        with self._cond:
            return not self.scheduler.has_unfinished()

    # ------------------------------------------------------------- the loop thread

    def _run(self) -> None:
        while True:
            with self._cond:
                out = self.scheduler.schedule()
                while not (out.admitted or out.running or self._stop):
                    self._cond.wait()
                    out = self.scheduler.schedule()
                if self._stop:
                    self._fail_all(NotReady("the decode replica is shutting down: the request goes on on another replica"))
                    return
            admitted, drafts = self._admit(out.admitted)
            batch = [*out.running, *admitted]
            if not batch:
                continue
            # The draft model encodes the prompts prefill sent no draft KV for, outside the lock:
            # the gRPC side takes it (load, room, submit, cancel), on its event loop. Cancelled
            # ones too: they are in `batch`, and a step speculates for every slot in it.
            failed: dict[DecodeJob, Exception] = {}
            with self.turns.turn():
                for job in drafts:
                    assert self.proposer is not None and job.slot is not None
                    try:
                        self.proposer.prefill(job.slot, job.prompt_ids, job.sampling, job.rng)
                    except Exception as exc:
                        failed[job] = exc
                batch = [job for job in batch if job not in failed]
                started = time.perf_counter()
                try:
                    produced, failed_step = self.scheduler.step_isolated(batch)
                    failed.update(failed_step)
                except Exception as exc:  # the step failed again without the requests that failed alone
                    produced, failed = {}, {**failed, **dict.fromkeys(batch, exc)}
            if failed:
                self._fail(failed)
            self.metrics.step_time.record(time.perf_counter() - started)
            self.metrics.step_rows.record(len(batch))
            self.steps += 1
            self._post_process(produced)

    def _admit(self, jobs: list[DecodeJob]) -> tuple[list[DecodeJob], list[DecodeJob]]:
        """Import each admitted request's KV (and its draft KV) into its slot and ack it at once (from
        then on the sender may reuse the memory the KV came in); KV that fails its check takes no
        slot. Then wait, briefly, for the acks to be written (ACK_WAIT_S). Returns the imported
        requests, and those whose prompt the draft model must encode itself (prefill sent no draft
        KV) before their first step."""
        drafter = self.draft
        imported, drafts, acks = [], [], []
        for job in jobs:
            queue_ms = (self.clock() - job.enqueued_at) * 1000  # waiting for a slot, not the import
            self.metrics.queue_time.record(queue_ms / 1000)
            kv, job.kv = job.kv, None
            assert kv is not None and job.slot is not None
            try:
                drafted = kv.import_into(job.slot, self.engine, drafter)
            except ServiceError as exc:  # KVCorrupted: its shared region's CRC-32 failed
                with self._cond:
                    self.scheduler.finish(job)
                job.emit(Failed(exc))
                continue
            ack = Acked(slot=job.slot, queue_ms=queue_ms)
            job.emit(ack)
            acks.append(ack)
            imported.append(job)
            if drafter is not None and not drafted:
                drafts.append(job)
        deadline = time.monotonic() + ACK_WAIT_S
        for ack in acks:
            ack.sent.wait(max(0.0, deadline - time.monotonic()))
        return imported, drafts

    def _post_process(self, produced: dict[DecodeJob, list[int]]) -> None:
        """Append the step's tokens, then emit those of each request that has stream_interval of them
        waiting, finished, or held some for MAX_UNSENT_S (with the request's random-stream position
        after them, where another replica would resume it), and the final events of requests that
        finished."""
        with self._cond:
            kept = self.scheduler.update(produced)
            finished = [job for job, _ in kept if job.status == SequenceStatus.FINISHED]
            self.completed += len(finished)
            if finished and self._draining:
                self._cond.notify_all()
        now = self.clock()
        for job, tokens in kept:
            if tokens and not job.unsent:
                job.unsent_since = now
            job.unsent.extend(tokens)
            if job.unsent and (
                len(job.unsent) >= job.stream_interval or job.status == SequenceStatus.FINISHED or now - job.unsent_since >= MAX_UNSENT_S
            ):
                job.emit(Tokens(job.unsent, job.rng.offset))
                job.unsent = []
        for job in finished:
            assert job.finish_reason is not None
            job.emit(
                Finished(
                    reason=job.finish_reason,
                    decoded_tokens=len(job.output_ids) - 1,
                    steps=job.steps,
                    proposed=job.proposed,
                    accepted=job.accepted,
                )
            )

    def _fail(self, failed: dict[DecodeJob, Exception]) -> None:
        """End the requests a step failed for (only those: see Scheduler.step_isolated), freeing their slots."""
        for job, exc in failed.items():
            log.error("decode step failed for request %s: %s: %s", job.request_id, type(exc).__name__, exc, exc_info=exc)
        with self._cond:
            for job in failed:
                self.scheduler.finish(job)
        for job, exc in failed.items():
            job.emit(Failed(EngineFailure(f"decode step failed for this request: {type(exc).__name__}: {exc}")))

    def _fail_all(self, error: ServiceError) -> None:
        for job in self.scheduler.finish_all():
            job.emit(Failed(error))
