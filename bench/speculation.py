"""Tokens/s and acceptance rate with and without speculative decoding, one run.

    python -m bench.speculation --model DIR [--draft DIR] [--k 4] [--new-tokens 64]
    python -m bench.speculation --workload bench/workloads/speculation-grounded.json [--model FILE] [--batch 1,8]

For a repetitive prompt and a normal one: greedy generation without speculation, with n-gram
(prompt lookup) speculation, with the draft model (when given), and with the target as its own
draft (the acceptance upper bound: every proposal accepted). Greedy outputs are checked equal to
the non-speculative ones. Prints a table; --json writes the figures.

With --workload, real text instead (the model defaults to SmolLM2-135M-Instruct,
nxserve/testing/demo_model.py): the workload's prompts, rendered by the model's chat template, run
at each --batch size without speculation and with n-gram speculation; decode tokens/s counts the
tokens after each request's first (the context-encoding one) over the time from the first token
to the last, so prefill is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from nxcore import Engine, RuntimeConfig, StoppingCriteria, generate, native
from nxcore.speculation import DraftProposer, NgramProposer


def _prompts(vocab: int) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(0)
    phrase = torch.randint(4, vocab, (12,), generator=gen).tolist()
    return {"repetitive": phrase * 8, "normal": torch.randint(4, vocab, (96,), generator=gen).tolist()}


def run(engine: Engine, prompt: list[int], new_tokens: int, proposer) -> tuple[list[int], float]:
    stop = StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    [result] = generate(engine, [prompt], stopping=stop, proposer=proposer)
    return result.output_ids, new_tokens / (time.perf_counter() - start)


def decode_run(engine: Engine, prompts: list[list[int]], new_tokens: int, proposer) -> tuple[list[list[int]], float]:
    """Greedy outputs (eos stops) and decode tokens/s: the tokens after each request's first, over
    the time some request was decoding (the union of each one's first-token-to-last-token span)."""
    spans: dict[int, list[float]] = {}

    def on_token(i: int, token: int) -> None:
        now = time.perf_counter()
        spans.setdefault(i, [now, now])[1] = now

    results = generate(engine, prompts, stopping=StoppingCriteria(max_new_tokens=new_tokens), on_token=on_token, proposer=proposer)
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(spans.values()):
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return [r.output_ids for r in results], sum(len(r.output_ids) - 1 for r in results) / busy


def grounded(args: argparse.Namespace) -> int:
    """The --workload mode: n-gram speculation against none on real text, at each batch size."""
    from nxcore.tokenizer import Tokenizer, load_tokenizer

    workload = json.loads(args.workload.read_text())
    model = args.model
    if model is None:
        from nxserve.testing.demo_model import smollm2

        model = str(smollm2())
    tokenizer = load_tokenizer(model)
    assert isinstance(tokenizer, Tokenizer)
    prompts = [tokenizer.encode(tokenizer.chat_prompt([{"role": "user", "content": p["text"]}])) for p in workload["prompts"]]
    new_tokens = workload["max_new_tokens"]
    rows = []
    for batch in args.batch:
        config = RuntimeConfig(
            batch_size=batch, ctx_batch_size=batch, seq_len=512, dtype=args.dtype, speculation_length=args.k, batch_invariant=args.batch_invariant
        )
        engine = Engine.from_pretrained(model, config)
        group = [prompts[i % len(prompts)] for i in range(max(batch, len(prompts)))]
        decode_run(engine, group[:batch], 4, None)  # warm both graphs
        decode_run(engine, group[:batch], 8, NgramProposer(args.k))
        figures: dict[str, list[float]] = {"none": [], "ngram": []}
        stats, outputs = None, {}
        for _ in range(args.repeats):  # interleaved, best of: a host shared with other work slows both alike
            for name in ("none", "ngram"):
                proposer = NgramProposer(args.k) if name == "ngram" else None
                outputs[name], speed = decode_run(engine, group, new_tokens, proposer)
                figures[name].append(speed)
                stats = proposer.stats if proposer is not None else stats
        assert stats is not None
        base, spec = max(figures["none"]), max(figures["ngram"])
        rows.append(
            {
                "batch": batch,
                "prompts": len(group),
                "tokens": sum(len(o) for o in outputs["none"]),
                "none_tok_s": base,
                "ngram_tok_s": spec,
                "speedup": spec / base,
                "acceptance_rate": stats.acceptance_rate,
                "tokens_per_step": stats.tokens_per_round,
                "greedy_equal": outputs["ngram"] == outputs["none"],
            }
        )
        engine.close()
    print(f"\n{model}: {args.workload.name}, n-gram k={args.k}, up to {new_tokens} new tokens (eos stops), greedy, {engine.config.dtype}")
    print(f"{'batch':>6}{'tokens':>8}{'none tok/s':>12}{'ngram tok/s':>13}{'speedup':>9}{'accept':>8}{'tok/step':>10}{'equal':>7}")
    for r in rows:
        print(
            f"{r['batch']:>6}{r['tokens']:>8}{r['none_tok_s']:>12.1f}{r['ngram_tok_s']:>13.1f}{r['speedup']:>9.2f}"
            f"{r['acceptance_rate']:>8.2f}{r['tokens_per_step']:>10.2f}{r['greedy_equal']!s:>7}"
        )
    sample = tokenizer.decode(outputs["ngram"][0])
    print(f"first output: {sample[:300]!r}")
    if args.json:
        args.json.write_text(json.dumps({"model": model, "workload": str(args.workload), "k": args.k, "rows": rows}, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    native.configure_from(os.environ)  # an entry point: NXSERVE_NATIVE* are read here
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory or GGUF file (required without --workload)")
    p.add_argument("--workload", type=Path, help="JSON of text prompts (bench/workloads/speculation-grounded.json): the real-text mode")
    p.add_argument("--batch", type=lambda v: [int(b) for b in v.split(",")], default=[1, 8], help="--workload: batch sizes (default: 1,8)")
    p.add_argument("--repeats", type=int, default=2, help="--workload: runs of each method, interleaved; the best counts (default: 2)")
    p.add_argument("--draft", help="draft checkpoint with the same tokenizer")
    p.add_argument("--k", type=int, default=4, help="tokens proposed per round (default: 4)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--batch-invariant",
        action="store_true",
        help="engines in batch-invariant mode: speculation's scoring pass then computes each position's bits as token generation "
        "does, so greedy output with speculation equals greedy output without it bit for bit (not only in distribution)",
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.workload is not None:
        return grounded(args)
    if args.model is None:
        p.error("--model is required without --workload")
    config = RuntimeConfig(batch_size=1, seq_len=256, dtype=args.dtype, speculation_length=args.k, batch_invariant=args.batch_invariant)
    engine = Engine.from_pretrained(args.model, config)
    proposers = {"none": lambda: None, "ngram": lambda: NgramProposer(args.k)}
    if args.draft:
        draft = Engine.from_pretrained(args.draft, config)
        proposers["draft"] = lambda: DraftProposer(draft, args.k, target_vocab=engine.model_config.vocab_size)
    self_draft = Engine.from_pretrained(args.model, config)
    proposers["self-draft"] = lambda: DraftProposer(self_draft, args.k, target_vocab=engine.model_config.vocab_size)
    rows = []
    for prompt_name, prompt in _prompts(engine.model_config.vocab_size).items():
        run(engine, prompt, 4, None)  # warm
        baseline, base_speed = run(engine, prompt, args.new_tokens, None)
        for name, make in proposers.items():
            proposer = make()
            output, speed = (baseline, base_speed) if proposer is None else run(engine, prompt, args.new_tokens, proposer)
            stats = proposer.stats if proposer is not None else None
            rows.append(
                {
                    "prompt": prompt_name,
                    "method": name,
                    "tok_s": speed,
                    "speedup": speed / base_speed,
                    "acceptance_rate": stats.acceptance_rate if stats else None,
                    "tokens_per_step": stats.tokens_per_round if stats else 1.0,
                    "greedy_equal": output == baseline,
                }
            )
    print(f"\n{args.model}: k={args.k}, {args.new_tokens} new tokens, greedy, batch 1, draft {args.draft or '-'}")
    print(f"{'prompt':>12}{'method':>12}{'tok/s':>9}{'speedup':>9}{'accept':>8}{'tok/step':>10}{'equal':>7}")
    for r in rows:
        acc = f"{r['acceptance_rate']:.2f}" if r["acceptance_rate"] is not None else "-"
        print(
            f"{r['prompt']:>12}{r['method']:>12}{r['tok_s']:>9.1f}{r['speedup']:>9.2f}{acc:>8}{r['tokens_per_step']:>10.2f}{r['greedy_equal']!s:>7}"
        )
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "draft": args.draft, "k": args.k, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
