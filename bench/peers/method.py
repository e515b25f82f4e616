"""How every engine in bench.peers is measured, so that the figures compare (stdlib only: the vLLM
worker imports this inside vLLM's virtualenv).

An engine is given as `run(prompts, new_tokens) -> (seconds, output_tokens)`: one call that submits
every prompt at once, greedy with eos ignored, and returns its wall time and how many tokens came out.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

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
    ttft_ms: dict[int, float] = field(default_factory=dict)
    """Prompt length L -> a prompt of L token ids alone, one new token (median over fresh prompts of
    that length, see `measure`)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; json.dumps turns the ttft_ms lengths into strings (from_dict reads them back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Figures:
        """The figures in `data` (other keys ignored), ttft_ms lengths as ints even after a JSON round trip."""
        ttft = {int(length): float(ms) for length, ms in data.get("ttft_ms", {}).items()}
        return cls(batch_tok_s=data["batch_tok_s"], ttft_b1_ms=data["ttft_b1_ms"], decode_b1_ms=data["decode_b1_ms"], ttft_ms=ttft)


def check_ttft_prompts(ttft_prompts: Sequence[Sequence[list[int]]], repeats: int) -> list[int]:
    """The prompt length of each group; every group must hold repeats + 1 prompts of one length, and
    no two groups the same length."""
    lengths = []
    for group in ttft_prompts:
        sizes = {len(p) for p in group}
        if len(group) != repeats + 1 or len(sizes) != 1 or 0 in sizes:
            raise ValueError(
                f"each TTFT group needs repeats + 1 = {repeats + 1} non-empty prompts of one length, got lengths {sorted(sizes)} x {len(group)}"
            )
        lengths.append(sizes.pop())
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"TTFT prompt lengths repeat: {lengths}")
    return lengths


def measure(run: Run, prompts: list[list[int]], new_tokens: int, *, repeats: int, ttft_prompts: Sequence[Sequence[list[int]]] = ()) -> Figures:
    """Untimed warm-ups (all prompts, then one prompt, 2 new tokens each: every batch shape the timed
    calls use, so no engine compiles inside them), then the timed calls.

    Then TTFT per prompt length: `ttft_prompts` holds, for each length, repeats + 1 different prompts
    of that length; the first is an untimed warm-up call at that length (an engine that compiles per
    length does it there), the others are timed one new token each, the median kept. Every timed
    call gets a prompt the engine has not seen, so a prefix cache (vLLM's is on by default, in blocks
    of 128 tokens on CPU) has nothing to reuse and every engine computes the whole prompt."""
    if new_tokens < 2 or repeats < 1:
        raise ValueError(f"new_tokens={new_tokens} must be >= 2 and repeats={repeats} >= 1")
    lengths = check_ttft_prompts(ttft_prompts, repeats)

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
    ttft = {}
    for length, (warmup, *fresh) in zip(lengths, ttft_prompts):
        timed([warmup], 1)
        ttft[length] = statistics.median(timed([p], 1) for p in fresh) * 1000
    return Figures(
        batch_tok_s=len(prompts) * new_tokens / batch,
        ttft_b1_ms=first * 1000,
        decode_b1_ms=(full - first) / (new_tokens - 1) * 1000,
        ttft_ms=ttft,
    )
