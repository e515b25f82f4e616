"""Single-process generation: context encoding, then token generation until each request stops.

A small continuous-batching loop over the engine's slots, driven by `nxcore.scheduler`: prompts
wait in a queue, are encoded into free slots (up to ctx_batch_size per call), then every step runs
one token-generation call (or a speculation round) over all running requests; a finished request
frees its slot for the next prompt at once.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from nxcore.engine import Engine, SequenceRequest
from nxcore.prefill_plan import plan_context_calls
from nxcore.sampling import RequestRng, SamplingParams
from nxcore.scheduler import Scheduler, Sequence
from nxcore.speculation import Proposer
from nxcore.stopping import FinishReason, StoppingCriteria, finish_reason

__all__ = ["FinishReason", "GenerationResult", "StoppingCriteria", "finish_reason", "generate"]


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    """Generated tokens only, including the token that stopped the request."""
    finish_reason: FinishReason | None = None


def generate(
    engine: Engine,
    prompts: Seq[Seq[int]],
    *,
    sampling: SamplingParams | Seq[SamplingParams] = SamplingParams(),
    stopping: StoppingCriteria = StoppingCriteria(),
    eos_token_ids: Seq[int] | None = None,
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
    scheduler: Scheduler[Sequence] = Scheduler(engine, proposer=proposer, eos_token_ids=eos_token_ids, max_admit=engine.config.ctx_batch_size)
    sequences = [Sequence(prompt_ids=list(p), sampling=s, rng=RequestRng(s.seed), stopping=stopping) for p, s in zip(prompts, per_prompt)]
    index = {seq: i for i, seq in enumerate(sequences)}
    for seq in sequences:
        scheduler.add(seq)
    try:
        while scheduler.has_unfinished():
            out = scheduler.schedule()
            if out.admitted:  # their first token comes from context encoding; the others wait a call
                produced = _encode(engine, proposer, out.admitted)
            else:
                produced = scheduler.step(out.running)
            for seq, tokens in scheduler.update(produced):
                if on_token is not None:
                    for token in tokens:
                        on_token(index[seq], token)
    finally:
        scheduler.finish_all()  # an error midway: free the slots still held
    return [GenerationResult(prompt_ids=s.prompt_ids, output_ids=s.output_ids, finish_reason=s.finish_reason) for s in sequences]


def _encode(engine: Engine, proposer: Proposer | None, admitted: list[Sequence]) -> dict[Sequence, list[int]]:
    """Encode the admitted prompts (and into the proposer), in the calls that pad the least
    (`nxcore.prefill_plan`); each one's first token."""
    cfg = engine.config
    produced: dict[Sequence, list[int]] = {}
    for call in plan_context_calls([len(s.prompt_ids) for s in admitted], buckets=cfg.buckets, row_buckets=cfg.ctx_batch_buckets):
        seqs = [admitted[i] for i in call]
        requests = [SequenceRequest(slot=s.slot, token_ids=s.prompt_ids, sampling=s.sampling, rng=s.rng) for s in seqs]  # type: ignore[arg-type]
        tokens = engine.context_encode(requests)
        if proposer is not None:
            for r in requests:
                proposer.prefill(r.slot, r.token_ids, r.sampling, r.rng)
        produced.update({seq: [token] for seq, token in zip(seqs, tokens)})
    return {seq: produced[seq] for seq in admitted}
