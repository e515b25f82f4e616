"""Bucket sets: the padding they compute on a workload's prompts, what it costs in prefill time, and
what the set costs to build and warm, in one run.

    python -m bench.buckets --model DIR [--workload bench/workloads/uniform-32-512.json] [--compile-one]

For each bucket set (the old default, powers of two from 128; the eager default; the compiled
backends' default, see nxcore.config.BUCKET_STEPS) it prints:
- padding: padded tokens / tokens computed, each prompt in the smallest bucket that holds it;
- prefill s: the workload's prompts context-encoded one by one on the eager engine (the padding's
  real cost, measured; rounds alternate the sets so machine noise lands on all);
- graphs: the compile backend's graph count for the set (context encoding per bucket and row
  bucket, token generation per KV bucket and batch bucket) at --batch-size;
- warm-up s: one context-encoding call per bucket, what the prefill service runs at start.
--compile-one also compiles one context-encoding graph with AOTInductor and prints its time: the
compile backend's build cost per graph (`nxserve compile` pays it once per graph, ahead of serving).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import GREEDY
from bench.workload import Workload
from nxcore import Engine, RequestRng, RuntimeConfig, SequenceRequest
from nxcore.checkpoint import read_hf_config
from nxcore.compiled import graph_keys
from nxcore.config import default_buckets, power_of_two_buckets
from nxcore.graphs import GraphKey, GraphKind

DEFAULT_WORKLOAD = Path(__file__).resolve().parent / "workloads" / "uniform-32-512.json"


def padding(lengths: list[int], buckets: tuple[int, ...]) -> float:
    """Padded tokens / tokens computed, each prompt in the smallest bucket that holds it."""
    computed = sum(next(b for b in buckets if b >= n) for n in lengths)
    return 1 - sum(lengths) / computed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.buckets", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD, help="workload JSON whose prompts are measured (default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="engine dtype (default: bfloat16)")
    p.add_argument("--batch-size", type=int, default=32, help="decode slots, for the graph count (default: 32)")
    p.add_argument("--rounds", type=int, default=3, help="timed passes over the prompts per set, alternating sets (median kept; default: 3)")
    p.add_argument("--compile-one", action="store_true", help="also time AOTInductor compiling one context-encoding graph")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)

    workload = Workload.from_dict(json.loads(args.workload.read_text()))
    if workload.prompt != "ids":
        p.error(f"{args.workload}: bench.buckets needs prompt 'ids' (token ids), got {workload.prompt!r}")
    vocab = read_hf_config(args.model).vocab_size
    prompts = [r.prompt for r in workload.make_requests(vocab) if isinstance(r.prompt, list)]
    lengths = [len(prompt) for prompt in prompts]
    seq_len = max(lengths)
    sets = {
        "powers of two (old default)": power_of_two_buckets(seq_len, start=min(128, seq_len)),
        "eager default": default_buckets(seq_len, "eager"),
        "compiled default": default_buckets(seq_len, "compile"),
    }
    print(f"{args.workload.name}: {len(prompts)} prompts, {min(lengths)}..{max(lengths)} tokens ({sum(lengths)} in all)", file=sys.stderr)
    engines = {
        name: Engine.from_pretrained(args.model, RuntimeConfig(batch_size=1, seq_len=seq_len, buckets=buckets, dtype=args.dtype))
        for name, buckets in sets.items()
    }

    def encode(engine: Engine, ids: list[int]) -> None:
        engine.context_encode([SequenceRequest(slot=0, token_ids=ids, sampling=GREEDY, rng=RequestRng(0))])
        engine.free(0)

    results: dict[str, dict] = {}
    for name, engine in engines.items():
        start = time.perf_counter()
        for bucket in engine.config.buckets:
            encode(engine, [5] * bucket)
        warm_s = time.perf_counter() - start
        compiled = RuntimeConfig(
            batch_size=args.batch_size, seq_len=seq_len, backend="compile", buckets=sets[name] if name != "compiled default" else ()
        )
        keys = graph_keys(compiled)
        results[name] = {
            "buckets": list(engine.config.buckets),
            "padding": padding(lengths, engine.config.buckets),
            "warmup_s": warm_s,
            "graphs": len(keys),
            "context_graphs": sum(1 for k in keys if k.kind is GraphKind.CONTEXT),
            "prefill_s": [],
        }
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds} ...", file=sys.stderr)
        for name, engine in engines.items():
            start = time.perf_counter()
            for prompt in prompts:
                encode(engine, prompt)
            results[name]["prefill_s"].append(time.perf_counter() - start)
    for name, engine in engines.items():
        engine.close()
        results[name]["prefill_s"] = statistics.median(results[name]["prefill_s"])

    base = results["powers of two (old default)"]["prefill_s"]
    print(f"\n{args.model} ({args.dtype}), {args.workload.name}: {len(prompts)} prompts of {min(lengths)}..{max(lengths)} tokens, one per call")
    print(f"{'bucket set':30}{'buckets':>9}{'padding':>10}{'prefill s':>11}{'speedup':>9}{'graphs':>8}{'(context)':>11}{'warm-up s':>11}")
    for name, r in results.items():
        print(
            f"{name:30}{len(r['buckets']):9d}{r['padding']:10.1%}{r['prefill_s']:11.2f}{base / r['prefill_s']:8.2f}x"
            f"{r['graphs']:8d}{r['context_graphs']:11d}{r['warmup_s']:11.2f}"
        )
    print(
        f"graphs: what the set costs on the compile backend at batch size {args.batch_size} (each one built by `nxserve compile`; "
        "the eager backend builds none); prefill s: eager engine"
    )
    if args.compile_one:
        bucket = 256 if seq_len >= 256 else seq_len
        with tempfile.TemporaryDirectory() as cache:
            engine = Engine.from_pretrained(
                args.model,
                RuntimeConfig(batch_size=1, seq_len=seq_len, buckets=(bucket,), dtype=args.dtype, backend="compile"),
                compile_cache=Path(cache),
                compile_on_demand=True,
            )
            start = time.perf_counter()
            engine.compile_graph(GraphKey(GraphKind.CONTEXT, 1, bucket, bucket))
            compile_s = time.perf_counter() - start
            engine.close()
        print(f"AOTInductor: one context-encoding graph ({bucket} tokens) compiled in {compile_s:.1f}s")
        for r in results.values():
            r["compile_one_s"] = compile_s
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "workload": args.workload.name, "sets": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
