"""The scheduler both generation loops share, on a fake engine (no checkpoint): continuous
batching over slots, stopping, cancellation, stop strings, and speculation giving the same tokens."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from types import SimpleNamespace

import pytest

from nxcore.engine import SequenceRequest
from nxcore.sampling import RequestRng, SamplingParams
from nxcore.scheduler import Scheduler, Sequence, SequenceStatus
from nxcore.speculation import NgramProposer
from nxcore.stopping import FinishReason, StoppingCriteria

VOCAB = 10


def successor(token: int) -> int:
    """The fake model: after token t comes (t + 1) mod VOCAB, whatever the context."""
    return (token + 1) % VOCAB


class FakeEngine:
    """The engine calls the scheduler makes, over a deterministic next-token rule; counts its calls."""

    def __init__(self, *, batch_size: int = 2, seq_len: int = 64, speculation_length: int = 0, eos: Seq[int] = ()) -> None:
        self.config = SimpleNamespace(batch_size=batch_size, seq_len=seq_len, speculation_length=speculation_length, ctx_batch_size=batch_size)
        self.model_config = SimpleNamespace(eos_token_ids=tuple(eos))
        self.slot_lengths: list[int | None] = [None] * batch_size
        self.calls: list[tuple[str, list[int]]] = []

    def free_slots(self) -> list[int]:
        return [i for i, n in enumerate(self.slot_lengths) if n is None]

    def length(self, slot: int) -> int:
        length = self.slot_lengths[slot]
        assert length is not None
        return length

    def free(self, slot: int) -> None:
        self.slot_lengths[slot] = None

    def context_encode(self, requests: list[SequenceRequest]) -> list[int]:
        self.calls.append(("context", [r.slot for r in requests]))
        for r in requests:
            assert self.slot_lengths[r.slot] is None
            self.slot_lengths[r.slot] = len(r.token_ids)
        return [successor(r.token_ids[-1]) for r in requests]

    def token_generate(self, requests: list[SequenceRequest]) -> list[int]:
        self.calls.append(("token", [r.slot for r in requests]))
        for r in requests:
            self.slot_lengths[r.slot] = self.length(r.slot) + 1
        return [successor(r.token_ids[0]) for r in requests]

    def speculate(self, requests: list[SequenceRequest]) -> list[list[int]]:
        self.calls.append(("speculate", [r.slot for r in requests]))
        for r in requests:
            self.slot_lengths[r.slot] = self.length(r.slot) + len(r.token_ids)
        return [[successor(t) for t in r.token_ids] for r in requests]

    def truncate(self, slot: int, n_tokens: int) -> None:
        self.slot_lengths[slot] = n_tokens


def _seq(prompt: list[int], max_new_tokens: int = 5, *, output_ids: list[int] | None = None, **kwargs: object) -> Sequence:
    return Sequence(
        prompt_ids=prompt,
        sampling=SamplingParams(),
        rng=RequestRng(0),
        output_ids=list(output_ids or []),
        stopping=StoppingCriteria(max_new_tokens=max_new_tokens, **kwargs),  # type: ignore[arg-type]
    )


def _run(scheduler: Scheduler, engine: FakeEngine, sequences: list[Sequence]) -> None:
    """The loop nxcore.generate runs."""
    for seq in sequences:
        scheduler.add(seq)
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        if out.admitted:
            requests = [SequenceRequest(slot=s.slot, token_ids=s.prompt_ids, sampling=s.sampling, rng=s.rng) for s in out.admitted]
            produced = {s: [t] for s, t in zip(out.admitted, engine.context_encode(requests))}
            if scheduler.proposer is not None:
                for r in requests:
                    scheduler.proposer.prefill(r.slot, r.token_ids, r.sampling, r.rng)
        else:
            produced = scheduler.step(out.running)
        scheduler.update(produced)


def _chain(last: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        last = successor(last)
        out.append(last)
    return out


def test_more_sequences_than_slots_take_freed_slots_and_each_stops_at_its_length() -> None:
    engine = FakeEngine(batch_size=2)
    scheduler = Scheduler(engine, max_admit=2)  # type: ignore[arg-type]
    seqs = [_seq([1, 2], 3), _seq([5], 6), _seq([7, 8, 9], 2)]
    _run(scheduler, engine, seqs)
    assert [s.output_ids for s in seqs] == [_chain(2, 3), _chain(5, 6), _chain(9, 2)]
    assert all(s.status == SequenceStatus.FINISHED and s.finish_reason == FinishReason.LENGTH for s in seqs)
    assert engine.free_slots() == [0, 1] and not scheduler.running
    assert ("context", [0]) in engine.calls  # the third took the first one's slot once it finished
    assert max(len(slots) for _, slots in engine.calls) == 2


def test_eos_stop_tokens_and_the_slot_length_end_a_sequence() -> None:
    engine = FakeEngine(batch_size=3, seq_len=8, eos=(4,))
    scheduler = Scheduler(engine)  # type: ignore[arg-type]
    eos, stop, full = _seq([1], 9), _seq([5], 9, stop_token_ids=(7,)), _seq([8, 9, 0, 1, 2], 9, ignore_eos=True)
    _run(scheduler, engine, [eos, stop, full])
    assert (eos.output_ids, eos.finish_reason) == ([2, 3, 4], FinishReason.EOS)
    assert (stop.output_ids, stop.finish_reason) == ([6, 7], FinishReason.STOP)
    assert (full.output_ids, full.finish_reason) == ([3, 4, 5], FinishReason.LENGTH)  # 5 + 3 = seq_len


def test_a_cancelled_sequence_keeps_no_tokens_and_frees_its_slot_before_the_next_step() -> None:
    engine = FakeEngine(batch_size=1)
    scheduler = Scheduler(engine)  # type: ignore[arg-type]
    first, second = _seq([1], 50), _seq([3], 2)
    for seq in (first, second):
        scheduler.add(seq)
    out = scheduler.schedule()
    assert out.admitted == [first] and list(scheduler.waiting) == [second]
    [token] = engine.context_encode([SequenceRequest(slot=0, token_ids=[1], sampling=SamplingParams(), rng=RequestRng(0))])
    scheduler.update({first: [token]})
    produced = scheduler.step([first])
    first.status = SequenceStatus.CANCELLED  # as the decode service's cancel does, from another thread
    assert scheduler.update(produced) == [] and first.output_ids == [token]
    out = scheduler.schedule()
    assert out.admitted == [second] and second.slot == 0 and out.running == []


def test_finish_all_ends_running_and_waiting_sequences() -> None:
    engine = FakeEngine(batch_size=1)
    scheduler = Scheduler(engine)  # type: ignore[arg-type]
    running, waiting = _seq([1]), _seq([2])
    scheduler.add(running)
    scheduler.add(waiting)
    scheduler.schedule()
    engine.slot_lengths[0] = 1
    assert scheduler.finish_all() == [running, waiting]
    assert engine.free_slots() == [0] and not scheduler.has_unfinished()
    assert {running.status, waiting.status} == {SequenceStatus.CANCELLED}


def test_stop_strings_end_a_sequence_at_the_matching_token() -> None:
    class Letters:
        def decode(self, token_ids: list[int]) -> str:
            return "".join("abcdefghij"[t] for t in token_ids)

    engine = FakeEngine(batch_size=1)
    scheduler = Scheduler(engine, tokenizer=Letters())  # type: ignore[arg-type]
    seq = Sequence(
        prompt_ids=[0],
        sampling=SamplingParams(),
        rng=RequestRng(0),
        stopping=StoppingCriteria(max_new_tokens=9),
        stop_strings=("de",),
        output_ids=[1],
    )  # the first token came from elsewhere (prefill)
    scheduler.add(seq)
    scheduler.schedule()
    engine.slot_lengths[0] = 1
    while seq.status == SequenceStatus.RUNNING:
        scheduler.update(scheduler.step([seq]))
    assert seq.output_ids == [1, 2, 3, 4] and seq.finish_reason == FinishReason.STOP and seq.detok.text == "bc"


@pytest.mark.parametrize("k", [1, 3])
def test_speculation_gives_the_same_tokens_in_fewer_steps(k: int) -> None:
    prompt = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]  # prompt lookup finds the successor chain
    plain_engine, spec_engine = FakeEngine(batch_size=2), FakeEngine(batch_size=2, speculation_length=k)
    plain = [_seq(prompt, 12), _seq([3, 3], 4)]
    spec = [_seq(prompt, 12), _seq([3, 3], 4)]
    spec[1].speculate = False  # opted out: plain steps beside speculating ones
    _run(Scheduler(plain_engine), plain_engine, plain)  # type: ignore[arg-type]
    scheduler = Scheduler(spec_engine, proposer=NgramProposer(k))  # type: ignore[arg-type]
    _run(scheduler, spec_engine, spec)
    assert [s.output_ids for s in spec] == [s.output_ids for s in plain]
    assert spec[0].steps < plain[0].steps and spec[0].accepted > 0 and spec[1].proposed == 0
    assert any(kind == "speculate" for kind, _ in spec_engine.calls)


class Poisoned(FakeEngine):
    """A fake engine whose token generation draws every row's random number and appends to every
    slot, then fails when any row carries POISON: the worst case for the rows that did nothing wrong."""

    POISON = VOCAB - 1

    def token_generate(self, requests: list[SequenceRequest]) -> list[int]:
        draws = [float(r.rng.draw(1)) for r in requests]
        for r in requests:
            self.slot_lengths[r.slot] = self.length(r.slot) + 1
        if any(r.token_ids[0] == self.POISON for r in requests):
            raise ValueError("poisoned row")
        return [(successor(r.token_ids[0]) + (u > 0.5)) % (VOCAB - 1) for r, u in zip(requests, draws)]


def _isolated_run(engine: Poisoned, sequences: list[Sequence]) -> dict[Sequence, Exception]:
    scheduler = Scheduler(engine)  # type: ignore[arg-type]
    for seq in sequences:
        scheduler.add(seq)
    failures: dict[Sequence, Exception] = {}
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        for seq in out.admitted:
            engine.slot_lengths[seq.slot] = len(seq.prompt_ids)  # KV imported, as the decode service does
        produced, failed = scheduler.step_isolated(out.running + out.admitted)
        for seq in failed:
            scheduler.finish(seq)
        failures.update(failed)
        scheduler.update(produced)
    return failures


def test_a_step_that_fails_for_one_sequence_fails_only_it_and_the_others_keep_their_tokens() -> None:
    def batch(poisoned: bool) -> list[Sequence]:
        seqs = [
            Sequence(
                prompt_ids=[1, 2],
                sampling=SamplingParams(temperature=1.0),
                rng=RequestRng(seed),
                stopping=StoppingCriteria(max_new_tokens=8),
                output_ids=[first],
            )
            for seed, first in ((1, 3), (2, 5))
        ]
        if poisoned:
            seqs.insert(
                1,
                Sequence(
                    prompt_ids=[1],
                    sampling=SamplingParams(),
                    rng=RequestRng(3),
                    stopping=StoppingCriteria(max_new_tokens=8),
                    output_ids=[Poisoned.POISON],
                ),
            )
        return seqs

    clean, poisoned = batch(False), batch(True)
    assert _isolated_run(Poisoned(batch_size=3), clean) == {}
    engine = Poisoned(batch_size=3)
    failures = _isolated_run(engine, poisoned)
    assert list(failures) == [poisoned[1]] and "poisoned row" in str(failures[poisoned[1]])
    survivors = [poisoned[0], poisoned[2]]
    assert [s.output_ids for s in survivors] == [s.output_ids for s in clean]  # the same tokens, random draws included
    assert [s.rng.offset for s in survivors] == [s.rng.offset for s in clean] and [s.steps for s in survivors] == [s.steps for s in clean]
    assert engine.free_slots() == [0, 1, 2]


def test_a_batch_that_fails_though_no_sequence_fails_alone_fails_every_sequence() -> None:
    class FailsInBatches(FakeEngine):
        def token_generate(self, requests: list[SequenceRequest]) -> list[int]:
            if len(requests) > 1:
                raise RuntimeError("a batch-wide fault")
            return super().token_generate(requests)

    engine = FailsInBatches(batch_size=2)
    scheduler = Scheduler(engine)  # type: ignore[arg-type]
    seqs = [_seq([1], output_ids=[2]), _seq([3], output_ids=[4])]
    for seq in seqs:
        scheduler.add(seq)
    out = scheduler.schedule()
    for seq in out.admitted:
        engine.slot_lengths[seq.slot] = 1
    produced, failed = scheduler.step_isolated(out.admitted)
    assert produced == {} and set(failed) == set(seqs) and all("batch-wide" in str(e) for e in failed.values())
    assert [engine.length(s.slot) for s in seqs] == [1, 1] and [s.steps for s in seqs] == [0, 0]  # put back as they were
