"""Service start-up and shutdown, shared by both services: a gRPC aio server with health checking,
reflection and the error mapping (`nxserve.rpc.status.ErrorInterceptor`), signal handling, logging."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from nxserve.rpc.flags import tls_files
from nxserve.rpc.security import ClientGate
from nxserve.rpc.status import ErrorInterceptor, safe_deserializer

log = logging.getLogger(__name__)

MAX_KV_CHUNK_BYTES = 16 << 20
"""The largest KV chunk prefill may send (--kv-chunk-bytes); decode's message limit is sized to it."""
DECODE_MAX_MESSAGE_BYTES = MAX_KV_CHUNK_BYTES + (1 << 20)
"""What a decode replica receives at most in one message: a chunk, or a header (its prompt ids,
5 bytes each at most, and bounded strings) with room to spare."""


def channel_options(*, max_receive: int | None = None, max_send: int | None = None) -> list[tuple[str, int]]:
    """Message size limits of a server or channel (None: gRPC's default, 4 MiB received, any size sent)."""
    options = []
    if max_receive is not None:
        options.append(("grpc.max_receive_message_length", max_receive))
    if max_send is not None:
        options.append(("grpc.max_send_message_length", max_send))
    return options


_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_service(
    server: grpc.aio.Server, servicer: object, service: ServiceDescriptor, *, deserializers: Mapping[str, Callable[[bytes], Any]] | None = None
) -> None:
    """Register `servicer`'s methods of `service` (what the generated add_*Servicer_to_server does),
    with every request deserializer made safe (`nxserve.rpc.status.safe_deserializer`).
    `deserializers` replaces a method's parser (the Decode stream's chunks)."""
    handlers = {}
    for method in service.methods:
        parse = (deserializers or {}).get(method.name, GetMessageClass(method.input_type).FromString)
        handlers[method.name] = _HANDLERS[method.client_streaming, method.server_streaming](
            getattr(servicer, method.name),
            request_deserializer=safe_deserializer(parse, method.input_type.full_name),
            response_serializer=GetMessageClass(method.output_type).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
"""The stable reflection service (grpcurl, buf curl and Postman ask for it first). grpcio-reflection
only ships v1alpha; v1's messages are v1alpha's byte for byte (same fields, same numbers, only the
package differs), so one servicer answers both."""


def add_health_and_reflection(server: grpc.aio.Server, service_full_name: str) -> health.aio.HealthServicer:
    """Standard health checking (NOT_SERVING until `set_health`) and server reflection, v1 and v1alpha."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    names = (service_full_name, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1)
    reflector = reflection.aio.ReflectionServicer(names)
    for name in (reflection.SERVICE_NAME, REFLECTION_V1):
        handler = grpc.stream_stream_rpc_method_handler(
            reflector.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler}),))
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


@dataclass
class Started:
    """A service's running gRPC server(s) (`start_server`)."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    """The port the server listens on (the one asked for, or the one picked for port 0)."""
    health_server: grpc.aio.Server | None = None
    """The plaintext health-only server of --health-port, if any."""

    async def stop(self, grace: float) -> None:
        """Stop taking calls, let running ones finish within `grace`; health answers until then."""
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)


async def start_server(
    args: argparse.Namespace,
    *,
    service: str,
    register: Callable[[grpc.aio.Server], None],
    max_receive: int,
    gate: ClientGate | None = None,
) -> Started:
    """A started server with health (NOT_SERVING for now), reflection, the error mapping, the
    `gate` (API keys, per-key limits) and the servicer `register` adds; TLS when the flags ask for
    it; at most `max_receive` bytes per message and --max-concurrent-streams per connection. With
    --health-port, a second, plaintext server answers grpc.health.v1 alone there, from the same
    health state (Kubernetes' gRPC probes cannot speak TLS)."""
    tls = tls_files(args)
    options = [*channel_options(max_receive=max_receive), ("grpc.max_concurrent_streams", args.max_concurrent_streams)]
    server = grpc.aio.server(options=options, interceptors=[ErrorInterceptor(), *([gate] if gate else [])])
    servicer = add_health_and_reflection(server, service)
    register(server)
    await set_health(servicer, service, serving=False)
    address = f"{args.host}:{args.port}"
    port = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    await server.start()
    security = "plaintext" if tls is None else ("mTLS" if tls.client_ca else "TLS")
    log.info("listening on %s:%d (%s; NOT_SERVING until the model is loaded)", args.host, port, security)
    health_server = None
    if getattr(args, "health_port", None) is not None:
        health_server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4096)])
        health_pb2_grpc.add_HealthServicer_to_server(servicer, health_server)
        bound = health_server.add_insecure_port(f"{args.host}:{args.health_port}")
        await health_server.start()
        log.info("health checks (plaintext, grpc.health.v1 only) on %s:%d", args.host, bound)
    return Started(server=server, health=servicer, port=port, health_server=health_server)


def run_service(
    serve: Callable[[argparse.Namespace], Coroutine[Any, Any, None]], parser: argparse.ArgumentParser, argv: Sequence[str] | None, *, service: str
) -> int:
    """Parse flags; set up logging, tracing and metrics for `service` (its default service.name)
    from the flags and the environment, read here once; run `serve` until it returns (after a
    signal); flush what telemetry is pending."""
    from nxcore import native
    from nxserve.rpc.logs import configure_logging, shutdown_logging
    from nxserve.rpc.metrics import configure_metrics, shutdown_metrics
    from nxserve.rpc.tracing import configure_tracing, shutdown_tracing

    args = parser.parse_args(argv)
    environ = os.environ
    configure_logging(level=args.log_level, fmt=args.log_format, service=environ.get("OTEL_SERVICE_NAME") or service, environ=environ)
    native.configure_from(environ)  # the one place a service reads NXSERVE_NATIVE*
    configure_tracing(service, environ)
    configure_metrics(service, environ, prometheus_port=args.metrics_port, host=args.host)
    try:
        asyncio.run(serve(args))
    finally:
        shutdown_tracing()
        shutdown_metrics()
        shutdown_logging()
    return 0
