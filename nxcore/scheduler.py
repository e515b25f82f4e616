"""The scheduler both generation loops share (vLLM v1's shape): `schedule` which sequences take
which slots, `step` them through the engine, `update` them with what it produced.

    out = scheduler.schedule()          # admit waiting sequences into free slots
    ... fill the admitted ones' KV      # context encoding (nxcore.generate), or an import of the
                                        # KV prefill sent (the decode service)
    produced = scheduler.step(batch)    # a speculation round where one fits, one token elsewhere
    scheduler.update(produced)          # append, stop, free finished slots

It owns no thread and no lock: `nxcore.generate` drives it in a plain loop, the decode service's
loop under its own lock (the gRPC side submits and cancels from another thread).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from nxcore.detokenizer import Decoder, IncrementalDetokenizer
from nxcore.engine import Engine, SequenceRequest
from nxcore.sampling import RequestRng, SamplingParams
from nxcore.speculation import Proposer, SpecSequence, can_speculate, speculative_step
from nxcore.stopping import FinishReason, StoppingCriteria, finish_reason


class SequenceStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2
    """Stopped by its criteria."""
    CANCELLED = 3
    """Aborted by its caller, or failed."""

    def is_finished(self) -> bool:
        return self >= SequenceStatus.FINISHED


@dataclass(eq=False, kw_only=True)
class Sequence:
    """One request's tokens and settings, from waiting to finished. Compared by identity."""

    prompt_ids: list[int]
    sampling: SamplingParams
    rng: RequestRng
    stopping: StoppingCriteria
    stop_strings: tuple[str, ...] = ()
    """Strings that end it; searched in its text, which needs the scheduler's tokenizer."""
    speculate: bool = True
    """False when it opted out of speculative decoding."""
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    slot: int | None = None
    steps: int = 0
    """Steps it took part in (each a token, or a speculation round)."""
    proposed: int = 0
    accepted: int = 0
    detok: IncrementalDetokenizer | None = None
    """Its text so far, kept only to find stop strings."""


S = TypeVar("S", bound=Sequence)


@dataclass(frozen=True)
class SchedulerOutput(Generic[S]):
    admitted: list[S]
    """Sequences that took a free slot in this call: fill their KV, then step them."""
    running: list[S]
    """Sequences that held a slot before: step them."""


