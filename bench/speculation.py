"""Tokens/s and acceptance rate with and without speculative decoding, one run.

    python -m bench.speculation --model DIR [--draft DIR] [--k 4] [--new-tokens 64]

For a repetitive prompt and a normal one: greedy generation without speculation, with n-gram
(prompt lookup) speculation, with the draft model (when given), and with the target as its own
draft (the acceptance upper bound: every proposal accepted). Greedy outputs are checked equal to
the non-speculative ones. Prints a table; --json writes the figures.
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


def main(argv: list[str] | None = None) -> int:
    native.configure_from(os.environ)  # an entry point: NXSERVE_NATIVE* are read here
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--draft", help="draft checkpoint with the same tokenizer")
    p.add_argument("--k", type=int, default=4, help="tokens proposed per round (default: 4)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    config = RuntimeConfig(batch_size=1, seq_len=256, dtype=args.dtype, speculation_length=args.k)
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
