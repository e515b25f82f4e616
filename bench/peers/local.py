"""nxserve's engine and transformers on a batch workload, measured as the vLLM worker measures vLLM
(bench.peers.method), plus the engine's own decode-step figures from bench.engine."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from bench.engine import decode_ms_per_step
from bench.peers.method import measure
from nxcore import Engine, RuntimeConfig, StoppingCriteria, generate

ENGINE_STEPS = 16
"""Timed decode steps for the engine-step figures (bench.engine's default)."""


def nxserve_figures(model: Path, prompts: list[list[int]], new_tokens: int, *, backend: str, dtype: str, ctx_batch: int | None, repeats: int) -> dict:
    """The workload through nxcore.generate (all prompts queued at once, one slot each), then
    bench.engine's decode step time at batch 1 and at the workload's batch."""
    batch, prompt_len = len(prompts), max(len(p) for p in prompts)
    seq_len = prompt_len + max(new_tokens, ENGINE_STEPS + 2)
    config = RuntimeConfig(batch_size=batch, ctx_batch_size=min(ctx_batch or batch, batch), seq_len=seq_len, dtype=dtype, backend=backend)
    print(f"[nxserve {backend}] loading {model} ...", file=sys.stderr)
    # compile: graphs missing from the artifact cache compile on first use (in the untimed warm-up)
    engine = Engine.from_pretrained(model, config, compile_cache=Path(".cache/compiled"), compile_on_demand=True)

    def run(rows: list[list[int]], n: int) -> tuple[float, int]:
        start = time.perf_counter()
        results = generate(engine, rows, stopping=StoppingCriteria(max_new_tokens=n, ignore_eos=True))
        return time.perf_counter() - start, sum(len(r.output_ids) for r in results)

    try:
        print(f"[nxserve {backend}] workload ...", file=sys.stderr)
        figures = measure(run, prompts, new_tokens, repeats=repeats).to_dict()
        print(f"[nxserve {backend}] engine steps (bench.engine) ...", file=sys.stderr)
        step_b1 = decode_ms_per_step(engine, 1, prompt_len, ENGINE_STEPS)
        step_batch = decode_ms_per_step(engine, batch, prompt_len, ENGINE_STEPS)
    finally:
        engine.close()
    return {**figures, "step_b1_ms": step_b1, f"step_b{batch}_tok_s": batch * 1000 / step_batch, "ctx_batch_size": config.ctx_batch_size}


@torch.no_grad()
def transformers_figures(model: Path, prompts: list[list[int]], new_tokens: int, *, dtype: str, repeats: int) -> dict:
    """generate() on the same checkpoint and dtype: the prompts as one right-aligned batch (they have
    one length, so no padding), greedy, cache on, eos ignored."""
    print(f"[transformers] loading {model} ...", file=sys.stderr)
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

    print("[transformers] workload ...", file=sys.stderr)
    return measure(run, prompts, new_tokens, repeats=repeats).to_dict()
