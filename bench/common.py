"""What the benchmark scripts share: seeded random prompts and timed decode steps on an engine."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from nxcore import Engine, RequestRng, SamplingParams, SequenceRequest

GREEDY = SamplingParams()


def random_prompts(batch: int, length: int, vocab: int, *, seed: int = 0) -> list[list[int]]:
    """`batch` prompts of `length` token ids (ids 0-3 are left to special tokens)."""
    return torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(seed)).tolist()


def decode_steps(
    engine: Engine, prompts: list[list[int]], steps: int, between: Callable[[], object] | None = None
) -> tuple[float, list[SequenceRequest]]:
    """Encode each prompt into slot i, then time `steps` greedy token-generation calls over all of
    them (after one untimed warm-up call), calling `between` (untimed) after each. Returns the
    median ms per call and the requests for the next step; the slots stay encoded (free them with
    `free_all`)."""
    requests = []
    for slot, prompt in enumerate(prompts):
        [first] = engine.context_encode([SequenceRequest(slot=slot, token_ids=prompt, sampling=GREEDY, rng=RequestRng(0))])
        requests.append(SequenceRequest(slot=slot, token_ids=[first], sampling=GREEDY, rng=RequestRng(0)))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        tokens = engine.token_generate(requests)
        times.append(time.perf_counter() - start)
        if between is not None:
            between()
        requests = [SequenceRequest(slot=r.slot, token_ids=[t], sampling=GREEDY, rng=r.rng) for r, t in zip(requests, tokens)]
    return statistics.median(times[1:]) * 1000, requests


def free_all(engine: Engine, requests: list[SequenceRequest]) -> None:
    for r in requests:
        engine.free(r.slot)