class Scheduler(Generic[S]):
    """Waiting and running sequences over an engine's slots.

    `max_admit` caps the sequences admitted per `schedule` (one context-encoding call's rows);
    `eos_token_ids` defaults to the checkpoint's; `tokenizer` decodes text for stop strings."""

    def __init__(
        self,
        engine: Engine,
        *,
        proposer: Proposer | None = None,
        tokenizer: Decoder | None = None,
        eos_token_ids: Seq[int] | None = None,
        max_admit: int | None = None,
    ) -> None:
        self.engine = engine
        self.proposer = proposer
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(engine.model_config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.max_admit = max_admit or engine.config.batch_size
        self.waiting: deque[S] = deque()
        self.running: dict[int, S] = {}
        """Slot -> the sequence holding it."""

    def add(self, seq: S) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def free_slots(self) -> list[int]:
        """Slots neither the engine nor this scheduler holds (a caller may hold some of the engine's)."""
        return [slot for slot in self.engine.free_slots() if slot not in self.running]

    def free_slot_count(self) -> int:
        return len(self.free_slots())

    # ---------------------------------------------------------------- schedule

    def schedule(self) -> SchedulerOutput[S]:
        """Free the slots of sequences that finished or were cancelled since, then admit waiting
        sequences into free slots (in order, up to max_admit)."""
        for seq in [s for s in self.running.values() if s.status.is_finished()]:
            self.finish(seq, seq.status)
        if any(s.status.is_finished() for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if not s.status.is_finished())
        running = list(self.running.values())
        admitted: list[S] = []
        free = self.free_slots()
        while self.waiting and free and len(admitted) < self.max_admit:
            seq = self.waiting.popleft()
            seq.slot, seq.status = free.pop(0), SequenceStatus.RUNNING
            self.running[seq.slot] = seq
            if seq.stop_strings and self.tokenizer is not None and seq.detok is None:
                seq.detok = IncrementalDetokenizer(self.tokenizer, stop_strings=seq.stop_strings)
                seq.detok.add(seq.output_ids)
            admitted.append(seq)
        return SchedulerOutput(admitted=admitted, running=running)

    # ---------------------------------------------------------------- step

    def step(self, batch: Seq[S]) -> dict[S, list[int]]:
        """One step over `batch` (running sequences whose last token is not in the cache yet): a
        speculation round for those that can take one (a proposer, opted in, room in the slot),
        one token for the rest. Returns each sequence's new tokens (1 to k + 1)."""
        engine, proposer = self.engine, self.proposer
        spec = [s for s in batch if proposer is not None and s.speculate and can_speculate(engine, _slot(s))]
        plain = [s for s in batch if not (proposer is not None and s.speculate and can_speculate(engine, _slot(s)))]
        produced: dict[S, list[int]] = {}
        if spec:
            assert proposer is not None
            rounds = [SpecSequence(slot=_slot(s), tokens=s.prompt_ids + s.output_ids, sampling=s.sampling, rng=s.rng) for s in spec]
            for seq, tokens in zip(spec, speculative_step(engine, proposer, rounds)):
                produced[seq] = tokens
                seq.proposed += engine.config.speculation_length
                seq.accepted += len(tokens) - 1
        if plain:
            requests = [SequenceRequest(slot=_slot(s), token_ids=[s.output_ids[-1]], sampling=s.sampling, rng=s.rng) for s in plain]
            for seq, token in zip(plain, engine.token_generate(requests)):
                produced[seq] = [token]
        for seq in batch:
            seq.steps += 1
        return produced

    def step_isolated(self, batch: Seq[S]) -> tuple[dict[S, list[int]], dict[S, Exception]]:
        """`step`, where a failure costs only the sequences that cause it: (tokens of the others,
        the error of each failed one). After a failed step every sequence is put back as it was
        (its slot's length, its random stream, its proposer state and counters), each is tried
        alone and put back again, and the step runs again without those that fail alone. When
        none fails alone, the batch itself is the problem and every sequence fails with its error.
        A step that succeeds costs nothing more than `step`."""
        marks = [self._mark(seq) for seq in batch]
        try:
            return self.step(batch), {}
        except Exception as exc:
            error = exc
        for mark in marks:
            self._rewind(mark)
        failed: dict[S, Exception] = {}
        for seq, mark in zip(batch, marks):
            try:
                self.step([seq])
            except Exception as exc:
                failed[seq] = exc
            self._rewind(mark)
        if not failed:
            return {}, dict.fromkeys(batch, error)
        survivors = [seq for seq in batch if seq not in failed]
        return (self.step(survivors) if survivors else {}), failed

    def _mark(self, seq: S) -> _Mark[S]:
        slot = _slot(seq)
        draft = getattr(self.proposer, "draft", None)
        return _Mark(
            seq=seq,
            length=self.engine.length(slot),
            draft_length=draft.slot_lengths[slot] if draft is not None else None,
            rng_offset=seq.rng.offset,
            counters=(seq.steps, seq.proposed, seq.accepted),
        )

    def _rewind(self, mark: _Mark[S]) -> None:
        seq, slot = mark.seq, _slot(mark.seq)
        if self.engine.length(slot) != mark.length:
            self.engine.truncate(slot, mark.length)  # what a failed call appended is masked until overwritten
        draft = getattr(self.proposer, "draft", None)
        if draft is not None and mark.draft_length is not None and draft.slot_lengths[slot] not in (None, mark.draft_length):
            draft.truncate(slot, mark.draft_length)
        seq.rng.rewind(mark.rng_offset)
        seq.steps, seq.proposed, seq.accepted = mark.counters

    # ---------------------------------------------------------------- update

    def update(self, produced: Mapping[S, Seq[int]]) -> list[tuple[S, list[int]]]:
        """Append each running sequence's new tokens up to the one that finishes it (a finished
        sequence frees its slot at once); returns each with the tokens it kept. Sequences no
        longer running (cancelled meanwhile) are skipped."""
        kept: list[tuple[S, list[int]]] = []
        for seq, tokens in produced.items():
            if seq.status != SequenceStatus.RUNNING:
                continue
            taken: list[int] = []
            for token in tokens:
                taken.append(token)
                reason = self._append(seq, token)
                if reason is not None:
                    seq.finish_reason = reason
                    self.finish(seq, SequenceStatus.FINISHED)
                    break
            kept.append((seq, taken))
        return kept

    def _append(self, seq: Sequence, token: int) -> FinishReason | None:
        seq.output_ids.append(token)
        if seq.detok is not None and seq.detok.add([token]) is not None and seq.detok.stopped:
            return FinishReason.STOP
        return finish_reason(
            seq.output_ids,
            prompt_len=len(seq.prompt_ids),
            stopping=seq.stopping,
            eos_token_ids=self.eos_token_ids,
            seq_len=self.engine.config.seq_len,
        )

    def finish(self, seq: S, status: SequenceStatus = SequenceStatus.CANCELLED) -> None:
        """End `seq` with `status` and free its slot (in the engine and the proposer), or take it
        off the queue."""
        seq.status = status
        if seq.slot is not None and self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            self.engine.free(seq.slot)
            if self.proposer is not None:
                self.proposer.free(seq.slot)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def finish_all(self, status: SequenceStatus = SequenceStatus.CANCELLED) -> list[S]:
        """End every running and waiting sequence; returns them."""
        ended = [*self.running.values(), *self.waiting]
        for seq in ended:
            self.finish(seq, status)
        return ended


@dataclass(frozen=True)
class _Mark(Generic[S]):
    """A sequence's state before a step, to put it back after a failed one."""

    seq: S
    length: int
    draft_length: int | None
    rng_offset: int
    counters: tuple[int, int, int]


def _slot(seq: Sequence) -> int:
    assert seq.slot is not None, "a sequence steps only once it holds a slot"
    return seq.slot
