"""Runtime config: the analog of NxD's NeuronConfig.

It fixes every static shape the graphs are built for (slots, context batch, sequence length,
context buckets, speculation length, top-k width) plus the execution choices (dtype, TP degree,
backend). It is validated once, at construction, and saved as JSON next to compiled artifacts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
BACKENDS = ("eager", "compile", "xla")
"""eager: the PyTorch modules; compile: AOTInductor packages (nxcore.compiled); xla: XLA programs
through torch-xla, the Neuron path (nxcore.xla; needs torch-xla, which the project venv lacks)."""
BUCKET_STEPS: dict[str, tuple[int, int]] = {"eager": (32, 4), "compile": (64, 2), "xla": (64, 2)}
"""Default context-encoding buckets per backend: (smallest, buckets per octave). A prompt runs in
the smallest bucket that holds it, so the padding it computes is at most one step of its octave.
Chosen by cost: an eager bucket costs nothing until used, so eager takes four per octave (uniform
32..512-token prompts then compute 7.5% padding, against 25.8% with powers of two); a compiled one
costs a graph to build, load and keep (AOTInductor: bench.buckets measures it), so the compiled
backends take two per octave (14.3%). `python -m bench.buckets` reports both on a workload."""

KV_START = 128
"""Smallest default KV-length bucket of the compiled backends (see `RuntimeConfig.kv_buckets`)."""


def power_of_two_buckets(limit: int, *, start: int = 1) -> tuple[int, ...]:
    """Powers of two from `start` up to `limit`, plus `limit` itself."""
    buckets = []
    size = start
    while size < limit:
        buckets.append(size)
        size *= 2
    buckets.append(limit)
    return tuple(buckets)


def octave_buckets(limit: int, *, start: int, per_octave: int) -> tuple[int, ...]:
    """`per_octave` evenly spaced lengths in each octave [start * 2^k, start * 2^(k+1)), up to
    `limit`, plus `limit` itself: e.g. start 32, 4 per octave: 32, 40, 48, 56, 64, 80, ..."""
    buckets: list[int] = []
    base = start
    while True:
        for i in range(per_octave):
            size = base + base * i // per_octave
            if size >= limit:
                buckets.append(limit)
                return tuple(dict.fromkeys(buckets))
            buckets.append(size)
        base *= 2


def default_buckets(seq_len: int, backend: str = "eager") -> tuple[int, ...]:
    """Context-encoding lengths for `backend` up to seq_len (see BUCKET_STEPS)."""
    start, per_octave = BUCKET_STEPS.get(backend, BUCKET_STEPS["compile"])
    return octave_buckets(seq_len, start=min(start, seq_len), per_octave=per_octave)


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"RuntimeConfig.{name}={value!r} is invalid: allowed {allowed}")


@dataclass(frozen=True)
class RuntimeConfig:
    """Static shapes and execution choices of one engine instance."""

    batch_size: int = 4
    """Decode slots: rows of the token-generation graph and of the KV cache."""
    ctx_batch_size: int = 1
    """Rows of the context-encoding graph (prompts encoded per call)."""
    seq_len: int = 512
    """Longest sequence (prompt + generated tokens) a slot holds."""
    buckets: tuple[int, ...] = ()
    """Context-encoding lengths, ascending; empty means `default_buckets(seq_len, backend)`."""
    tp_degree: int = 1
    """Tensor-parallel degree the graphs are built for."""
    ep_degree: int = 1
    """Expert-parallel degree: MoE experts split into this many groups over the TP ranks (divides tp_degree)."""
    moe_capacity_factor: float | None = None
    """Per-expert token capacity factor for MoE dispatch; None computes every routed token exactly."""
    dtype: str = "auto"
    """Weights, activations and KV cache dtype: one of DTYPES, or `auto` for the checkpoint's own."""
    on_device_sampling: bool = True
    """Sample inside the graph (True) or return logits and sample on the host (False)."""
    max_topk: int = 256
    """Width of the in-graph top-k candidate set; a request's top_k may not exceed it."""
    speculation_length: int = 0
    """Tokens scored per speculation-graph call; 0 builds no speculation graph."""
    backend: str = "eager"
    """Graph backend: one of BACKENDS."""
    batch_invariant: bool = False
    """Every row computed as if alone: a request's bits do not depend on the batch, the buckets or
    whether its KV came from context encoding or token generation (see nxcore/csrc/invariant.cpp
    and the README). Off by default: prefill and batched decode are slower (bench.invariance)."""

    def __post_init__(self) -> None:
        _require(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _require(
            isinstance(self.ctx_batch_size, int) and 1 <= self.ctx_batch_size <= self.batch_size,
            "ctx_batch_size",
            self.ctx_batch_size,
            f"1..batch_size ({self.batch_size})",
        )
        _require(isinstance(self.seq_len, int) and self.seq_len >= 2, "seq_len", self.seq_len, ">= 2")
        buckets = tuple(self.buckets) if self.buckets else default_buckets(self.seq_len, self.backend)
        _require(
            all(isinstance(b, int) and 1 <= b <= self.seq_len for b in buckets),
            "buckets",
            buckets,
            f"integers in 1..seq_len ({self.seq_len})",
        )
        _require(list(buckets) == sorted(set(buckets)), "buckets", buckets, "strictly ascending values")
        object.__setattr__(self, "buckets", buckets)
        _require(isinstance(self.tp_degree, int) and self.tp_degree >= 1, "tp_degree", self.tp_degree, ">= 1")
        _require(
            isinstance(self.ep_degree, int) and self.ep_degree >= 1 and self.tp_degree % self.ep_degree == 0,
            "ep_degree",
            self.ep_degree,
            f"a divisor of tp_degree ({self.tp_degree})",
        )
        _require(self.moe_capacity_factor is None or self.moe_capacity_factor > 0, "moe_capacity_factor", self.moe_capacity_factor, "None or > 0")
        _require(self.dtype == "auto" or self.dtype in DTYPES, "dtype", self.dtype, f"'auto' or one of {sorted(DTYPES)}")
        _require(isinstance(self.max_topk, int) and self.max_topk >= 1, "max_topk", self.max_topk, ">= 1")
        _require(
            isinstance(self.speculation_length, int) and 0 <= self.speculation_length < self.seq_len,
            "speculation_length",
            self.speculation_length,
            f"0..{self.seq_len - 1}",
        )
        _require(self.backend in BACKENDS, "backend", self.backend, f"one of {list(BACKENDS)}")
        _require(isinstance(self.batch_invariant, bool), "batch_invariant", self.batch_invariant, "True or False")
        _require(
            not (self.batch_invariant and self.backend == "xla"),
            "backend",
            self.backend,
            "eager or compile in batch-invariant mode (its kernels are nxcore's C++ ops, which XLA does not run)",
        )
        _require(
            not (self.batch_invariant and self.moe_capacity_factor is not None),
            "moe_capacity_factor",
            self.moe_capacity_factor,
            "None in batch-invariant mode (capacity drops a token or not by the other tokens of the call)",
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            raise ValueError("RuntimeConfig.dtype is 'auto': resolve it against the checkpoint first")
        return DTYPES[self.dtype]

    @property
    def ctx_batch_buckets(self) -> tuple[int, ...]:
        """Row counts the context-encoding graph is built for: a call with fewer prompts runs the
        smallest that fits, so padding rows cost at most as many rows as real ones."""
        return power_of_two_buckets(self.ctx_batch_size)

    @property
    def batch_buckets(self) -> tuple[int, ...]:
        """Row counts the token-generation and speculation graphs are built for (see ctx_batch_buckets)."""
        return power_of_two_buckets(self.batch_size)

    @property
    def kv_buckets(self) -> tuple[int, ...]:
        """Cache lengths token generation and speculation attend over: a call reads only the
        smallest that holds every row's positions (NxDI's token-generation buckets). They are the
        context buckets, except under a compiled backend with the default buckets: there each KV
        length is one graph per batch bucket and kind, so they stay powers of two from KV_START (the
        decode graphs then read at most twice the cache they need, as before the finer context buckets)."""
        if self.backend != "eager" and self.buckets == default_buckets(self.seq_len, self.backend):
            return power_of_two_buckets(self.seq_len, start=min(KV_START, self.seq_len))
        return tuple(sorted(set(self.buckets) | {self.seq_len}))

    @property
    def max_prompt_len(self) -> int:
        return self.buckets[-1]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["buckets"] = list(self.buckets)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RuntimeConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown RuntimeConfig fields {unknown}; known fields: {sorted(names)}")
        data = dict(data)
        if "buckets" in data:
            data["buckets"] = tuple(data["buckets"])
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RuntimeConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def check_matches(self, saved: RuntimeConfig, *, what: str = "the saved config") -> None:
        """Raise if a shape or execution field differs from `saved` (e.g. compiled artifacts' config)."""
        mine, theirs = self.to_dict(), saved.to_dict()
        diffs = [f"{k}={mine[k]!r} (saved: {theirs[k]!r})" for k in mine if mine[k] != theirs[k]]
        if diffs:
            raise ValueError(f"runtime config does not match {what}: {', '.join(diffs)}; use the saved values or rebuild")

    def replace(self, **changes: Any) -> RuntimeConfig:
        """A copy with `changes`; default buckets follow a new seq_len unless buckets are given."""
        if (
            ("seq_len" in changes or "backend" in changes)
            and "buckets" not in changes
            and self.buckets == default_buckets(self.seq_len, self.backend)
        ):
            changes["buckets"] = ()
        return dataclasses.replace(self, **changes)
