"""The `nxserve` command line.

    nxserve make-model --arch llama --preset tiny --out DIR
    nxserve generate --model DIR --prompt "Hello" [--max-new-tokens N] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

log = logging.getLogger("nxserve")


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids such as 1,2,3, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


class _AppendPrompt(argparse.Action):
    """Collect --prompt and --prompt-ids in command-line order as ("text", str) / ("ids", list)."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        kind = "ids" if option_string == "--prompt-ids" else "text"
        prompts = list(getattr(namespace, self.dest) or [])
        prompts.append((kind, values))
        setattr(namespace, self.dest, prompts)


def _add_make_model(sub: argparse._SubParsersAction) -> None:
    from nxserve.model_factory import ARCHS, PRESETS

    p = sub.add_parser(
        "make-model",
        help="write a random-weight Hugging Face checkpoint (config, safetensors, tokenizer)",
        description="Write a seeded random-weight checkpoint in real Hugging Face format, for tests and demos.",
    )
    p.add_argument("--arch", choices=ARCHS, required=True, help="architecture (model_type)")
    p.add_argument("--preset", choices=PRESETS, default="tiny", help="tiny: a few MB, for tests; small: ~100M+ params, for benchmarks (default: tiny)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights and tokenizer (default: 0)")
    p.set_defaults(func=_cmd_make_model)


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="weights/activations dtype (default: the checkpoint's own)")
    g.add_argument("--batch-size", type=int, default=None, help="decode slots (default: the number of prompts)")
    g.add_argument("--ctx-batch-size", type=int, default=None, help="prompts per context-encoding call (default: batch size)")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per slot, prompt + output (default: fits the longest prompt plus --max-new-tokens)")
    g.add_argument("--backend", choices=["eager", "compile"], default="eager", help="graph backend (default: eager)")
    g.add_argument("--max-topk", type=int, default=256, help="width of the in-graph top-k candidate set (default: 256)")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling and stopping")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most (default: 32)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all candidates (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1] (default: 1)")
    g.add_argument("--seed", type=int, default=None, help="random seed per request (default: random)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    g.add_argument("--stop-token-ids", type=_token_ids, default=[], help="comma-separated token ids that end a request")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text in-process from a checkpoint",
        description="Load a checkpoint into the nxcore engine and generate for one or more prompts (one batch).",
    )
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--prompt", dest="prompts", action=_AppendPrompt, metavar="TEXT", help="prompt text (repeatable)")
    p.add_argument("--prompt-ids", dest="prompts", action=_AppendPrompt, type=_token_ids, metavar="1,2,3", help="prompt as token ids (repeatable)")
    _add_sampling_flags(p)
    _add_engine_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt: prompt_ids, output_ids, text, finish_reason")
    p.set_defaults(func=_cmd_generate)


def _cmd_make_model(args: argparse.Namespace) -> int:
    from nxserve.model_factory import make_model

    start = time.perf_counter()
    out = make_model(arch=args.arch, preset=args.preset, out=args.out, seed=args.seed)
    print(f"wrote {args.preset} {args.arch} checkpoint to {out} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


def _seq_len_for(prompt_lens: Sequence[int], max_new_tokens: int, max_positions: int) -> int:
    """Smallest power of two (>= 128) holding the longest prompt plus max_new_tokens, within the model's limit."""
    need = max(prompt_lens) + max_new_tokens
    size = 128
    while size < need:
        size *= 2
    return min(size, max_positions)


def _cmd_generate(args: argparse.Namespace) -> int:
    from nxcore import Engine, RuntimeConfig, SamplingParams, StoppingCriteria, generate
    from nxcore.checkpoint import read_hf_config
    from nxcore.tokenizer import load_tokenizer

    if not args.prompts:
        raise SystemExit("nxserve generate: give at least one --prompt TEXT or --prompt-ids 1,2,3")
    tokenizer = load_tokenizer(args.model, required=any(kind == "text" for kind, _ in args.prompts))
    prompts = [tokenizer.encode(value) if kind == "text" else value for kind, value in args.prompts]
    hf_config = read_hf_config(args.model)
    batch = args.batch_size or len(prompts)
    config = RuntimeConfig(
        batch_size=batch,
        ctx_batch_size=args.ctx_batch_size or batch,
        seq_len=args.seq_len or _seq_len_for([len(p) for p in prompts], args.max_new_tokens, hf_config.max_position_embeddings),
        dtype=args.dtype,
        backend=args.backend,
        max_topk=args.max_topk,
    )
    log.info("loading %s", args.model)
    engine = Engine.from_pretrained(args.model, config)
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    stopping = StoppingCriteria(
        max_new_tokens=args.max_new_tokens, stop_token_ids=tuple(args.stop_token_ids), ignore_eos=args.ignore_eos
    )
    start = time.perf_counter()
    results = generate(engine, prompts, sampling=sampling, stopping=stopping)
    elapsed = time.perf_counter() - start
    for i, result in enumerate(results):
        text = tokenizer.decode(result.output_ids)
        if args.json:
            print(json.dumps({
                "prompt_ids": result.prompt_ids,
                "output_ids": result.output_ids,
                "text": text,
                "finish_reason": str(result.finish_reason),
            }, ensure_ascii=False))
        else:
            if len(results) > 1:
                print(f"--- [{i}] {tokenizer.decode(result.prompt_ids)!r}")
            print(text)
    total = sum(len(r.output_ids) for r in results)
    log.info("generated %d tokens for %d prompts in %.2fs (%.1f tokens/s)", total, len(results), elapsed, total / max(elapsed, 1e-9))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nxserve",
        description="nxserve: LLM serving on nxcore, a static-shape three-graph decoder engine.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_make_model(sub)
    _add_generate(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from nxcore.errors import EngineError

    try:
        return args.func(args)
    except (EngineError, ValueError, FileNotFoundError) as exc:
        print(f"nxserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
