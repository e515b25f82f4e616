"""python -m prefill_svc: the prefill service (public Generation API)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from functools import partial
from pathlib import Path

from nxcore.prefill_plan import DEFAULT_MAX_TOKENS
from nxserve.rpc.flags import (
    SERVICE_DEFAULTS,
    SERVICE_GRAPHS,
    EngineFlags,
    add_core_turns_flag,
    add_kv_shm_flag,
    add_server_flags,
    positive_int,
    stream_interval,
)
from nxserve.rpc.gcheap import freeze_startup_heap
from nxserve.rpc.security import ApiKeys, ChannelTLS, ClientGate
from nxserve.rpc.server import MAX_KV_CHUNK_BYTES, add_service, install_shutdown, run_service, set_health, start_server
from nxserve.rpc.validate import PROMPT_BYTES_PER_TOKEN
from nxserve.v1 import generation_pb2

log = logging.getLogger("prefill_svc")
SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


def build_parser(prog: str = "python -m prefill_svc") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="nxserve prefill service: the public Generation API. Runs context encoding, hands each "
        "request's KV cache to the least-loaded decode replica and relays its tokens.",
        fromfile_prefix_chars="@",
        epilog="Flags can also come from files: @FILE stands for the arguments in FILE, one per line (e.g. --seq-len=2048); "
        "the Kubernetes manifests pass the engine's flags this way, from one ConfigMap both services read.",
    )
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory or GGUF file (or a folder holding one)")
    p.add_argument(
        "--decode",
        required=True,
        type=_decode_entries,
        metavar="TARGETS",
        help="decode replicas, comma-separated: HOST:PORT for one replica; dns:///NAME:PORT for every address NAME resolves "
        "to (a Kubernetes headless Service), re-resolved every --decode-resolve-s and when a replica fails; "
        "dns://SERVER[:PORT]/NAME:PORT asks that DNS server",
    )
    p.add_argument(
        "--decode-resolve-s",
        type=float,
        default=5.0,
        metavar="S",
        help="how often dns: names in --decode are resolved again (default: 5)",
    )
    add_server_flags(
        p,
        port=50051,
        max_queue=256,
        queue_help="prompts that may wait for context encoding",
        max_streams=128,
        client_ca_help="require client certificates signed by this CA on the public API (mTLS); default: none asked for",
    )
    g = p.add_argument_group("failures")
    g.add_argument(
        "--max-migrations",
        type=int,
        default=2,
        metavar="N",
        help="times one request may move to another decode replica when its own fails mid-stream (its prompt and "
        "tokens so far are encoded again there); then UNAVAILABLE (default: 2)",
    )
    g.add_argument(
        "--stall-timeout-s",
        type=float,
        default=15.0,
        metavar="S",
        help="a decode replica that sends a request no token for this long has failed it: the request moves (default: 15)",
    )
    g.add_argument(
        "--kv-lease-s",
        type=float,
        default=30.0,
        metavar="S",
        help="how long a decode replica may hold a shared-memory KV region without acknowledging it; then the region "
        "is this service's again and the replica refuses it (default: 30)",
    )
    g = p.add_argument_group("callers")
    g.add_argument(
        "--api-keys-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="API keys, one per line, read again when the file changes: Generate, ModelInfo and Tokenize then need "
        "'authorization: Bearer KEY' (UNAUTHENTICATED otherwise); health and reflection stay open (default: no keys)",
    )
    g.add_argument(
        "--max-inflight-per-key",
        type=int,
        default=0,
        metavar="N",
        help="calls in flight per API key (all callers share one count without --api-keys-file); past it "
        "RESOURCE_EXHAUSTED with grpc-retry-pushback-ms (default: 0, no limit)",
    )
    g = p.add_argument_group("TLS to decode replicas (files read again when they change)")
    g.add_argument(
        "--decode-tls-ca", type=Path, default=None, metavar="FILE", help="dial decode replicas over TLS, trusting this CA (default: plaintext)"
    )
    g.add_argument("--decode-tls-cert", type=Path, default=None, metavar="FILE", help="client certificate for mTLS to decode (PEM)")
    g.add_argument("--decode-tls-key", type=Path, default=None, metavar="FILE", help="the private key of --decode-tls-cert (PEM)")
    g.add_argument(
        "--decode-tls-server-name", default=None, metavar="NAME", help="check decode's certificate against this name instead of the address dialled"
    )
    p.add_argument(
        "--max-prompt-bytes",
        type=_size,
        default=None,
        metavar="BYTES",
        help="longest text (prompt or Tokenize) in UTF-8 bytes, refused before it is tokenized; K, M suffixes "
        f"(default: {PROMPT_BYTES_PER_TOKEN} bytes per token of the largest context bucket)",
    )
    p.add_argument(
        "--kv-chunk-bytes",
        type=_size,
        default=1 << 20,
        metavar="BYTES",
        help=f"KV bytes per chunk sent to decode, up to {MAX_KV_CHUNK_BYTES >> 20}M (default: 1M)",
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=positive_int,
        default=DEFAULT_MAX_TOKENS,
        metavar="N",
        help="padded prompt tokens per context-encoding call at most; prompts waiting together are split into the "
        "calls that pad the least within it, and a longer prompt gets a call of its own "
        f"(like vLLM's --max-num-batched-tokens; default: {DEFAULT_MAX_TOKENS})",
    )
    p.add_argument(
        "--stream-interval",
        type=stream_interval,
        default=1,
        metavar="N",
        help="generated tokens per streamed message at least: decode sends a request's tokens once N wait (the first "
        "token and the end at once, and whatever waits at least once a second); fewer messages per token through "
        "this service and its callers, so more throughput under load, for burstier streams. A request's "
        "stream_interval may raise it (like vLLM's --stream-interval; default: 1, every token at once)",
    )
    add_kv_shm_flag(p, role="this service keeps its KV arena there, a file of --kv-shm-bytes, for decode replicas that see it too")
    add_core_turns_flag(p, role="a context encoding goes before the next decode step")
    p.add_argument(
        "--kv-shm-bytes",
        type=_size,
        default=None,
        metavar="BYTES",
        help="size of the shared-memory KV arena, reserved at start; a request whose KV does not fit in "
        "what is free goes as chunks. Accepts K, M, G suffixes (default: room for the KV of 4 full "
        "context-encoding batches at the largest bucket, draft model's included, within 16M-1G)",
    )
    defaults = SERVICE_DEFAULTS["prefill"]
    EngineFlags.add_to(
        p,
        defaults=defaults,
        helps={"batch_size": f"prompts encoded together per context-encoding call, same as --ctx-batch-size (default: {defaults['batch_size']})"},
    )
    return p


async def serve(args: argparse.Namespace) -> None:
    from nxcore import Engine, RequestRng, SamplingParams, SequenceRequest
    from nxcore.checkpoint import read_hf_config
    from nxcore.engine_thread import EngineThread
    from nxcore.speculation import DraftProposer, build_proposer
    from nxcore.tokenizer import load_tokenizer
    from nxserve.kv import KVSender
    from nxserve.rpc.turns import CoreTurns
    from nxserve.rpc.validate import Limits
    from prefill_svc.router import DecodeRouter
    from prefill_svc.server import GenerationServicer
    from prefill_svc.worker import PrefillWorker

    flags = EngineFlags.from_args(args, environ=os.environ)
    if not 0 < args.kv_chunk_bytes <= MAX_KV_CHUNK_BYTES:
        raise ValueError(f"--kv-chunk-bytes={args.kv_chunk_bytes} is invalid: allowed 1..{MAX_KV_CHUNK_BYTES} (decode's message limit)")
    decode_tls = None
    if args.decode_tls_ca or args.decode_tls_cert:
        decode_tls = ChannelTLS(ca=args.decode_tls_ca, cert=args.decode_tls_cert, key=args.decode_tls_key, server_name=args.decode_tls_server_name)
    keys = ApiKeys(args.api_keys_file) if args.api_keys_file else None
    gate = ClientGate(services=[SERVICE], keys=keys, max_inflight=args.max_inflight_per_key)
    servicer = GenerationServicer(
        model_name=args.served_model_name or Path(args.model).name,
        max_migrations=args.max_migrations,
        stall_timeout_s=args.stall_timeout_s,
        stream_interval=args.stream_interval,
    )
    max_prompt_bytes = args.max_prompt_bytes or PROMPT_BYTES_PER_TOKEN * (args.seq_len or SERVICE_DEFAULTS["prefill"]["seq_len"])
    started = await start_server(
        args,
        service=SERVICE,
        register=lambda s: add_service(s, servicer, generation_pb2.DESCRIPTOR.services_by_name["Generation"]),
        max_receive=max_prompt_bytes + (64 << 10),  # the text, and the rest of the request
        gate=gate,
    )

    start = time.perf_counter()
    thread = EngineThread("prefill-engine")  # every torch call from here on: see nxcore.engine_thread
    await thread.run(flags.apply_threads)
    config = flags.service_config("prefill", max_positions=read_hf_config(args.model).max_position_embeddings)
    engine = await thread.run(partial(Engine.from_pretrained, args.model, config, graphs=SERVICE_GRAPHS["prefill"], **flags.load_options()))
    tokenizer = load_tokenizer(args.model, required=False)
    greedy = SamplingParams()
    for bucket in config.buckets:  # warm every context-encoding graph
        await thread.run(engine.context_encode, [SequenceRequest(slot=0, token_ids=[0] * bucket, sampling=greedy, rng=RequestRng(0))])
        engine.free(0)
    proposer = await thread.run(partial(build_proposer, flags.speculation, engine, draft_only=True, **flags.load_options()))
    draft = proposer.draft if isinstance(proposer, DraftProposer) else None
    if draft is not None:  # warm the draft's context-encoding graphs too
        for bucket in config.buckets:
            await thread.run(draft.context_encode, [SequenceRequest(slot=0, token_ids=[0] * bucket, sampling=greedy, rng=RequestRng(0))])
            draft.free(0)
    kv = KVSender.open(
        args.kv_shm_dir, arena_bytes=args.kv_shm_bytes or _arena_default(engine, draft), chunk_bytes=args.kv_chunk_bytes, lease_s=args.kv_lease_s
    )
    turns = CoreTurns(args.core_turns, wait_s=args.core_turns_wait_s)
    worker = PrefillWorker(
        engine,
        max_queue=args.max_queue,
        max_tokens=args.max_prefill_tokens,
        draft=draft,
        thread=thread,
        arena=kv.arena,
        metrics=servicer.metrics,
        turns=turns,
    )
    worker.start()
    targets, names = args.decode
    router = DecodeRouter(
        targets,
        names=names,
        resolve_interval_s=args.decode_resolve_s,
        fingerprint=engine.fingerprint,
        shares_memory=kv.shares_memory_with,
        tls=decode_tls,
    )
    await router.start()
    limits = Limits.for_engine(engine, max_prompt_bytes=args.max_prompt_bytes)
    servicer.attach(engine=engine, worker=worker, router=router, tokenizer=tokenizer, kv=kv, limits=limits)
    freeze_startup_heap()
    await set_health(started.health, SERVICE, serving=True)
    log.info(
        "SERVING %s on port %d after %.1fs: buckets %s, %d decode replica(s), %d up",
        args.model,
        started.port,
        time.perf_counter() - start,
        list(config.buckets),
        len(router.replicas),
        len(router.usable()),
    )

    async def stop() -> None:
        servicer.draining = True  # new requests: UNAVAILABLE at once; running ones get the grace
        await set_health(started.health, SERVICE, serving=False)
        await started.stop(args.grace)
        await router.close()
        worker.stop()
        thread.submit(engine.close)
        if draft is not None:
            thread.submit(draft.close)
        thread.close(timeout=10)
        kv.close()
        turns.close()

    await install_shutdown(stop).wait()
    log.info("stopped")


def _size(text: str) -> int:
    """A byte count with an optional K, M or G suffix (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    scale = units.get(text[-1:], 1)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 268435456, 256M, 1G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the size must be positive, got {text!r}")
    return value


def _arena_default(engine, draft) -> int:
    """Room for the KV of 4 full context-encoding batches at the largest bucket (they stay in the arena
    until their decode replica has them), within 16 MiB..1 GiB."""
    from nxserve.kv import engine_layout

    tokens = 4 * engine.config.ctx_batch_size * engine.config.max_prompt_len
    want = sum(engine_layout(e, tokens).nbytes for e in (engine, draft) if e is not None)
    return min(max(want, 16 << 20), 1 << 30)


def _decode_entries(value: str):
    from nxserve.rpc.discovery import parse_decode

    try:
        return parse_decode(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None, *, prog: str = "python -m prefill_svc") -> int:
    return run_service(serve, build_parser(prog), argv, service="nxserve-prefill")


if __name__ == "__main__":
    sys.exit(main())
