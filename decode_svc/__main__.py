"""python -m decode_svc: the decode service (internal Decode API)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

import grpc

from decode_svc.loop import DecodeLoop
from decode_svc.server import DecodeServicer
from nxserve.engine_args import add_engine_flags, apply_threads, config_from_args
from nxserve.grpc_common import add_health_and_reflection, install_shutdown, server_options, set_health
from nxserve.tracing import configure_tracing, shutdown_tracing
from nxserve.v1 import decode_pb2, decode_pb2_grpc

log = logging.getLogger("decode_svc")
SERVICE = decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m decode_svc",
        description="nxserve decode service: receives KV caches from prefill_svc and runs token generation "
        "in a continuous batch over fixed slots, streaming tokens back.",
    )
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory (the same as prefill's)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 in containers)")
    p.add_argument("--port", type=int, default=50061, help="port to listen on (default: 50061)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; past it RESOURCE_EXHAUSTED (default: 64)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level (default: INFO)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds running requests get to finish on SIGTERM (default: 10)")
    add_engine_flags(p, batch_size=8, seq_len=1024)
    return p


async def serve(args: argparse.Namespace) -> None:
    from nxcore import Engine
    from nxcore.checkpoint import read_hf_config
    from nxcore.tokenizer import load_tokenizer

    configure_tracing("nxserve-decode")
    server = grpc.aio.server(options=server_options())
    health = add_health_and_reflection(server, SERVICE)
    servicer = DecodeServicer()
    decode_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
    await set_health(health, SERVICE, serving=False)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    log.info("listening on %s:%d (NOT_SERVING until the model is loaded)", args.host, port)

    start = time.perf_counter()
    apply_threads(args)
    config = config_from_args(args, max_positions=read_hf_config(args.model).max_position_embeddings)
    engine = await asyncio.to_thread(Engine.from_pretrained, args.model, config)
    tokenizer = load_tokenizer(args.model, required=False)
    await asyncio.to_thread(_warm_up, engine)
    loop = DecodeLoop(engine, tokenizer=tokenizer, max_queue=args.max_queue)
    loop.start()
    servicer.attach(loop)
    await set_health(health, SERVICE, serving=True)
    log.info("SERVING %s on port %d after %.1fs: %d slots, seq_len %d", args.model, port, time.perf_counter() - start,
             config.batch_size, config.seq_len)

    async def stop() -> None:
        await set_health(health, SERVICE, serving=False)
        await server.stop(args.grace)
        loop.stop(timeout=5)

    await install_shutdown(stop).wait()
    shutdown_tracing()
    log.info("stopped")


def _warm_up(engine) -> None:  # noqa: ANN001
    """Run the token-generation graph once (compiles it on the compile backend)."""
    from nxcore import RequestRng, SamplingParams, SequenceRequest

    greedy = SamplingParams()
    engine.context_encode([SequenceRequest(slot=0, token_ids=[0], sampling=greedy, rng=RequestRng(0))])
    engine.token_generate([SequenceRequest(slot=0, token_ids=[0], sampling=greedy, rng=RequestRng(0))])
    engine.free(0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
