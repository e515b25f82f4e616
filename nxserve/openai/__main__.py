"""`nxserve openai` (also `python -m nxserve.openai`): the OpenAI-compatible HTTP gateway.

    nxserve openai --target 127.0.0.1:50051 --port 8000

It holds no model: it speaks prefill's public gRPC API, so it runs (and scales) apart from
prefill, wherever that API is reachable.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("nxserve.openai")


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", metavar="HOST:PORT", help="prefill's public gRPC address (default: 127.0.0.1:50051)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 in containers)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port; 0 picks a free one, printed at start (default: 8000)")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="deadline of each gRPC call in seconds (default: none)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds running requests get to finish on SIGTERM (default: 10)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level (default: INFO)")
    p.add_argument("--log-format", default="text", choices=["text", "json"], help="stderr log lines (default: text)")
    g = p.add_argument_group("TLS")
    g.add_argument("--tls-cert", type=Path, default=None, metavar="FILE", help="serve HTTPS with this certificate chain (PEM); needs --tls-key")
    g.add_argument("--tls-key", type=Path, default=None, metavar="FILE", help="the private key of --tls-cert (PEM)")
    g.add_argument("--target-tls-ca", type=Path, default=None, metavar="FILE", help="reach --target over TLS, trusting this CA (PEM)")
    g.add_argument("--target-tls", action="store_true", help="reach --target over TLS, trusting the system's CAs")


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.tls_cert, args.tls_key)
    return context


async def serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM or SIGINT, then let running requests finish for up to --grace seconds."""
    from aiohttp import web

    from nxserve.client import AsyncClient
    from nxserve.openai.server import Gateway
    from nxserve.rpc.gcheap import freeze_startup_heap

    context = _ssl_context(args)
    client = AsyncClient(args.target, timeout=args.timeout, tls_ca=args.target_tls_ca, tls=args.target_tls)
    # handler_cancellation: a client that disconnects cancels its handler, and so its gRPC call.
    runner = web.AppRunner(Gateway(client).app(), handler_cancellation=True, access_log=None, shutdown_timeout=args.grace)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, ssl_context=context)
    freeze_startup_heap()  # before it listens: the collection holds the event loop for ~0.1-0.3 s
    await site.start()
    port = runner.addresses[0][1]
    scheme = "https" if context else "http"
    log.info("OpenAI-compatible API on %s://%s:%d/v1 over nxserve.v1.Generation at %s", scheme, args.host, port, args.target)
    print(f"nxserve openai: serving {scheme}://{args.host}:{port}/v1 (gRPC target {args.target})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: running requests get %.0fs", args.grace)
    await runner.cleanup()
    await client.close()


def run(args: argparse.Namespace) -> int:
    from nxserve.rpc.logs import configure_logging

    configure_logging(level=args.log_level, fmt=args.log_format, service=os.environ.get("OTEL_SERVICE_NAME") or "nxserve-openai", environ=os.environ)
    try:
        asyncio.run(serve(args))
    except (ValueError, OSError) as exc:
        print(f"nxserve openai: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nxserve openai", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
