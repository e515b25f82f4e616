"""Prompts waiting together: encoded in one context-encoding call, or in the calls
`nxcore.prefill_plan` picks (the prefill worker's split), timed on the eager engine in one run.

    python -m bench.prefill_plan --model DIR [--batch 32] [--max-tokens 2048] [--rounds 3]

Cases: 32 prompts of 128 tokens; 31 of 128 and one of 130 (vLLM's random dataset re-tokenized
gives such lengths); 9 of 128 (one more than a row bucket, --batch / 4 + 1); and the prompts of --workload (default: uniform 32..512 tokens) in
groups of --batch. For each it prints the padded tokens computed and the time of one call against
the planned calls (median of --rounds, the two alternating so machine noise lands on both) and
their ratio (> 1: the plan is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import GREEDY
from bench.workload import Workload
from nxcore import Engine, RequestRng, RuntimeConfig, SequenceRequest
from nxcore.prefill_plan import DEFAULT_MAX_TOKENS, padded_tokens, plan_context_calls

DEFAULT_WORKLOAD = Path(__file__).resolve().parent / "workloads" / "uniform-32-512.json"


def encode(engine: Engine, prompts: list[list[int]], calls: list[list[int]]) -> float:
    """Seconds to encode `prompts` in these calls (slots freed after each)."""
    start = time.perf_counter()
    for call in calls:
        requests = [SequenceRequest(slot=k, token_ids=prompts[i], sampling=GREEDY, rng=RequestRng(0)) for k, i in enumerate(call)]
        engine.context_encode(requests)
        for r in requests:
            engine.free(r.slot)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prefill_plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="engine dtype (default: bfloat16)")
    p.add_argument("--batch", type=int, default=32, help="prompts waiting together at most: the engine's ctx_batch_size (default: 32)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help=f"the plan's padded tokens per call (default: {DEFAULT_MAX_TOKENS})")
    p.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD, help="workload JSON for the last case's lengths (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="timed passes per case and strategy, alternating (median kept; default: 3)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)

    workload = Workload.from_dict(json.loads(args.workload.read_text()))
    rng = np.random.default_rng(0)
    engine = Engine.from_pretrained(args.model, RuntimeConfig(batch_size=args.batch, ctx_batch_size=args.batch, seq_len=512, dtype=args.dtype))
    cfg = engine.config
    vocab = engine.model_config.vocab_size
    fits = [n for n in workload.prompt_len.sample(rng, workload.requests) if n <= cfg.max_prompt_len]
    cases = {
        f"{args.batch} x 128": [[128] * args.batch],
        f"{args.batch - 1} x 128 + 1 x 130": [[128] * (args.batch - 1) + [130]],
        f"{args.batch // 4 + 1} x 128": [[128] * (args.batch // 4 + 1)],  # one more than a row bucket
        f"{args.workload.stem} in groups of {args.batch}": [fits[i : i + args.batch] for i in range(0, len(fits), args.batch)],
    }
    print(f"{args.model}: {args.dtype}, ctx_batch_size {args.batch}, buckets {list(cfg.buckets)}, max tokens {args.max_tokens}", file=sys.stderr)
    rows = []
    for name, groups in cases.items():
        work = []
        for lengths in groups:
            prompts = [rng.integers(0, vocab, n).tolist() for n in lengths]
            one = [list(range(len(lengths)))]
            planned = plan_context_calls(lengths, buckets=cfg.buckets, row_buckets=cfg.ctx_batch_buckets, max_tokens=args.max_tokens)
            work.append((prompts, one, planned, lengths))
        for prompts, one, planned, _ in work:  # warm every shape once
            encode(engine, prompts, one)
            encode(engine, prompts, planned)
        times: dict[str, list[float]] = {"one": [], "plan": []}
        for _ in range(args.rounds):
            times["one"].append(sum(encode(engine, prompts, one) for prompts, one, _, _ in work))
            times["plan"].append(sum(encode(engine, prompts, planned) for prompts, _, planned, _ in work))
        real = sum(sum(lengths) for *_, lengths in work)
        computed = {
            "one": sum(padded_tokens(lengths, one, buckets=cfg.buckets, row_buckets=cfg.ctx_batch_buckets) for _, one, _, lengths in work),
            "plan": sum(padded_tokens(lengths, planned, buckets=cfg.buckets, row_buckets=cfg.ctx_batch_buckets) for _, _, planned, lengths in work),
        }
        row = {
            "case": name,
            "prompt_tokens": real,
            "calls": {"one": len(work), "plan": sum(len(planned) for _, _, planned, _ in work)},
            "padding": {k: 1 - real / v for k, v in computed.items()},
            "ms": {k: statistics.median(v) * 1000 for k, v in times.items()},
        }
        row["speedup"] = row["ms"]["one"] / row["ms"]["plan"]
        rows.append(row)
        print(f"{name}: done", file=sys.stderr)

    print(f"{'case':34}{'calls one/plan':>16}{'padding one':>13}{'padding plan':>14}{'one ms':>10}{'plan ms':>10}{'speedup':>9}")
    for r in rows:
        calls = f"{r['calls']['one']}/{r['calls']['plan']}"
        print(
            f"{r['case']:34}{calls:>16}{r['padding']['one']:>12.1%}{r['padding']['plan']:>14.1%}"
            f"{r['ms']['one']:>10.1f}{r['ms']['plan']:>10.1f}{r['speedup']:>8.2f}x"
        )
    if args.json:
        figures = {"model": args.model, "dtype": args.dtype, "batch": args.batch, "max_tokens": args.max_tokens, "cases": rows}
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
