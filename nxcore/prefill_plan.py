"""How prompts waiting together are split into context-encoding calls.

A call pads its prompts to one (rows, length) graph shape: rows to the next `ctx_batch_buckets`
size, every prompt to the bucket of the longest. Encoding whatever waits in one call wastes work
whenever those differ: nine prompts run sixteen rows, and one 130-token prompt among 31 of 128
tokens makes all 32 run the 160 bucket. Each call also pays a fixed cost (the weights are read
once per call however few rows it has), so splitting too finely wastes work too.

`plan_context_calls` picks the split that computes the fewest tokens, padding included, counting
each call's fixed cost as `call_overhead` tokens, with at most `max_tokens` padded tokens a call
(vLLM's max_num_batched_tokens, TGI's --max-batch-prefill-tokens): past a few thousand rows of
activations a call runs slower per token, and a long call delays every decode step behind it.
Measured with the 125M llama (bf16, eager, 2 threads on an Intel Xeon with AMX; `python -m
bench.prefill_plan`): 32 prompts of 128 tokens in one call took 787 ms, in two calls of 16 569 ms
(a cap of 1024 tokens: 755 ms, 4096: 731).

The calls go cheapest first, so the prompts that are cheapest to encode get their first token
soonest (shortest processing time first: the least total waiting).
"""

from __future__ import annotations

from collections.abc import Sequence

CALL_OVERHEAD_TOKENS = 96
"""A call's fixed cost in prompt tokens' worth of compute. Measured as above: one prompt of 32
tokens took 23.7 ms and one of 128 30.3 ms, where a batched token costs 0.12-0.17 ms; the weights
read once per call cost about as much as computing ~100 tokens. (It is the ratio of the CPU's
matmul rate to its memory bandwidth, so it depends little on the model's size.)"""

DEFAULT_MAX_TOKENS = 2048
"""Padded prompt tokens per call at most, by default (see the module's docstring)."""


def plan_context_calls(
    lengths: Sequence[int],
    *,
    buckets: Sequence[int],
    row_buckets: Sequence[int],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    call_overhead: int = CALL_OVERHEAD_TOKENS,
) -> list[list[int]]:
    """Split prompts of these lengths into calls; returns each call's prompt indices, calls
    cheapest first. `buckets` and `row_buckets` are the engine's sorted context-encoding lengths and
    row counts. A prompt whose bucket alone exceeds `max_tokens` gets a call of its own; so does one
    longer than the largest bucket, first, for the engine to refuse with its own error."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} is invalid: a call holds at least one token")
    too_long = [[i] for i, n in enumerate(lengths) if n > buckets[-1]]
    largest_rows = row_buckets[-1]
    order = sorted((i for i, n in enumerate(lengths) if n <= buckets[-1]), key=lambda i: lengths[i])
    width = [_fit(lengths[i], buckets, "prompt length") for i in order]
    n = len(order)
    # best[j]: the cheapest split of the j shortest prompts; prompts of one call are contiguous in
    # length order (moving a shorter prompt into the call of longer ones never costs less).
    best = [0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):
            rows = j - i
            if rows > largest_rows:
                break
            tokens = _fit(rows, row_buckets, "rows") * width[j - 1]
            if tokens > max_tokens and rows > 1:
                break  # more rows only add tokens
            cost = best[i] + tokens + call_overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    calls = []
    j = n
    while j > 0:
        calls.append([order[k] for k in range(cut[j], j)])
        j = cut[j]
    calls.sort(key=lambda call: (padded_tokens(lengths, [call], buckets=buckets, row_buckets=row_buckets), min(call)))
    return too_long + calls


def padded_tokens(lengths: Sequence[int], calls: Sequence[Sequence[int]], *, buckets: Sequence[int], row_buckets: Sequence[int]) -> int:
    """Tokens the calls compute, padding included."""
    return sum(_fit(len(call), row_buckets, "rows") * _fit(max(lengths[i] for i in call), buckets, "prompt length") for call in calls)


def _fit(n: int, sizes: Sequence[int], what: str) -> int:
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"{what} {n} is over the largest size {sizes[-1]}")
