"""python -m prefill_svc: the prefill service (public Generation API)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

import grpc

from nxserve.engine_args import add_engine_flags, apply_threads, config_from_args
from nxserve.grpc_common import add_health_and_reflection, install_shutdown, server_options, set_health
from nxserve.tracing import configure_tracing, shutdown_tracing
from nxserve.v1 import generation_pb2, generation_pb2_grpc

log = logging.getLogger("prefill_svc")
SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m prefill_svc",
        description="nxserve prefill service: the public Generation API. Runs context encoding, hands each "
        "request's KV cache to the least-loaded decode replica and relays its tokens.",
    )
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--decode", required=True, type=lambda s: [t for t in s.split(",") if t],
                   help="decode replicas as HOST:PORT[,HOST:PORT...]")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 in containers)")
    p.add_argument("--port", type=int, default=50051, help="port to listen on (default: 50051)")
    p.add_argument("--max-queue", type=int, default=256, help="prompts that may wait for context encoding; past it RESOURCE_EXHAUSTED (default: 256)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level (default: INFO)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds running requests get to finish on SIGTERM (default: 10)")
    p.add_argument("--kv-chunk-bytes", type=int, default=1 << 20, help="KV bytes per chunk sent to decode (default: 1 MiB)")
    add_engine_flags(p, batch_size=4, seq_len=1024,
                     batch_help="prompts encoded together per context-encoding call, same as --ctx-batch-size (default: 4)")
    return p


async def serve(args: argparse.Namespace) -> None:
    from nxcore import Engine, RequestRng, SamplingParams, SequenceRequest
    from nxcore.checkpoint import read_hf_config
    from nxcore.tokenizer import load_tokenizer
    from prefill_svc.router import DecodeRouter
    from prefill_svc.server import GenerationServicer
    from prefill_svc.worker import PrefillWorker

    configure_tracing("nxserve-prefill")
    server = grpc.aio.server(options=server_options())
    health = add_health_and_reflection(server, SERVICE)
    servicer = GenerationServicer(model_name=str(args.model), chunk_bytes=args.kv_chunk_bytes)
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    await set_health(health, SERVICE, serving=False)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    log.info("listening on %s:%d (NOT_SERVING until the model is loaded)", args.host, port)

    start = time.perf_counter()
    apply_threads(args)
    ctx_batch = args.ctx_batch_size or args.batch_size or 1
    config = config_from_args(args, max_positions=read_hf_config(args.model).max_position_embeddings, batch_size=ctx_batch)
    engine = await asyncio.to_thread(Engine.from_pretrained, args.model, config)
    tokenizer = load_tokenizer(args.model, required=False)
    greedy = SamplingParams()
    for bucket in config.buckets:  # warm every context-encoding graph
        await asyncio.to_thread(engine.context_encode, [SequenceRequest(slot=0, token_ids=[0] * bucket, sampling=greedy, rng=RequestRng(0))])
        engine.free(0)
    worker = PrefillWorker(engine, max_queue=args.max_queue)
    worker.start()
    router = DecodeRouter(args.decode, fingerprint=engine.fingerprint)
    await router.start()
    servicer.attach(engine=engine, worker=worker, router=router, tokenizer=tokenizer)
    await set_health(health, SERVICE, serving=True)
    log.info("SERVING %s on port %d after %.1fs: buckets %s, %d decode replica(s), %d up",
             args.model, port, time.perf_counter() - start, list(config.buckets), len(args.decode), len(router.usable()))

    async def stop() -> None:
        await set_health(health, SERVICE, serving=False)
        await server.stop(args.grace)
        await router.close()
        worker.stop()

    await install_shutdown(stop).wait()
    shutdown_tracing()
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
