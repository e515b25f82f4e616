"""The continuous-batching loop: one thread owns the engine and runs one token-generation call per
step over every running request. It is the service's `EngineThread`, the thread that also loaded
and warmed up the engine (see nxcore.engine_thread for why it must be one thread).

Requests arrive with their KV snapshot (already received and checked), wait in a bounded queue
for a free slot, are imported into it, and from then on join every step. A finished or cancelled
request frees its slot at once, and the next waiting request takes it before the next step.
Events (ack, tokens, final) go back through each request's `emit` callback, which the gRPC layer
makes thread-safe.
"""

from __future__ import annotations

import concurrent.futures
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from nxcore import Engine, RequestRng, SamplingParams, SequenceRequest, StoppingCriteria
from nxcore.detokenizer import Decoder, IncrementalDetokenizer
from nxcore.engine_thread import EngineThread
from nxcore.generate import FinishReason, GenerationResult, finish_reason
from nxcore.kv_cache import KVSnapshot
from nxcore.kv_wire import KVTransferError
from nxcore.speculation import DraftProposer, NgramProposer, SpecSequence, can_speculate, speculative_step

log = logging.getLogger(__name__)


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2
    CANCELLED = 3

    def is_done(self) -> bool:
        return self >= RequestStatus.FINISHED


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


@dataclass(frozen=True)
class Tokens:
    token_ids: list[int]


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    decoded_tokens: int
    steps: int = 0
    proposed: int = 0
    accepted: int = 0


@dataclass(frozen=True)
class Failed:
    message: str
    data_loss: bool = False
    """The request's KV arrived corrupted (its CRC-32 check failed), rather than the replica failing."""


Event = Acked | Tokens | Finished | Failed


@dataclass
class DecodeJob:
    request_id: str
    prompt_ids: list[int]
    first_token: int
    kv: KVSnapshot | None
    """The prompt's KV until it is imported into a slot. It may view the sender's shared memory,
    which the sender reuses once it has the ack: import before emitting Acked (and draft_kv too)."""
    sampling: SamplingParams
    rng: RequestRng
    stopping: StoppingCriteria
    stop_strings: tuple[str, ...]
    emit: Callable[[Event], None]
    status: RequestStatus = RequestStatus.WAITING
    enqueued_at: float = field(default_factory=time.monotonic)
    result: GenerationResult | None = None
    detok: IncrementalDetokenizer | None = None
    draft_kv: KVSnapshot | None = None
    """The draft model's KV from prefill (speculation with a draft model), if it sent one."""
    speculate: bool = True
    """False when the request opted out of speculative decoding."""
    check_kv: Callable[[], None] | None = None
    """Run just before the import; KVTransferError when the KV is not what the sender wrote (the
    CRC-32 of KV in the sender's shared memory, checked here rather than on receipt so that the
    import reads bytes the check has just brought into this core's cache)."""
    steps: int = 0
    proposed: int = 0
    accepted: int = 0


class QueueFull(Exception):
    pass


