"""In-process commands: `nxserve make-model`, `nxserve generate` and `nxserve compile`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from nxserve.commands.common import AppendPrompt, add_sampling_flags, token_ids
from nxserve.rpc.flags import SERVICE_DEFAULTS, SERVICE_GRAPHS, EngineFlags

if TYPE_CHECKING:
    from nxcore import RuntimeConfig

log = logging.getLogger("nxserve")


def add_make_model(sub: argparse._SubParsersAction) -> None:
    from nxserve.testing.model_factory import ARCHS, PRESETS

    p = sub.add_parser(
        "make-model",
        help="write a random-weight Hugging Face checkpoint (config, safetensors, tokenizer)",
        description="Write a seeded random-weight checkpoint in real Hugging Face format, for tests and demos.",
    )
    p.add_argument("--arch", choices=ARCHS, required=True, help="architecture (model_type)")
    p.add_argument(
        "--preset", choices=PRESETS, default="tiny", help="tiny: a few MB, for tests; small: ~100M+ params, for benchmarks (default: tiny)"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights and tokenizer (default: 0)")
    p.set_defaults(func=_cmd_make_model)


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text in-process from a checkpoint",
        description="Load a checkpoint into the nxcore engine and generate for one or more prompts (one batch).",
    )
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory or GGUF file (or a folder holding one)")
    p.add_argument("--prompt", dest="prompts", action=AppendPrompt, metavar="TEXT", help="prompt text (repeatable)")
    p.add_argument("--prompt-ids", dest="prompts", action=AppendPrompt, type=token_ids, metavar="1,2,3", help="prompt as token ids (repeatable)")
    add_sampling_flags(p)
    EngineFlags.add_to(
        p,
        helps={
            "batch_size": "decode slots (default: the number of prompts)",
            "seq_len": "tokens per slot, prompt + output (default: fits the longest prompt plus "
            "--max-new-tokens; capped at the model's max_position_embeddings)",
        },
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt: prompt_ids, output_ids, text, finish_reason")
    p.set_defaults(func=_cmd_generate)


def add_compile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compile",
        help="compile a model's graphs into the compiled-artifact cache (for --backend compile)",
        description=(
            "Compile the graphs each service's engine loads into the compiled-artifact cache: prefill's "
            "context encoding per bucket and row count; decode's token generation per KV bucket and row count, "
            "and speculation with --speculation-length (decode fills its slots from prefill's KV, so it needs no "
            "context graphs). --for engine compiles every graph of one config, as an in-process engine calls "
            "them. The cache is keyed by the model's fingerprint, the runtime config and the torch version. "
            "Weights are not stored: services load them from the checkpoint and, started with the same flags "
            "and --backend compile, are ready without compiling. Graphs already cached are skipped. Unset "
            "engine flags take each service's own defaults, so a service started with its default flags finds "
            "its graphs. @FILE stands for the arguments in FILE, one per line (the services read their engine "
            "flags the same way: compile with the same file)."
        ),
        fromfile_prefix_chars="@",
    )
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory or GGUF file (or a folder holding one)")
    p.add_argument(
        "--for",
        dest="targets",
        choices=["all", *SERVICE_DEFAULTS, "engine"],
        default="all",
        help="compile the prefill service's graphs, the decode service's, or both (default: all); engine: "
        "every graph of one config, for an in-process engine (nxserve generate, the Python API; unset "
        "flags take the decode service's defaults). --batch-size and --seq-len, when given, apply to all",
    )
    defaults = ", ".join(f"{name} {d['batch_size']}" for name, d in SERVICE_DEFAULTS.items())
    seq_lens = ", ".join(f"{name} {d['seq_len']}" for name, d in SERVICE_DEFAULTS.items())
    EngineFlags.add_to(
        p,
        exclude=("speculation", "speculation_length", "backend"),
        helps={
            "batch_size": f"decode slots (default: the service's: {defaults})",
            "seq_len": f"tokens per slot, prompt + output (default: the service's: {seq_lens}; capped at the model's max_position_embeddings)",
        },
    )
    p.add_argument(
        "--speculation-length",
        type=int,
        default=0,
        help="also compile the decode config's speculation graphs for this many proposed tokens, for a decode "
        "service started with --speculation and the same --speculation-length (default: 0, none)",
    )
    p.add_argument("--dry-run", action="store_true", help="list the graphs that would be compiled and exit")
    p.set_defaults(func=_cmd_compile, backend="compile")


def _cmd_compile(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from nxcore import Engine
    from nxcore.checkpoint import read_hf_config

    flags = EngineFlags.from_args(args, environ=os.environ)
    max_positions = read_hf_config(args.model).max_position_embeddings
    builds: list[tuple[RuntimeConfig, str]] = []  # (config, graph set), one engine each
    for target in SERVICE_DEFAULTS if args.targets == "all" else [args.targets]:
        config = flags.service_config("decode" if target == "engine" else target, max_positions=max_positions)
        if target != "prefill":  # speculation graphs run where tokens are generated
            config = config.replace(speculation_length=args.speculation_length)
        if target == "engine":
            builds.append((config, "all"))
            continue
        same = [i for i, (c, _) in enumerate(builds) if c == config]
        if same:  # explicit flags made the services' configs the same: one engine with both sets
            builds[same[0]] = (config, "all")
        else:
            builds.append((config, SERVICE_GRAPHS[target]))
    flags.apply_threads()
    for config, graphs in builds:
        engine = Engine.from_pretrained(
            args.model, config, compile_cache=flags.load_options()["compile_cache"], compile_on_demand=True, graphs=graphs
        )
        store = engine.artifacts
        missing = engine.missing_graphs()
        print(
            f"{len(missing)} graph(s) to compile ({graphs} graphs) for batch size {config.batch_size}, context batch "
            f"{config.ctx_batch_size}, seq_len {config.seq_len} into {store.dir}",
            file=sys.stderr,
        )
        if args.dry_run:
            for key in missing:
                print(" ".join(map(str, key.to_list())))
            engine.close()
            continue
        start = time.perf_counter()
        with tqdm(missing, unit="graph", file=sys.stderr, disable=None) as bar:
            for key in bar:
                bar.set_postfix_str(str(key))
                engine.compile_graph(key)
        engine.close()
        print(f"compiled {len(missing)} graph(s) in {time.perf_counter() - start:.1f}s: {store.dir}", file=sys.stderr)
    return 0


def _cmd_make_model(args: argparse.Namespace) -> int:
    from nxserve.testing.model_factory import make_model

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
    from nxcore import Engine, SamplingParams, StoppingCriteria, generate
    from nxcore.checkpoint import read_hf_config
    from nxcore.speculation import build_proposer
    from nxcore.tokenizer import load_tokenizer

    if not args.prompts:
        raise SystemExit("nxserve generate: give at least one --prompt TEXT or --prompt-ids 1,2,3")
    tokenizer = load_tokenizer(args.model, required=any(kind == "text" for kind, _ in args.prompts))
    prompts = [tokenizer.encode(value) if kind == "text" else value for kind, value in args.prompts]
    max_positions = read_hf_config(args.model).max_position_embeddings
    flags = EngineFlags.from_args(args, environ=os.environ)
    config = flags.runtime_config(
        max_positions=max_positions, batch_size=len(prompts), seq_len=_seq_len_for([len(p) for p in prompts], args.max_new_tokens, max_positions)
    )
    if flags.speculation:
        config = config.replace(speculation_length=flags.speculation_length)
    flags.apply_threads()
    log.info("loading %s", args.model)
    engine = Engine.from_pretrained(args.model, config, **flags.load_options())
    proposer = build_proposer(flags.speculation, engine, **flags.load_options())
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    stopping = StoppingCriteria(max_new_tokens=args.max_new_tokens, stop_token_ids=tuple(args.stop_token_ids), ignore_eos=args.ignore_eos)
    start = time.perf_counter()
    results = generate(engine, prompts, sampling=sampling, stopping=stopping, proposer=proposer)
    elapsed = time.perf_counter() - start
    for i, result in enumerate(results):
        text = tokenizer.decode(result.output_ids)
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt_ids": result.prompt_ids,
                        "output_ids": result.output_ids,
                        "text": text,
                        "finish_reason": str(result.finish_reason),
                    },
                    ensure_ascii=False,
                )
            )
        else:
            if len(results) > 1:
                print(f"--- [{i}] {tokenizer.decode(result.prompt_ids)!r}")
            print(text)
    engine.close()
    if proposer is not None:
        st = proposer.stats
        log.info(
            "speculation (%s, k=%d): %d rounds, acceptance rate %.2f, %.2f tokens per round",
            args.speculation,
            args.speculation_length,
            st.rounds,
            st.acceptance_rate,
            st.tokens_per_round,
        )
    total = sum(len(r.output_ids) for r in results)
    log.info("generated %d tokens for %d prompts in %.2fs (%.1f tokens/s)", total, len(results), elapsed, total / max(elapsed, 1e-9))
    return 0
