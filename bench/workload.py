"""A serving workload: how many requests, how long their prompts and outputs are, how they arrive.

Read from a JSON file (bench/workloads/*.json; the schema is in bench/serve.py's docstring) with
command-line flags on top, validated once. Everything random comes from `seed`, so a workload
file names the same requests on every machine.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np

from bench.common import random_prompts

# Text prompts are these words in random order; the server tokenizes them.
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "one",
    "all",
    "we",
    "their",
    "has",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "time",
    "people",
    "year",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
]
# Token ids 0-3 are left to special tokens (as bench.common.random_prompts does); ids are drawn below this
# when the server's vocabulary size is unknown.
FALLBACK_VOCAB = 256


@dataclass(frozen=True)
class Lengths:
    """Per-request token counts: "N" (fixed), "LO..HI" (uniform, inclusive) or "MEAN+-STD" (normal,
    rounded, clipped to MEAN +- 3 STD and to at least 1)."""

    kind: Literal["fixed", "uniform", "normal"]
    a: float  # the count, LO or MEAN
    b: float = 0.0  # HI or STD

    @classmethod
    def parse(cls, spec: str | int) -> Lengths:
        text = str(spec).strip()
        if m := re.fullmatch(r"(\d+)", text):
            out = cls("fixed", int(m[1]))
        elif m := re.fullmatch(r"(\d+)\s*\.\.\s*(\d+)", text):
            out = cls("uniform", int(m[1]), int(m[2]))
        elif m := re.fullmatch(r"(\d+(?:\.\d*)?)\s*\+-\s*(\d+(?:\.\d*)?)", text):
            out = cls("normal", float(m[1]), float(m[2]))
        else:
            raise ValueError(f"lengths must be N, LO..HI or MEAN+-STD (e.g. 128, 32..512, 256+-64), got {spec!r}")
        if out.a < 1 or (out.kind == "uniform" and out.b < out.a):
            raise ValueError(f"lengths {spec!r}: counts must be >= 1 and LO <= HI")
        return out

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        if self.kind == "fixed":
            return [int(self.a)] * n
        if self.kind == "uniform":
            return rng.integers(int(self.a), int(self.b) + 1, size=n).tolist()
        lo, hi = max(1.0, self.a - 3 * self.b), self.a + 3 * self.b
        return np.clip(np.rint(rng.normal(self.a, self.b, size=n)), lo, hi).astype(int).tolist()

    def __str__(self) -> str:
        fmt = lambda x: f"{x:g}"  # noqa: E731
        return {"fixed": fmt(self.a), "uniform": f"{fmt(self.a)}..{fmt(self.b)}", "normal": f"{fmt(self.a)}+-{fmt(self.b)}"}[self.kind]


@dataclass(frozen=True)
class Request:
    """One request of the workload: a prompt (token ids or text) and its output length."""

    prompt: list[int] | str
    max_new_tokens: int
    seed: int


@dataclass(frozen=True)
class Workload:
    """The options of `bench serve` that describe the load (every key of a workload file)."""

    description: str = ""  # free text, printed with the results
    requests: int = 100  # requests per run (each rate or concurrency is one run)
    prompt_len: Lengths = Lengths("fixed", 128)  # prompt tokens (words, for text prompts)
    output_len: Lengths = Lengths("fixed", 128)  # max_new_tokens of each request
    prompt: Literal["ids", "text"] = "ids"  # random token ids, or random English words the server tokenizes
    rate: tuple[float, ...] = ()  # Poisson arrival rates in requests/s, one run each; inf sends all at once
    concurrency: tuple[int, ...] = ()  # or: requests kept in flight, one run each (neither: concurrency 1)
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0  # 0: the server's candidate width
    top_p: float = 1.0  # nucleus threshold in (0, 1]
    ignore_eos: bool = True  # generate exactly max_new_tokens (eos does not end a request)
    seed: int = 0  # prompts, lengths, arrival times and per-request sampling seeds
    warmup: int = 1  # requests sent one by one before the runs, not measured
    timeout: float | None = None  # deadline per request in seconds (None: none)
    stream_interval: int = 0  # generated tokens per streamed message at least (0: the server's --stream-interval)

    def __post_init__(self) -> None:
        for name, ok, allowed in (
            ("requests", self.requests >= 1, ">= 1"),
            ("prompt", self.prompt in ("ids", "text"), "'ids' or 'text'"),
            ("rate", all(r > 0 for r in self.rate), "> 0 (inf: all at once)"),
            ("concurrency", all(c >= 1 for c in self.concurrency), ">= 1"),
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_k", self.top_k >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("warmup", self.warmup >= 0, ">= 0"),
            ("timeout", self.timeout is None or self.timeout > 0, "> 0 or null"),
            ("stream_interval", self.stream_interval >= 0, ">= 0 (the server refuses more than it allows)"),
        ):
            if not ok:
                raise ValueError(f"workload {name}={getattr(self, name)!r}: must be {allowed}")
        if self.rate and self.concurrency:
            raise ValueError("workload: give rate or concurrency, not both")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Workload:
        """A workload from JSON values (scalars where lists are allowed; lengths as int or string)."""
        known = [f.name for f in fields(cls)]
        if unknown := sorted(set(values) - set(known)):
            raise ValueError(f"unknown workload keys {unknown}; expected some of {known}")
        v = dict(values)
        for key in ("prompt_len", "output_len"):
            if key in v and not isinstance(v[key], Lengths):
                v[key] = Lengths.parse(v[key])
        for key, kind in (("rate", float), ("concurrency", int)):
            if key in v:
                items = v[key] if isinstance(v[key], list | tuple) else [v[key]]
                v[key] = tuple(kind(x) for x in items)
        return cls(**v)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (lengths as strings, rates as numbers or "inf")."""
        out = asdict(self)
        out.update(
            prompt_len=str(self.prompt_len),
            output_len=str(self.output_len),
            rate=[r if math.isfinite(r) else "inf" for r in self.rate],
            concurrency=list(self.concurrency),
        )
        return out

    @property
    def loads(self) -> list[dict[str, float]]:
        """One {"rate": R} or {"concurrency": N} per run."""
        if self.rate:
            return [{"rate": r} for r in self.rate]
        return [{"concurrency": c} for c in self.concurrency or (1,)]

    def make_requests(self, vocab_size: int) -> list[Request]:
        """The workload's requests, the same for every run and every machine with this seed."""
        rng = np.random.default_rng([self.seed, 0])
        prompt_lens = self.prompt_len.sample(rng, self.requests)
        output_lens = self.output_len.sample(rng, self.requests)
        if self.prompt == "ids":
            # Rows of one random_prompts call, cut to length: with a fixed length these are exactly
            # the prompts bench.engine uses (random_prompts(batch, length, vocab, seed)).
            rows = random_prompts(self.requests, max(prompt_lens), vocab_size, seed=self.seed)
            prompts: list[list[int] | str] = [row[:n] for row, n in zip(rows, prompt_lens)]
        else:
            prompts = [" ".join(rng.choice(WORDS, size=n).tolist()) for n in prompt_lens]
        return [Request(p, n, self.seed + i) for i, (p, n) in enumerate(zip(prompts, output_lens))]

    def arrival_offsets(self, rate: float) -> list[float]:
        """Seconds from the start of a run at which each request is sent: a Poisson process at `rate`
        (the same unit gaps for every rate, scaled), or all at 0 for an infinite rate."""
        if math.isinf(rate):
            return [0.0] * self.requests
        gaps = np.random.default_rng([self.seed, 1]).exponential(1.0, size=self.requests)
        return (np.concatenate([[0.0], np.cumsum(gaps[:-1])]) / rate).tolist()
