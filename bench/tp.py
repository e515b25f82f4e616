"""Decode step latency at TP=1 and TP=2, and the share of the step spent in collectives.

    python -m bench.tp --model DIR [--batch 1] [--prompt-len 128] [--steps 32]

One run: both engines on the same checkpoint, dtype and shapes. Step time is measured around the
engine's token_generate call (what a decode service pays); the collective share comes from the
torch profiler on rank 0 over the same graph. Prints a table; --json writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bench.common import decode_steps, free_all, random_prompts
from nxcore import Engine, RuntimeConfig, native
from nxcore.graphs import GraphKey, GraphKind


def measure(engine: Engine, *, batch: int, prompt_len: int, steps: int) -> dict[str, float]:
    step_ms, requests = decode_steps(engine, random_prompts(batch, prompt_len, engine.model_config.vocab_size), steps)
    inputs = engine._inputs(requests, rows=batch, width=1, prefill=False)
    prof = engine.executor.profile(GraphKey(GraphKind.TOKEN_GENERATION, batch, 1, inputs.key_positions.shape[0]), inputs, 8)
    free_all(engine, requests)
    return {"step_ms": step_ms, "graph_ms": prof["step_ms"], "collective_ms": prof["collective_ms"]}


def main(argv: list[str] | None = None) -> int:
    native.configure_from(os.environ)  # an entry point: NXSERVE_NATIVE* are read here
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=1, help="decode rows (default: 1)")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens in each slot before decoding (default: 128)")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps (default: 32)")
    p.add_argument("--dtype", default="auto", help="engine dtype (default: the checkpoint's)")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="TP degrees to compare (default: 1 2)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    results = {}
    for tp in args.tp:
        config = RuntimeConfig(batch_size=args.batch, seq_len=512, dtype=args.dtype, tp_degree=tp)
        print(f"TP={tp}: loading {args.model} ...", file=sys.stderr)
        engine = Engine.from_pretrained(args.model, config)
        try:
            results[tp] = measure(engine, batch=args.batch, prompt_len=args.prompt_len, steps=args.steps)
        finally:
            engine.close()
    base = results[args.tp[0]]["step_ms"]
    print(f"\n{args.model}: batch {args.batch}, {args.prompt_len}-token context, median of {args.steps} steps")
    print(f"{'TP':>4}{'step ms':>10}{'vs TP=' + str(args.tp[0]):>10}{'graph ms':>10}{'collectives ms':>16}{'share':>8}")
    for tp, r in results.items():
        share = r["collective_ms"] / r["graph_ms"] if r["graph_ms"] else 0.0
        print(f"{tp:>4}{r['step_ms']:>10.2f}{r['step_ms'] / base:>10.2f}{r['graph_ms']:>10.2f}{r['collective_ms']:>16.2f}{share:>8.1%}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "batch": args.batch, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
