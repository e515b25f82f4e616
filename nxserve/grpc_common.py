"""What both services share: health and reflection, signal handling, and protobuf <-> nxcore conversions."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nxcore import SamplingParams, StoppingCriteria
from nxcore.generate import FinishReason
from nxserve.v1 import generation_pb2 as gen_pb2

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 16
MAX_MESSAGE_BYTES = 64 << 20

FINISH_TO_PB = {
    FinishReason.LENGTH: gen_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: gen_pb2.FINISH_REASON_EOS,
    FinishReason.STOP: gen_pb2.FINISH_REASON_STOP,
}
FINISH_FROM_PB = {v: k for k, v in FINISH_TO_PB.items()}


def server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]


def add_health_and_reflection(server: grpc.aio.Server, service_full_name: str) -> health.aio.HealthServicer:
    """Standard health checking (NOT_SERVING until `set_serving`) and server reflection."""
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

        loop.create_task(run())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return done


def sampling_from_pb(pb: gen_pb2.SamplingParameters, *, seed: int | None = None) -> SamplingParams:
    return SamplingParams(
        temperature=pb.temperature,
        top_k=pb.top_k,
        top_p=pb.top_p if pb.top_p > 0 else 1.0,
        seed=pb.seed if pb.HasField("seed") else seed,
    )


def sampling_to_pb(sampling: SamplingParams) -> gen_pb2.SamplingParameters:
    pb = gen_pb2.SamplingParameters(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    if sampling.seed is not None:
        pb.seed = sampling.seed
    return pb


def stopping_from_pb(pb: gen_pb2.StoppingParameters) -> tuple[StoppingCriteria, tuple[str, ...]]:
    criteria = StoppingCriteria(
        max_new_tokens=pb.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        stop_token_ids=tuple(pb.stop_token_ids),
        ignore_eos=pb.ignore_eos,
    )
    return criteria, tuple(pb.stop_strings)


def stopping_to_pb(criteria: StoppingCriteria, stop_strings: Sequence[str]) -> gen_pb2.StoppingParameters:
    return gen_pb2.StoppingParameters(
        max_new_tokens=criteria.max_new_tokens,
        stop_token_ids=list(criteria.stop_token_ids),
        stop_strings=list(stop_strings),
        ignore_eos=criteria.ignore_eos,
    )


def shm_dir_arg(value: str) -> Path | None:
    """--kv-shm-dir: a directory, or "none"."""
    return None if value.lower() in ("none", "") else Path(value)


def add_kv_shm_flag(parser: argparse.ArgumentParser, *, role: str) -> None:
    default = "/dev/shm" if Path("/dev/shm").is_dir() else "none"
    parser.add_argument(
        "--kv-shm-dir", type=shm_dir_arg, default=shm_dir_arg(default), metavar="DIR|none",
        help=f"shared-memory directory for KV hand-off on one host: {role}; used only where prefill and "
             f"decode see the same directory, chunks over gRPC otherwise. In Kubernetes, mount one emptyDir "
             f"(medium: Memory) into both containers of a pod. none: chunks only (default: {default})")


def add_server_flags(parser: argparse.ArgumentParser, *, port: int, max_queue: int, queue_help: str) -> None:
    """--host --port --max-queue --grace --log-level, shared by both services."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=port, help=f"port to listen on (default: {port})")
    parser.add_argument("--max-queue", type=int, default=max_queue, help=f"{queue_help}; past it RESOURCE_EXHAUSTED (default: {max_queue})")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds running requests get to finish on SIGTERM (default: 10)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level (default: INFO)")


async def start_server(args: argparse.Namespace, *, service: str, register: Callable[[grpc.aio.Server], None]) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """A started server with health (NOT_SERVING for now), reflection and the servicer `register` adds."""
    server = grpc.aio.server(options=server_options())
    servicer = add_health_and_reflection(server, service)
    register(server)
    await set_health(servicer, service, serving=False)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    log.info("listening on %s:%d (NOT_SERVING until the model is loaded)", args.host, port)
    return server, servicer, port


def run_service(serve: Callable[[argparse.Namespace], Awaitable[None]], parser: argparse.ArgumentParser,
                argv: Sequence[str] | None) -> int:
    """Parse flags, set up logging, run `serve` until it returns (after a signal)."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    asyncio.run(serve(args))
    return 0
