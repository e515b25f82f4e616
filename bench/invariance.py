"""The cost of batch-invariant mode: decode steps and prefill with it on and off, same run.

    python -m bench.invariance --model DIR [--dtype bfloat16] [--batches 1 32] [--prefill-lens 128 512 2048]

Two engines on the same checkpoint and shapes, one with `batch_invariant=True`; each figure is
timed on both in alternation (`--rounds` times, the median kept), so machine noise lands on both.
Prints ms per decode step and per prefill call for each mode and the ratio invariant / default
(above 1: the mode costs that much). The mode's kernels are described in nxcore/csrc/invariant.cpp.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench.engine import decode_ms_per_step, prefill_ms
from nxcore import Engine, RuntimeConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="engine dtype (default: bfloat16)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="decode batch sizes (default: 1 32)")
    p.add_argument("--prefill-lens", type=int, nargs="+", default=[128, 512, 2048], help="prompt lengths (default: 128 512 2048)")
    p.add_argument("--prompt-len", type=int, default=128, help="context before decoding (default: 128)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per measurement (default: 16)")
    p.add_argument("--rounds", type=int, default=3, help="alternating measurements per figure and mode (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    seq_len = max(max(args.prefill_lens), args.prompt_len + args.steps + 2)
    base = RuntimeConfig(batch_size=max(args.batches), ctx_batch_size=1, seq_len=seq_len, dtype=args.dtype)
    engines = {mode: Engine.from_pretrained(args.model, base.replace(batch_invariant=mode == "invariant")) for mode in ("default", "invariant")}

    figures: dict[str, dict[str, float]] = {}

    def measure(label: str, fn) -> None:
        times: dict[str, list[float]] = {mode: [] for mode in engines}
        for engine in engines.values():  # warm-up, untimed
            fn(engine)
        for _ in range(args.rounds):
            for mode, engine in engines.items():
                times[mode].append(fn(engine))
        figures[label] = {mode: statistics.median(t) for mode, t in times.items()}
        row = figures[label]
        print(f"{label:<24} default {row['default']:9.2f} ms   invariant {row['invariant']:9.2f} ms   ratio {row['invariant'] / row['default']:.3f}")
        sys.stdout.flush()

    print(f"{args.model} ({args.dtype}), invariant / default, median of {args.rounds} alternating rounds")
    for batch in args.batches:
        measure(f"decode b{batch} ms/step", lambda e, b=batch: decode_ms_per_step(e, b, args.prompt_len, args.steps))
    for length in args.prefill_lens:
        measure(f"prefill {length} ms", lambda e, n=length: prefill_ms(e, n, 1))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "dtype": args.dtype, "figures": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
