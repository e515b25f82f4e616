"""Single-process generation: context encoding, then token generation until each request stops.

A small continuous-batching loop over the engine's slots: prompts wait in a queue, are encoded
into free slots (up to ctx_batch_size per call), then every step runs one token-generation call
over all running requests; a finished request frees its slot for the next prompt at once.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from nxcore.engine import Engine, SequenceRequest
from nxcore.sampling import RequestRng, SamplingParams
from nxcore.speculation import DraftProposer, NgramProposer, SpecSequence, can_speculate, speculative_step

Proposer = NgramProposer | DraftProposer


class FinishReason(enum.StrEnum):
    LENGTH = "length"
    """max_new_tokens reached, or the slot's seq_len is full."""
    EOS = "eos"
    STOP = "stop"
    """A stop token id was generated."""


@dataclass(frozen=True)
class StoppingCriteria:
    max_new_tokens: int = 16
    """Upper bound on generated tokens (>= 1)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the request (included in the output), besides eos."""
    ignore_eos: bool = False
    """Keep generating past eos tokens."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} is invalid: allowed >= 1")


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    """Generated tokens only, including the token that stopped the request."""
    finish_reason: FinishReason | None = None


@dataclass
class _Running:
    index: int
    result: GenerationResult
    sampling: SamplingParams
    rng: RequestRng


def finish_reason(
    result: GenerationResult, *, stopping: StoppingCriteria, eos_token_ids: Sequence[int], seq_len: int
) -> FinishReason | None:
    """Why the request should stop after its latest token, or None to continue."""
    last = result.output_ids[-1]
    if not stopping.ignore_eos and last in eos_token_ids:
        return FinishReason.EOS
    if last in stopping.stop_token_ids:
        return FinishReason.STOP
    if len(result.output_ids) >= stopping.max_new_tokens:
        return FinishReason.LENGTH
    if len(result.prompt_ids) + len(result.output_ids) >= seq_len:
        return FinishReason.LENGTH
    return None


def generate(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    *,
    sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    stopping: StoppingCriteria = StoppingCriteria(),
    eos_token_ids: Sequence[int] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    proposer: Proposer | None = None,
) -> list[GenerationResult]:
    """Generate for every prompt; more prompts than slots wait for a free slot.

    `sampling` is one setting for all prompts or one per prompt. `eos_token_ids` defaults to the
    checkpoint's. `on_token(prompt_index, token)` is called as tokens are produced. With a
    `proposer` (see nxcore.speculation) each step is a speculation round that emits 1 to k + 1
    tokens per request; sequences too close to seq_len for a round take a plain step.
    """
    per_prompt = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
    if len(per_prompt) != len(prompts):
        raise ValueError(f"{len(per_prompt)} sampling settings given for {len(prompts)} prompts")
    eos = tuple(engine.model_config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    results = [GenerationResult(prompt_ids=list(p)) for p in prompts]
    waiting = deque(range(len(prompts)))
    running: dict[int, _Running] = {}

    def emit(slot: int, state: _Running, token: int) -> bool:
        """Record a token; returns False once the request has finished."""
        state.result.output_ids.append(token)
        if on_token is not None:
            on_token(state.index, token)
        reason = finish_reason(state.result, stopping=stopping, eos_token_ids=eos, seq_len=engine.config.seq_len)
        if reason is not None:
            state.result.finish_reason = reason
            engine.free(slot)
            if proposer is not None:
                proposer.free(slot)
            del running[slot]
        return reason is None

    try:
        while waiting or running:
            admit = _admit(engine, waiting, running, results, per_prompt)
            if admit:
                tokens = engine.context_encode(admit)
                for request, token in zip(admit, tokens):
                    if proposer is not None:
                        proposer.prefill(request.slot, request.token_ids, request.sampling, request.rng)
                    emit(request.slot, running[request.slot], token)
                continue
            spec = [slot for slot in running if proposer is not None and can_speculate(engine, slot)]
            plain = [slot for slot in running if slot not in spec]
            if spec:
                sequences = [SpecSequence(slot=slot, tokens=running[slot].result.prompt_ids + running[slot].result.output_ids,
                                          sampling=running[slot].sampling, rng=running[slot].rng) for slot in spec]
                for slot, tokens in zip(spec, speculative_step(engine, proposer, sequences)):
                    for token in tokens:
                        if not emit(slot, running[slot], token):
                            break
            requests = [
                SequenceRequest(slot=slot, token_ids=[running[slot].result.output_ids[-1]], sampling=running[slot].sampling,
                                rng=running[slot].rng)
                for slot in plain
            ]
            for request, token in zip(requests, engine.token_generate(requests)):
                emit(request.slot, running[request.slot], token)
    finally:
        for slot in list(running):
            engine.free(slot)
            if proposer is not None:
                proposer.free(slot)
    return results


def _admit(
    engine: Engine,
    waiting: deque[int],
    running: dict[int, _Running],
    results: list[GenerationResult],
    sampling: list[SamplingParams],
) -> list[SequenceRequest]:
    """Move waiting prompts into free slots, up to one context-encoding call's worth."""
    admitted: list[SequenceRequest] = []
    free = [s for s in engine.free_slots() if s not in running]
    while waiting and free and len(admitted) < engine.config.ctx_batch_size:
        index, slot = waiting.popleft(), free.pop(0)
        rng = RequestRng(sampling[index].seed)
        running[slot] = _Running(index=index, result=results[index], sampling=sampling[index], rng=rng)
        admitted.append(SequenceRequest(slot=slot, token_ids=results[index].prompt_ids, sampling=sampling[index], rng=rng))
    return admitted
