"""How every engine in bench.peers is measured, so that the figures compare (stdlib only: the vLLM
worker imports this inside vLLM's virtualenv).

An engine is given as `run(prompts, new_tokens) -> (seconds, output_tokens)`: one call that submits
every prompt at once, greedy with eos ignored, and returns its wall time and how many tokens came out.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

Run = Callable[[list[list[int]], int], tuple[float, int]]


@dataclass(frozen=True)
class Figures:
    batch_tok_s: float
    """Every prompt at once: output tokens / wall time, prefill included (best of the repeats)."""
    ttft_b1_ms: float
    """The first prompt alone, one new token: prefill plus the engine's per-request overhead (median)."""
    decode_b1_ms: float
    """The first prompt alone: (time for new_tokens - time for 1) / (new_tokens - 1), medians, so the
    prompt's prefill cancels out."""

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def measure(run: Run, prompts: list[list[int]], new_tokens: int, *, repeats: int) -> Figures:
    """Untimed warm-ups (all prompts, then one prompt, 2 new tokens each: every batch shape the timed
    calls use, so no engine compiles inside them), then the timed calls."""
    if new_tokens < 2 or repeats < 1:
        raise ValueError(f"new_tokens={new_tokens} must be >= 2 and repeats={repeats} >= 1")

    def timed(batch: list[list[int]], n: int) -> float:
        seconds, tokens = run(batch, n)
        if tokens != len(batch) * n:
            raise RuntimeError(f"the engine produced {tokens} tokens for {len(batch)} prompts x {n}")
        return seconds

    timed(prompts, 2)
    timed(prompts[:1], 2)
    batch = min(timed(prompts, new_tokens) for _ in range(repeats))
    first = statistics.median(timed(prompts[:1], 1) for _ in range(repeats))
    full = statistics.median(timed(prompts[:1], new_tokens) for _ in range(repeats))
    return Figures(batch_tok_s=len(prompts) * new_tokens / batch, ttft_b1_ms=first * 1000, decode_b1_ms=(full - first) / (new_tokens - 1) * 1000)
