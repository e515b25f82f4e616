"""Decode step latency of an MoE model at batch 1 and 8: nxcore next to transformers, one run.

    python -m bench.moe --model DIR [--batches 1 8] [--prompt-len 64] [--steps 16]

Both sides decode greedily from the same random prompts with a KV cache: nxcore's
token_generate over the batch, transformers' forward with past_key_values (one new token per
row). Prints ms per step and the ratio; --json writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from bench.common import decode_steps, free_all, random_prompts
from nxcore import Engine, RuntimeConfig, native


@torch.no_grad()
def hf_step_ms(model, prompts: torch.Tensor, steps: int) -> float:
    out = model(prompts, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        out = model(token, past_key_values=past, use_cache=True)
        times.append(time.perf_counter() - start)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return statistics.median(times[1:]) * 1000


def main(argv: list[str] | None = None) -> int:
    native.configure_from(os.environ)  # an entry point: NXSERVE_NATIVE* are read here
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(f"loading {args.model} (transformers, {args.dtype}) ...", file=sys.stderr)
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    rows = {}
    for batch in args.batches:
        prompts = random_prompts(batch, args.prompt_len, hf.config.vocab_size)
        engine = Engine.from_pretrained(args.model, RuntimeConfig(batch_size=batch, ctx_batch_size=1, seq_len=256, dtype=args.dtype))
        ours, requests = decode_steps(engine, prompts, args.steps)
        free_all(engine, requests)
        theirs = hf_step_ms(hf, torch.tensor(prompts), args.steps)
        rows[batch] = {"nxcore_ms": ours, "hf_ms": theirs, "speedup": theirs / ours}
        engine.close()
    print(f"\n{args.model} ({hf.config.model_type}, {args.dtype}): decode step, median of {args.steps}")
    print(f"{'batch':>6}{'nxcore ms':>12}{'transformers ms':>18}{'speedup':>10}")
    for batch, r in rows.items():
        print(f"{batch:>6}{r['nxcore_ms']:>12.2f}{r['hf_ms']:>18.2f}{r['speedup']:>10.2f}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "dtype": args.dtype, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
