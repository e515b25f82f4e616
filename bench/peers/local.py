"""nxserve's engine and transformers on a batch workload, measured as the vLLM worker measures vLLM
(bench.peers.method), plus the engine's own decode-step figures from bench.engine; and the thread
settings (torch threads, CPU pinning) they run under."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from bench.engine import decode_ms_per_step
from bench.peers.method import measure
from nxcore import Engine, RuntimeConfig, StoppingCriteria, generate
from nxcore.config import default_buckets

ENGINE_STEPS = 16
"""Timed decode steps for the engine-step figures (bench.engine's default)."""


def cpu_list(cores: Sequence[int]) -> str:
    """CPU ids the way taskset and vLLM's log write them: 0-3,6."""
    spans: list[list[int]] = []
    for core in sorted(cores):
        if spans and core == spans[-1][1] + 1:
            spans[-1][1] = core
        else:
            spans.append([core, core])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


@dataclass(frozen=True)
class Threads:
    """How a local engine computes: `count` torch threads, on `cores`. `setting` is the --threads value
    it came from: 0 is torch's default thread count with the process's own CPUs (nothing pinned);
    N >= 1 is N threads with the whole process pinned to N cores (os.sched_setaffinity)."""

    setting: int
    count: int
    cores: tuple[int, ...]

    @property
    def pinned(self) -> bool:
        return self.setting > 0

    @property
    def label(self) -> str:
        """The engine-name suffix: '2 threads' (torch's default, unpinned) or '1 thread (core 0)'."""
        threads = f"{self.count} thread{'s' if self.count != 1 else ''}"
        if not self.pinned:
            return threads
        return f"{threads} ({'core' if len(self.cores) == 1 else 'cores'} {cpu_list(self.cores)})"

    def describe(self) -> str:
        if self.pinned:
            where = f"{'core' if len(self.cores) == 1 else 'cores'} {cpu_list(self.cores)}"
            return f"{self.count} torch thread{'s' if self.count != 1 else ''}, the process pinned to {where} (sched_setaffinity)"
        return f"{self.count} torch threads (torch's default), not pinned (the process's cores {cpu_list(self.cores)})"

    def to_dict(self) -> dict[str, Any]:
        return {"setting": self.setting, "threads": self.count, "cores": list(self.cores), "pinned": self.pinned, "description": self.describe()}


def thread_settings(values: Sequence[int], *, default_threads: int, cores: Sequence[int]) -> list[Threads]:
    """One Threads per --threads value: 0 -> torch's default count on every core the process may use
    (`cores`); N -> N threads pinned to the first N of `cores`."""
    if len(set(values)) != len(values) or any(v < 0 for v in values):
        raise ValueError(f"--threads {' '.join(map(str, values))}: give distinct values >= 0")
    if not cores:
        raise ValueError("no cores to run on")
    out = []
    for value in values:
        if value > len(cores):
            raise ValueError(f"--threads {value}: only {len(cores)} cores to pin to ({cpu_list(cores)})")
        out.append(Threads(value, value or default_threads, tuple(cores[:value]) if value else tuple(sorted(os.sched_getaffinity(0)))))
    return out


@contextmanager
def applied(threads: Threads, *, default_threads: int) -> Iterator[None]:
    """Run the block under `threads`: torch.set_num_threads, and for a pinned setting every thread of
    the process (torch's OpenMP workers included, which may predate the block) on its cores. Both are
    restored after; a thread started inside the block gets the process's former CPUs."""
    before_threads = torch.get_num_threads()
    before = _affinities()
    torch.set_num_threads(threads.count if threads.pinned else default_threads)
    if threads.pinned:
        for tid in before:
            _set_affinity(tid, set(threads.cores))
    try:
        yield
    finally:
        torch.set_num_threads(before_threads)
        if threads.pinned:
            main = before[os.getpid()]
            for tid in _task_ids():
                _set_affinity(tid, before.get(tid, main))


def _task_ids() -> list[int]:
    return [int(tid) for tid in os.listdir("/proc/self/task")]


def _affinities() -> dict[int, set[int]]:
    """Each thread of the process -> the CPUs it may run on."""
    out = {}
    for tid in _task_ids():
        try:
            out[tid] = os.sched_getaffinity(tid)
        except ProcessLookupError:  # the thread ended meanwhile
            pass
    return out


def _set_affinity(tid: int, cores: set[int]) -> None:
    try:
        os.sched_setaffinity(tid, cores)
    except ProcessLookupError:  # the thread ended meanwhile
        pass


def engine_config(
    prompts: list[list[int]], new_tokens: int, ttft_lens: Sequence[int], *, backend: str, dtype: str, ctx_batch: int | None
) -> RuntimeConfig:
    """Slots for every prompt, seq_len for the workload (plus bench.engine's steps) and for the longest
    TTFT prompt with its one token. The workload's own length stays a bucket, so its decode steps
    attend over the same cache length as with seq_len sized for the workload alone."""
    batch, prompt_len = len(prompts), max(len(p) for p in prompts)
    workload_len = prompt_len + max(new_tokens, ENGINE_STEPS + 2)
    seq_len = max([workload_len] + [n + 1 for n in ttft_lens])
    buckets = tuple(sorted(set(default_buckets(seq_len, backend)) | {workload_len}))
    return RuntimeConfig(
        batch_size=batch, ctx_batch_size=min(ctx_batch or batch, batch), seq_len=seq_len, buckets=buckets, dtype=dtype, backend=backend
    )


def nxserve_figures(
    model: Path,
    prompts: list[list[int]],
    new_tokens: int,
    *,
    backend: str,
    dtype: str,
    ctx_batch: int | None,
    repeats: int,
    ttft_prompts: Sequence[Sequence[list[int]]] = (),
    tag: str = "",
) -> dict:
    """The workload through nxcore.generate (all prompts queued at once, one slot each), TTFT per
    prompt length, then bench.engine's decode step time at batch 1 and at the workload's batch."""
    batch, prompt_len = len(prompts), max(len(p) for p in prompts)
    config = engine_config(prompts, new_tokens, [len(g[0]) for g in ttft_prompts], backend=backend, dtype=dtype, ctx_batch=ctx_batch)
    name = f"[nxserve {backend}{', ' + tag if tag else ''}]"
    print(f"{name} loading {model} ...", file=sys.stderr)
    # compile: graphs missing from the artifact cache compile on first use (in the untimed warm-up)
    engine = Engine.from_pretrained(model, config, compile_cache=Path(".cache/compiled"), compile_on_demand=True)

    def run(rows: list[list[int]], n: int) -> tuple[float, int]:
        start = time.perf_counter()
        results = generate(engine, rows, stopping=StoppingCriteria(max_new_tokens=n, ignore_eos=True))
        return time.perf_counter() - start, sum(len(r.output_ids) for r in results)

    try:
        print(f"{name} workload ...", file=sys.stderr)
        figures = measure(run, prompts, new_tokens, repeats=repeats, ttft_prompts=ttft_prompts).to_dict()
        print(f"{name} engine steps (bench.engine) ...", file=sys.stderr)
        step_b1 = decode_ms_per_step(engine, 1, prompt_len, ENGINE_STEPS)
        step_batch = decode_ms_per_step(engine, batch, prompt_len, ENGINE_STEPS)
    finally:
        engine.close()
    return {**figures, "step_b1_ms": step_b1, f"step_b{batch}_tok_s": batch * 1000 / step_batch, "ctx_batch_size": config.ctx_batch_size}


@torch.no_grad()
def transformers_figures(
    model: Path,
    prompts: list[list[int]],
    new_tokens: int,
    *,
    dtype: str,
    repeats: int,
    ttft_prompts: Sequence[Sequence[list[int]]] = (),
    tag: str = "",
) -> dict:
    """generate() on the same checkpoint and dtype: the prompts as one right-aligned batch (they have
    one length, so no padding), greedy, cache on, eos ignored."""
    name = f"[transformers{', ' + tag if tag else ''}]"
    print(f"{name} loading {model} ...", file=sys.stderr)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()

    def run(rows: list[list[int]], n: int) -> tuple[float, int]:
        if len({len(r) for r in rows}) != 1:
            raise ValueError("transformers runs prompts of one length only (no padding)")
        ids = torch.tensor(rows)
        start = time.perf_counter()
        out = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        return time.perf_counter() - start, (out.shape[1] - ids.shape[1]) * out.shape[0]

    print(f"{name} workload ...", file=sys.stderr)
    return measure(run, prompts, new_tokens, repeats=repeats, ttft_prompts=ttft_prompts).to_dict()
