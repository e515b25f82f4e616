"""bench/workload.py: length specs, validation, the shipped workload files, reproducible requests."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench.common import random_prompts
from bench.workload import Lengths, Workload

WORKLOADS = Path(__file__).parents[2] / "bench" / "workloads"


@pytest.mark.parametrize(
    "spec, kind, lo, hi", [("128", "fixed", 128, 128), (64, "fixed", 64, 64), ("32..512", "uniform", 32, 512), ("100+-30", "normal", 10, 190)]
)
def test_lengths_parse_sample_and_print(spec: str | int, kind: str, lo: int, hi: int) -> None:
    lengths = Lengths.parse(spec)
    assert lengths.kind == kind and str(lengths) == str(spec)
    sample = lengths.sample(np.random.default_rng(0), 2000)
    assert min(sample) >= lo and max(sample) <= hi and all(isinstance(n, int) for n in sample)


@pytest.mark.parametrize("spec", ["", "0", "9..3", "abc", "-5", "10+-"])
def test_bad_lengths_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="lengths"):
        Lengths.parse(spec)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"requests": 0}, "requests"),
        ({"rate": [1, 0]}, "rate"),
        ({"top_p": 0}, "top_p"),
        ({"rate": 1, "concurrency": 2}, "not both"),
        ({"prompt": "tokens"}, "prompt"),
        ({"reqests": 3}, "unknown"),
        ({"stream_interval": -1}, "stream_interval"),
    ],
)
def test_bad_workloads_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Workload.from_dict(values)


@pytest.mark.parametrize("name", ["small-batch32", "serve-poisson"])
def test_shipped_workloads_load_and_round_trip(name: str) -> None:
    workload = Workload.from_dict(json.loads((WORKLOADS / f"{name}.json").read_text()))
    assert workload.description
    assert Workload.from_dict({k: v for k, v in workload.to_dict().items() if v != []}) == workload


def test_small_batch32_is_the_engine_benchmarks_batch() -> None:
    workload = Workload.from_dict(json.loads((WORKLOADS / "small-batch32.json").read_text()))
    assert workload.loads == [{"concurrency": 32}] and workload.temperature == 0
    requests = workload.make_requests(512)
    assert [r.prompt for r in requests] == random_prompts(32, 128, 512, seed=0)
    assert {r.max_new_tokens for r in requests} == {64}


def test_requests_and_arrivals_are_reproducible() -> None:
    workload = Workload.from_dict({"requests": 50, "prompt_len": "8..64", "output_len": "20+-5", "rate": [2, "inf"]})
    first, again = workload.make_requests(1000), workload.make_requests(1000)
    assert first == again and len({len(r.prompt) for r in first}) > 1
    assert all(4 <= t < 1000 for r in first for t in r.prompt)
    slow, fast = workload.arrival_offsets(2), workload.arrival_offsets(4)
    assert slow[0] == 0 and all(a <= b for a, b in itertools.pairwise(slow))
    assert np.allclose(np.asarray(slow) / 2, fast)  # the same gaps, scaled
    assert workload.arrival_offsets(math.inf) == [0.0] * 50
    text = Workload.from_dict({"requests": 3, "prompt": "text", "prompt_len": 7}).make_requests(1000)
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == 7 for r in text)
