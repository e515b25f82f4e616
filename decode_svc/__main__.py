"""python -m decode_svc: the decode service (internal Decode API)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from functools import partial
from pathlib import Path

from nxserve.rpc.flags import SERVICE_DEFAULTS, SERVICE_GRAPHS, EngineFlags, add_core_turns_flag, add_kv_shm_flag, add_server_flags
from nxserve.rpc.gcheap import freeze_startup_heap
from nxserve.rpc.server import DECODE_MAX_MESSAGE_BYTES, install_shutdown, run_service, set_health, start_server
from nxserve.v1 import decode_pb2

log = logging.getLogger("decode_svc")
SERVICE = decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name


def build_parser(prog: str = "python -m decode_svc") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="nxserve decode service: receives KV caches from prefill_svc and runs token generation "
        "in a continuous batch over fixed slots, streaming tokens back.",
        fromfile_prefix_chars="@",
        epilog="Flags can also come from files: @FILE stands for the arguments in FILE, one per line (e.g. --seq-len=2048); "
        "the Kubernetes manifests pass the engine's flags this way, from one ConfigMap both services read.",
    )
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory or GGUF file, or a folder holding one: the same as prefill's")
    add_server_flags(
        p,
        port=50061,
        max_queue=64,
        queue_help="requests that may wait for a free slot",
        max_streams=1024,
        client_ca_help="require client certificates signed by this CA (mTLS): only prefill services holding one "
        "can call this replica (default: none asked for)",
    )
    add_kv_shm_flag(p, role="prefill services keep their KV arenas there and this replica reads requests' KV out of them")
    add_core_turns_flag(p, role="a decode step waits for a context encoding already waiting")
    EngineFlags.add_to(p, defaults=SERVICE_DEFAULTS["decode"])
    return p


async def serve(args: argparse.Namespace) -> None:
    from decode_svc.loop import DecodeLoop
    from decode_svc.server import DecodeServicer
    from nxcore import Engine
    from nxcore.checkpoint import read_hf_config
    from nxcore.engine_thread import EngineThread
    from nxcore.speculation import build_proposer
    from nxcore.tokenizer import load_tokenizer
    from nxserve.kv import KVReceiver, add_decode_servicer
    from nxserve.rpc.turns import CoreTurns
    from nxserve.rpc.validate import Limits

    flags = EngineFlags.from_args(args, environ=os.environ)
    kv = KVReceiver(args.kv_shm_dir)
    servicer = DecodeServicer(kv=kv, model_name=args.served_model_name or Path(args.model).name)
    started = await start_server(args, service=SERVICE, register=lambda s: add_decode_servicer(servicer, s), max_receive=DECODE_MAX_MESSAGE_BYTES)

    start = time.perf_counter()
    thread = EngineThread("decode-engine")  # every torch call from here on: see nxcore.engine_thread
    await thread.run(flags.apply_threads)
    config = flags.service_config("decode", max_positions=read_hf_config(args.model).max_position_embeddings)
    engine = await thread.run(partial(Engine.from_pretrained, args.model, config, graphs=SERVICE_GRAPHS["decode"], **flags.load_options()))
    proposer = await thread.run(partial(build_proposer, flags.speculation, engine, **flags.load_options()))
    tokenizer = load_tokenizer(args.model, required=False)
    await thread.run(_warm_up, engine)
    turns = CoreTurns(args.core_turns, wait_s=args.core_turns_wait_s)
    loop = DecodeLoop(engine, tokenizer=tokenizer, max_queue=args.max_queue, proposer=proposer, thread=thread, metrics=servicer.metrics, turns=turns)
    loop.start()
    servicer.attach(loop, limits=Limits.for_engine(engine))
    servicer.metrics.observe(loop.load)
    kv.advertise()
    freeze_startup_heap()
    await set_health(started.health, SERVICE, serving=True)
    log.info(
        "SERVING %s on port %d after %.1fs: %d slots, seq_len %d",
        args.model,
        started.port,
        time.perf_counter() - start,
        config.batch_size,
        config.seq_len,
    )

    async def stop() -> None:
        # Drain: NOT_SERVING and no new work at once; running requests get the grace to finish, less
        # a second in which those still running are handed back (prefill moves them elsewhere).
        servicer.draining = True
        await set_health(started.health, SERVICE, serving=False)
        left = await asyncio.to_thread(loop.drain, max(args.grace - 1.0, 0.0))
        if left:
            log.info("handing %d request(s) back to prefill: the grace (%.0f s) ends", left, args.grace)
        loop.stop(timeout=5)
        await started.stop(1.0)
        thread.submit(engine.close)
        thread.close(timeout=10)
        kv.close()
        turns.close()

    await install_shutdown(stop).wait()
    log.info("stopped")


def _warm_up(engine) -> None:
    """Run the token-generation graph at every row count (compiles them on the compile backend).
    Slots are filled as requests fill them, from a (blank, one-token) KV snapshot: the engine has
    no context-encoding graphs."""
    import torch

    from nxcore import RequestRng, SamplingParams, SequenceRequest
    from nxcore.kv_cache import KVSnapshot

    greedy = SamplingParams()
    cfg = engine.model_config
    blank = torch.zeros(cfg.num_layers, cfg.num_kv_heads, 1, cfg.head_dim)
    for slot in range(engine.config.batch_size):
        engine.import_kv(slot, KVSnapshot(blank, blank))
    for rows in engine.config.batch_buckets:
        engine.token_generate([SequenceRequest(slot=s, token_ids=[0], sampling=greedy, rng=RequestRng(0)) for s in range(rows)])
    for slot in range(engine.config.batch_size):
        engine.free(slot)


def main(argv: list[str] | None = None, *, prog: str = "python -m decode_svc") -> int:
    return run_service(serve, build_parser(prog), argv, service="nxserve-decode")


if __name__ == "__main__":
    sys.exit(main())