class DecodeLoop:
    def __init__(self, engine: Engine, *, tokenizer: Decoder, max_queue: int,
                 proposer: NgramProposer | DraftProposer | None = None, thread: EngineThread) -> None:
        self.engine = engine
        self.proposer = proposer
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self._waiting: deque[DecodeJob] = deque()
        self._running: dict[int, DecodeJob] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread = thread
        """Where the engines were loaded: the loop runs there."""
        self._loop: concurrent.futures.Future | None = None
        self.steps = 0
        self.completed = 0

    def start(self) -> None:
        self._loop = self._thread.start_loop(self._run, what="decode loop")

    def stop(self, timeout: float | None = None) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._loop is not None:
            concurrent.futures.wait([self._loop], timeout=timeout)

    # ------------------------------------------------------------- called from the gRPC side

    def has_room(self) -> bool:
        with self._cond:
            return len(self._waiting) < self.max_queue or self._free_count() > 0

    def submit(self, job: DecodeJob) -> None:
        with self._cond:
            if self._stop:
                raise QueueFull("the decode service is shutting down")
            if len(self._waiting) >= self.max_queue and self._free_count() == 0:
                raise QueueFull(
                    f"all {self.engine.config.batch_size} decode slots are busy and {len(self._waiting)} requests "
                    f"wait (max_queue={self.max_queue}): retry later or add decode replicas"
                )
            self._waiting.append(job)
            self._cond.notify_all()

    def cancel(self, job: DecodeJob) -> None:
        with self._cond:
            if not job.status.is_done():
                job.status = RequestStatus.CANCELLED
                self._cond.notify_all()

    def load(self) -> tuple[int, int, int]:
        """(free slots, total slots, queued requests)."""
        with self._cond:
            return self._free_count(), self.engine.config.batch_size, len(self._waiting)

    def idle(self) -> bool:
        with self._cond:
            return not self._waiting and not self._running

    def _free_count(self) -> int:
        return self.engine.config.batch_size - len(self._running)

    # ------------------------------------------------------------- the loop thread

    def _run(self) -> None:
        while True:
            acks: list[Acked] = []
            drafts: list[tuple[int, DecodeJob]] = []
            with self._cond:
                self._drop_cancelled()
                self._admit(acks, drafts)
                while not self._running and not self._stop:
                    self._cond.wait()
                    self._drop_cancelled()
                    self._admit(acks, drafts)
                if self._stop:
                    self._fail_all("the decode service is shutting down")
                    return
                batch = list(self._running.items())
            deadline = time.monotonic() + ACK_WAIT_S
            for ack in acks:
                ack.sent.wait(max(0.0, deadline - time.monotonic()))
            try:
                # The draft model encodes the prompts prefill sent no draft KV for, outside the lock:
                # the gRPC side takes it (load, room, submit, cancel), on its event loop. Cancelled
                # ones too: they are in `batch`, and a step speculates for every slot in it.
                for slot, job in drafts:
                    self.proposer.prefill(slot, job.prompt_ids, job.sampling, job.rng)
                self._step(batch)
            except Exception as exc:  # a bug or a bad state: fail these requests, keep serving
                log.exception("decode step failed")
                with self._cond:
                    for slot, job in batch:
                        self._finish(slot, job, RequestStatus.CANCELLED)
                for _, job in batch:
                    job.emit(Failed(f"decode step failed: {exc}"))

    def _admit(self, acks: list[Acked], drafts: list[tuple[int, DecodeJob]]) -> None:
        """Take waiting requests into free slots: import each one's KV (and its draft KV) and ack it
        at once (from then on the sender may reuse the memory the KV came in), adding the ack to
        `acks`; and to `drafts` the (slot, request) whose prompt the draft model must encode itself
        (prefill sent no draft KV) before the next step."""
        free = self.engine.free_slots()
        while self._waiting and free:
            job = self._waiting.popleft()
            if job.status.is_done():
                continue
            queue_ms = (time.monotonic() - job.enqueued_at) * 1000  # waiting for a slot, not the import
            if job.check_kv is not None:
                try:
                    job.check_kv()
                except KVTransferError as exc:
                    job.status = RequestStatus.CANCELLED
                    job.kv = job.draft_kv = None
                    job.emit(Failed(str(exc), data_loss=True))
                    continue
            slot = free.pop(0)
            self.engine.import_kv(slot, job.kv)
            drafter = self.proposer if isinstance(self.proposer, DraftProposer) else None
            draft_kv, job.kv, job.draft_kv, job.check_kv = job.draft_kv, None, None, None  # nothing views the sender's memory
            if drafter is not None and draft_kv is not None:
                drafter.draft.import_kv(slot, draft_kv)
            job.status = RequestStatus.RUNNING
            job.result = GenerationResult(prompt_ids=job.prompt_ids, output_ids=[job.first_token])
            if job.stop_strings:  # text is only needed here to find stop strings
                job.detok = IncrementalDetokenizer(self.tokenizer, stop_strings=job.stop_strings)
                job.detok.add([job.first_token])
            self._running[slot] = job
            ack = Acked(slot=slot, queue_ms=queue_ms)
            job.emit(ack)
            acks.append(ack)
            if drafter is not None and draft_kv is None:
                drafts.append((slot, job))

    def _drop_cancelled(self) -> None:
        for slot, job in list(self._running.items()):
            if job.status == RequestStatus.CANCELLED:
                self._finish(slot, job, RequestStatus.CANCELLED)
        if any(j.status.is_done() for j in self._waiting):
            self._waiting = deque(j for j in self._waiting if not j.status.is_done())

    def _finish(self, slot: int, job: DecodeJob, status: RequestStatus) -> None:
        job.status = status
        self.engine.free(slot)
        if self.proposer is not None:
            self.proposer.free(slot)
        self._running.pop(slot, None)

    def _step(self, batch: Sequence[tuple[int, DecodeJob]]) -> None:
        """One step: a speculation round for requests that can take one, one token for the rest."""
        produced = self._generate(batch)
        self.steps += 1
        finished: list[tuple[DecodeJob, FinishReason]] = []
        sent: dict[int, list[int]] = {}
        with self._cond:
            for slot, job in batch:
                if job.status != RequestStatus.RUNNING:
                    continue
                job.steps += 1
                sent[slot] = []
                for token in produced[slot]:
                    sent[slot].append(token)
                    reason = self._add_token(job, token)
                    if reason is not None:
                        self._finish(slot, job, RequestStatus.FINISHED)
                        self.completed += 1
                        finished.append((job, reason))
                        break
        for slot, job in batch:
            if sent.get(slot):
                job.emit(Tokens(sent[slot]))
        for job, reason in finished:
            job.emit(Finished(reason=reason, decoded_tokens=len(job.result.output_ids) - 1, steps=job.steps,
                              proposed=job.proposed, accepted=job.accepted))

    def _generate(self, batch: Sequence[tuple[int, DecodeJob]]) -> dict[int, list[int]]:
        spec = [(slot, job) for slot, job in batch
                if self.proposer is not None and job.speculate and can_speculate(self.engine, slot)]
        plain = [(slot, job) for slot, job in batch if (slot, job) not in spec]
        produced: dict[int, list[int]] = {}
        if spec:
            sequences = [SpecSequence(slot=slot, tokens=job.prompt_ids + job.result.output_ids, sampling=job.sampling, rng=job.rng)
                         for slot, job in spec]
            for (slot, job), tokens in zip(spec, speculative_step(self.engine, self.proposer, sequences)):
                produced[slot] = tokens
                job.proposed += self.engine.config.speculation_length
                job.accepted += len(tokens) - 1
        if plain:
            requests = [SequenceRequest(slot=slot, token_ids=[job.result.output_ids[-1]], sampling=job.sampling, rng=job.rng)
                        for slot, job in plain]
            for (slot, _), token in zip(plain, self.engine.token_generate(requests)):
                produced[slot] = [token]
        return produced

    def _add_token(self, job: DecodeJob, token: int) -> FinishReason | None:
        job.result.output_ids.append(token)
        stopped = job.detok is not None and job.detok.add([token]) is not None and job.detok.stopped
        if stopped:
            return FinishReason.STOP
        return finish_reason(job.result, stopping=job.stopping, eos_token_ids=self.engine.model_config.eos_token_ids,
                             seq_len=self.engine.config.seq_len)

    def _fail_all(self, message: str) -> None:
        for slot, job in list(self._running.items()):
            self._finish(slot, job, RequestStatus.CANCELLED)
            job.emit(Failed(message))
        while self._waiting:
            job = self._waiting.popleft()
            job.status = RequestStatus.CANCELLED
            job.emit(Failed(message))

