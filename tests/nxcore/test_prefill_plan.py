"""How waiting prompts are split into context-encoding calls (nxcore.prefill_plan)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nxcore.prefill_plan import CALL_OVERHEAD_TOKENS, padded_tokens, plan_context_calls

BUCKETS = [32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512]
ROWS = [1, 2, 4, 8, 16, 32]


def plan(lengths, **kw):
    return plan_context_calls(lengths, buckets=BUCKETS, row_buckets=ROWS, **kw)


def cost(lengths, calls, overhead=CALL_OVERHEAD_TOKENS):
    return padded_tokens(lengths, calls, buckets=BUCKETS, row_buckets=ROWS) + overhead * len(calls)


def partitions(items):
    """Every set partition of `items`."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in partitions(rest):
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1 :]]
        yield [[first], *part]


def test_one_long_prompt_among_short_ones_does_not_pad_them_all():
    lengths = [128] * 31 + [130]
    calls = plan(lengths)
    assert sorted(len(c) for c in calls) == [1, 15, 16]
    assert [lengths[i] for i in calls[0]] == [130]  # the cheapest call first
    assert padded_tokens(lengths, calls, buckets=BUCKETS, row_buckets=ROWS) == 160 + 32 * 128
    assert padded_tokens(lengths, [list(range(32))], buckets=BUCKETS, row_buckets=ROWS) == 32 * 160


def test_rows_are_not_padded_to_the_next_power_of_two_when_a_call_costs_less():
    assert sorted(len(c) for c in plan([128] * 9)) == [1, 8]  # 9 rows would run 16
    assert [len(c) for c in plan([128] * 16)] == [16]


def test_max_tokens_caps_each_call_but_a_long_prompt_still_runs():
    calls = plan([128] * 32, max_tokens=2048)
    assert sorted(len(c) for c in calls) == [16, 16]
    assert [len(c) for c in plan([128] * 32, max_tokens=8192)] == [32]
    assert plan([500, 40], max_tokens=100) == [[1], [0]]


def test_nothing_to_plan_and_bad_limits():
    assert plan([]) == []
    with pytest.raises(ValueError, match="max_tokens=0"):
        plan([10], max_tokens=0)
    # longer than the largest bucket: a call of its own, first, which the engine refuses naming the limit
    assert plan([20, 513, 30, 600]) == [[1], [3], [0, 2]]


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 512), min_size=1, max_size=6),
    max_tokens=st.sampled_from([256, 1024, 2048, 100_000]),
    overhead=st.sampled_from([0, 32, 96, 1000]),
)
def test_the_plan_is_the_cheapest_split(lengths, max_tokens, overhead):
    calls = plan(lengths, max_tokens=max_tokens, call_overhead=overhead)
    assert sorted(i for c in calls for i in c) == list(range(len(lengths)))
    for call in calls:
        if len(call) > 1:
            assert padded_tokens(lengths, [call], buckets=BUCKETS, row_buckets=ROWS) <= max_tokens
    feasible = [
        p
        for p in partitions(list(range(len(lengths))))
        if all(len(c) == 1 or padded_tokens(lengths, [c], buckets=BUCKETS, row_buckets=ROWS) <= max_tokens for c in p)
    ]
    assert cost(lengths, calls, overhead) == min(cost(lengths, p, overhead) for p in feasible)
    sizes = [padded_tokens(lengths, [c], buckets=BUCKETS, row_buckets=ROWS) for c in calls]
    assert sizes == sorted(sizes)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 512), min_size=1, max_size=64))
def test_more_prompts_than_the_largest_row_bucket_are_split(lengths):
    calls = plan(lengths, max_tokens=100_000)
    assert all(len(c) <= ROWS[-1] for c in calls)
    assert sorted(i for c in calls for i in c) == list(range(len(lengths)))
