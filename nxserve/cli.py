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

from nxserve.engine_args import add_engine_flags, add_speculation_flags, apply_threads, build_proposer, config_from_args

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
    add_engine_flags(p, batch_size=None, seq_len=None)
    add_speculation_flags(p)
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
    from nxcore import Engine, SamplingParams, StoppingCriteria, generate
    from nxcore.checkpoint import read_hf_config
    from nxcore.tokenizer import load_tokenizer

    if not args.prompts:
        raise SystemExit("nxserve generate: give at least one --prompt TEXT or --prompt-ids 1,2,3")
    tokenizer = load_tokenizer(args.model, required=any(kind == "text" for kind, _ in args.prompts))
    prompts = [tokenizer.encode(value) if kind == "text" else value for kind, value in args.prompts]
    max_positions = read_hf_config(args.model).max_position_embeddings
    config = config_from_args(
        args, max_positions=max_positions, batch_size=args.batch_size or len(prompts),
        seq_len=args.seq_len or _seq_len_for([len(p) for p in prompts], args.max_new_tokens, max_positions),
    )
    if args.speculation:
        config = config.replace(speculation_length=args.speculation_length)
    apply_threads(args)
    log.info("loading %s", args.model)
    engine = Engine.from_pretrained(args.model, config)
    proposer = build_proposer(args.speculation, engine)
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    stopping = StoppingCriteria(
        max_new_tokens=args.max_new_tokens, stop_token_ids=tuple(args.stop_token_ids), ignore_eos=args.ignore_eos
    )
    start = time.perf_counter()
    results = generate(engine, prompts, sampling=sampling, stopping=stopping, proposer=proposer)
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
    engine.close()
    if proposer is not None:
        st = proposer.stats
        log.info("speculation (%s, k=%d): %d rounds, acceptance rate %.2f, %.2f tokens per round",
                 args.speculation, args.speculation_length, st.rounds, st.acceptance_rate, st.tokens_per_round)
    total = sum(len(r.output_ids) for r in results)
    log.info("generated %d tokens for %d prompts in %.2fs (%.1f tokens/s)", total, len(results), elapsed, total / max(elapsed, 1e-9))
    return 0


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the commands that start a LocalCluster (up, demo)."""
    p.add_argument("--model", default=None, help="Hugging Face checkpoint directory (default: a tiny random-weight llama at .cache/models/tiny-llama, written if missing)")
    p.add_argument("--decode-replicas", type=int, default=2, help="decode processes (default: 2)")
    p.add_argument("--log-dir", default=None, help="directory for the services' logs (default: a temporary directory, removed after a clean stop)")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds every service gets to report SERVING (default: 120)")
    g = p.add_argument_group("engine (passed to every service; unset flags keep the services' defaults)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None, help="weights/activations/KV dtype (default: the checkpoint's own)")
    g.add_argument("--batch-size", type=int, default=None, help="decode slots per decode replica (default: decode_svc's)")
    g.add_argument("--ctx-batch-size", type=int, default=None, help="prompts per context-encoding call (default: prefill_svc's)")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per slot, prompt + output (default: the services')")
    g.add_argument("--speculation", default=None, metavar="ngram|draft:DIR",
                   help="speculative decoding on the decode replicas (and the draft's prefill): ngram or draft:DIR (default: off)")
    g.add_argument("--speculation-length", type=int, default=None, help="tokens proposed per round (default: the services')")
    g.add_argument("--prefill-tp", type=int, default=1, help="tensor-parallel degree of the prefill service (default: 1)")
    g.add_argument("--decode-tp", type=int, default=1, help="tensor-parallel degree of each decode replica (default: 1)")


def _add_up(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up",
        help="start a prefill service and decode services on this machine",
        description="Start decode_svc replicas and a prefill_svc on 127.0.0.1, print the public (Generation) "
        "address, and serve until Ctrl-C or SIGTERM.",
    )
    _add_cluster_flags(p)
    p.add_argument("--port", type=int, default=50051, help="public (prefill) port; 0 picks a free one (default: 50051)")
    p.set_defaults(func=_cmd_up)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="start services locally and stream a few prompts through the public API",
        description="Start a local cluster (as `up`), send a few prompts concurrently with the Python client, print "
        "each output with its time to first token and decode speed, then stop the cluster.",
    )
    _add_cluster_flags(p)
    p.add_argument("--port", type=int, default=0, help="public (prefill) port; 0 picks a free one (default: 0)")
    p.add_argument("--keep-running", action="store_true", help="after the prompts, keep serving until Ctrl-C or SIGTERM")
    p.set_defaults(func=_cmd_demo)


def _add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "client",
        help="generate through a running nxserve (the public gRPC API)",
        description="Send prompts to a running prefill service, concurrently, and stream the generated text "
        "(or print one JSON object per prompt, as `generate --json` does).",
    )
    p.add_argument("--target", default="127.0.0.1:50051", metavar="HOST:PORT", help="public (prefill) address (default: 127.0.0.1:50051)")
    p.add_argument("--prompt", dest="prompts", action=_AppendPrompt, metavar="TEXT", help="prompt text, tokenized by the server (repeatable)")
    p.add_argument("--prompt-ids", dest="prompts", action=_AppendPrompt, type=_token_ids, metavar="1,2,3", help="prompt as token ids (repeatable)")
    _add_sampling_flags(p)
    p.add_argument("--stop", dest="stop_strings", action="append", default=[], metavar="TEXT", help="string that ends a request; the text stops before it (repeatable)")
    p.add_argument("--timeout", type=float, default=None, help="deadline per request in seconds (default: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt: prompt_ids, output_ids, text, finish_reason")
    p.set_defaults(func=_cmd_client)


def _rpc_failed(command: str, exc: Exception) -> int:
    """Report a failed gRPC call (grpc.RpcError) as `nxserve COMMAND: error: CODE: details`."""
    print(f"nxserve {command}: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 2


def _cmd_client(args: argparse.Namespace) -> int:
    import asyncio

    import grpc

    if not args.prompts:
        raise SystemExit("nxserve client: give at least one --prompt TEXT or --prompt-ids 1,2,3")
    try:
        asyncio.run(_run_client(args))
    except grpc.RpcError as exc:
        return _rpc_failed(args.command, exc)
    except KeyboardInterrupt:
        return 130
    return 0


async def _run_client(args: argparse.Namespace) -> None:
    import asyncio

    from nxserve.client import AsyncClient

    prompts = [value for _, value in args.prompts]
    options = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, stop_token_ids=args.stop_token_ids, stop_strings=args.stop_strings, ignore_eos=args.ignore_eos,
    )
    async with AsyncClient(args.target, timeout=args.timeout) as client:
        if args.json:
            results = await asyncio.gather(*(client.generate_text(p, **options) for p in prompts))
            for r in results:
                print(json.dumps({
                    "prompt_ids": r.prompt_ids, "output_ids": r.output_ids, "text": r.text, "finish_reason": r.finish_reason,
                }, ensure_ascii=False))
            return
        # Every request is in flight at once; the outputs are shown in order, the first one live.
        streams = [client.generate(p, **options) for p in prompts]
        for i, (prompt, stream) in enumerate(zip(prompts, streams)):
            if len(prompts) > 1:
                print(f"--- [{i}] {prompt!r}", flush=True)
            async for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            print()


def _default_model() -> str:
    """The tiny random-weight llama that `make run` uses, written on first use."""
    from pathlib import Path

    path = Path(".cache/models/tiny-llama")
    if not (path / "config.json").is_file():
        from nxserve.model_factory import make_model

        log.info("writing a tiny random-weight llama to %s", path)
        make_model(arch="llama", preset="tiny", out=path)
    return str(path)


def _cluster_from_args(args: argparse.Namespace):  # noqa: ANN202 (a LocalCluster, imported lazily)
    from nxserve.cluster import LocalCluster

    engine_args: list[str] = []
    for flag, value in (("--dtype", args.dtype), ("--batch-size", args.batch_size),
                        ("--ctx-batch-size", args.ctx_batch_size), ("--seq-len", args.seq_len),
                        ("--speculation", args.speculation), ("--speculation-length", args.speculation_length)):
        if value is not None:
            engine_args += [flag, str(value)]
    return LocalCluster(
        args.model or _default_model(), decode_replicas=args.decode_replicas, port=args.port,
        engine_args=engine_args, prefill_args=["--tp", str(args.prefill_tp)], decode_args=["--tp", str(args.decode_tp)], log_dir=args.log_dir, startup_timeout=args.startup_timeout,
    )


def _serve_until_signal(command: str, cluster) -> int:  # noqa: ANN001
    """Block until Ctrl-C, SIGTERM or SIGHUP (0), or until a service exits on its own (2)."""
    import signal
    import threading

    stop = threading.Event()
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in signals}
    try:
        while not stop.wait(0.5):
            if dead := cluster.exited():
                name, code = dead[0]
                print(f"nxserve {command}: error: {name} exited with code {code}; logs in {cluster.log_dir}", file=sys.stderr)
                return 2
        print(f"nxserve {command}: shutting down", file=sys.stderr)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _cmd_up(args: argparse.Namespace) -> int:
    from nxserve.cluster import ClusterError

    try:
        with _cluster_from_args(args) as cluster:
            print(f"nxserve: serving nxserve.v1.Generation on {cluster.target} "
                  f"(decode replicas: {', '.join(cluster.decode_targets)}); Ctrl-C stops", flush=True)
            return _serve_until_signal(args.command, cluster)
    except ClusterError as exc:
        print(f"nxserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _cmd_demo(args: argparse.Namespace) -> int:
    import asyncio

    import grpc

    from nxserve.cluster import ClusterError

    try:
        with _cluster_from_args(args) as cluster:
            print(f"nxserve demo: prefill on {cluster.target}, decode on {', '.join(cluster.decode_targets)}", flush=True)
            asyncio.run(_run_demo(cluster.target))
            if not args.keep_running:
                return 0
            print(f"nxserve: serving nxserve.v1.Generation on {cluster.target}; Ctrl-C stops", flush=True)
            return _serve_until_signal(args.command, cluster)
    except ClusterError as exc:
        print(f"nxserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        return _rpc_failed(args.command, exc)
    except KeyboardInterrupt:
        return 130


async def _run_demo(target: str) -> None:
    """Four prompts at once through the public API; each output printed as it completes."""
    import asyncio

    from nxserve.client import AsyncClient

    prompts = ["The quick brown fox", "Once upon a time", "The capital of France is", "In a galaxy far away"]
    async with AsyncClient(target, timeout=120) as client:
        info = await client.model_info()
        print(f"model {info['model']}: {info['architecture']}, {info['dtype']}, {info['decode_replicas']} decode "
              f"replica(s) x {info['batch_size']} slots, up to {info['max_total_tokens']} tokens per sequence", flush=True)

        async def run(i: int, prompt: str) -> None:
            r = await client.generate_text(prompt, max_new_tokens=24, ignore_eos=True)
            ttft = f"{r.ttft_s * 1000:.0f} ms" if r.ttft_s is not None else "n/a"
            speed = f"{r.decode_tokens_per_s:.1f} tokens/s" if r.decode_tokens_per_s else "n/a"
            print(f"[{i}] {prompt!r} -> {r.text!r}\n    {len(r.output_ids)} tokens ({r.finish_reason}), "
                  f"TTFT {ttft}, decode {speed}", flush=True)

        start = time.perf_counter()
        await asyncio.gather(*(run(i, p) for i, p in enumerate(prompts)))
        print(f"{len(prompts)} requests in {time.perf_counter() - start:.2f}s", flush=True)


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
    _add_up(sub)
    _add_client(sub)
    _add_demo(sub)
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
