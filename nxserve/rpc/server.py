"""Service start-up and shutdown, shared by both services: a gRPC aio server with health checking,
reflection and the error mapping (`nxserve.rpc.status.ErrorInterceptor`), signal handling, logging."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nxserve.rpc.status import ErrorInterceptor

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20


def channel_options() -> list[tuple[str, int]]:
    """Message size limits of every server and of the channels between the services."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]


def add_health_and_reflection(server: grpc.aio.Server, service_full_name: str) -> health.aio.HealthServicer:
    """Standard health checking (NOT_SERVING until `set_health`) and server reflection."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    names = (service_full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    return servicer


async def set_health(servicer: health.aio.HealthServicer, service_full_name: str, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", service_full_name):
        await servicer.set(name, status)


def install_shutdown(stop: Callable[[], Awaitable[None]]) -> asyncio.Event:
    """Run `stop` once on SIGTERM or SIGINT; returns an event set when it has finished."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    started = False
    tasks: list[asyncio.Task] = []  # a reference, so the task is not collected while it runs

    def on_signal(signum: int) -> None:
        nonlocal started
        if started:
            return
        started = True
        log.info("received %s: shutting down", signal.Signals(signum).name)

        async def run() -> None:
            try:
                await stop()
            finally:
                done.set()

        tasks.append(loop.create_task(run()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return done


async def start_server(
    args: argparse.Namespace, *, service: str, register: Callable[[grpc.aio.Server], None]
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """A started server with health (NOT_SERVING for now), reflection, the error mapping and the
    servicer `register` adds."""
    server = grpc.aio.server(options=channel_options(), interceptors=[ErrorInterceptor()])
    servicer = add_health_and_reflection(server, service)
    register(server)
    await set_health(servicer, service, serving=False)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    log.info("listening on %s:%d (NOT_SERVING until the model is loaded)", args.host, port)
    return server, servicer, port


def run_service(serve: Callable[[argparse.Namespace], Coroutine[Any, Any, None]], parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse flags, set up logging, run `serve` until it returns (after a signal)."""
    from nxcore import native

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    native.configure_from(os.environ)  # the one place a service reads NXSERVE_NATIVE*
    asyncio.run(serve(args))
    return 0
