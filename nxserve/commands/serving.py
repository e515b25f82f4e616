"""Commands around the services: `nxserve up`, `nxserve demo` and `nxserve client`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from nxserve.commands.common import AppendPrompt, add_sampling_flags, rpc_failed, token_ids

log = logging.getLogger("nxserve")


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
    g.add_argument("--backend", choices=["eager", "compile"], default=None,
                   help="graph backend of every service (default: eager); compile needs `nxserve compile` run with each "
                        "service's engine flags, or --compile-on-demand")
    g.add_argument("--compile-cache", default=None, metavar="DIR", help="compiled-artifact cache root (default: the services')")
    g.add_argument("--compile-on-demand", action="store_true", help="services compile graphs missing from the cache at startup")
    g.add_argument("--prefill-tp", type=int, default=1, help="tensor-parallel degree of the prefill service (default: 1)")
    g.add_argument("--decode-tp", type=int, default=1, help="tensor-parallel degree of each decode replica (default: 1)")


def add_up(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up",
        help="start a prefill service and decode services on this machine",
        description="Start decode_svc replicas and a prefill_svc on 127.0.0.1, print the public (Generation) "
        "address, and serve until Ctrl-C or SIGTERM.",
    )
    _add_cluster_flags(p)
    p.add_argument("--port", type=int, default=50051, help="public (prefill) port; 0 picks a free one (default: 50051)")
    p.set_defaults(func=_cmd_up)


def add_demo(sub: argparse._SubParsersAction) -> None:
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


def add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "client",
        help="generate through a running nxserve (the public gRPC API)",
        description="Send prompts to a running prefill service, concurrently, and stream the generated text "
        "(or print one JSON object per prompt, as `generate --json` does).",
    )
    p.add_argument("--target", default="127.0.0.1:50051", metavar="HOST:PORT", help="public (prefill) address (default: 127.0.0.1:50051)")
    p.add_argument("--prompt", dest="prompts", action=AppendPrompt, metavar="TEXT", help="prompt text, tokenized by the server (repeatable)")
    p.add_argument("--prompt-ids", dest="prompts", action=AppendPrompt, type=token_ids, metavar="1,2,3", help="prompt as token ids (repeatable)")
    add_sampling_flags(p)
    p.add_argument("--stop", dest="stop_strings", action="append", default=[], metavar="TEXT", help="string that ends a request; the text stops before it (repeatable)")
    p.add_argument("--timeout", type=float, default=None, help="deadline per request in seconds (default: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt: prompt_ids, output_ids, text, finish_reason")
    p.set_defaults(func=_cmd_client)


def _cmd_client(args: argparse.Namespace) -> int:
    import asyncio

    import grpc

    if not args.prompts:
        raise SystemExit("nxserve client: give at least one --prompt TEXT or --prompt-ids 1,2,3")
    try:
        asyncio.run(_run_client(args))
    except grpc.RpcError as exc:
        return rpc_failed(args.command, exc)
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
                        ("--speculation", args.speculation), ("--speculation-length", args.speculation_length),
                        ("--backend", args.backend), ("--compile-cache", args.compile_cache)):
        if value is not None:
            engine_args += [flag, str(value)]
    if args.compile_on_demand:
        engine_args.append("--compile-on-demand")
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
        return rpc_failed(args.command, exc)
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
