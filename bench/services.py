"""TTFT and decode speed through the services next to the in-process engine, plus KV transfer.

    python -m bench.services --model DIR [--prompt-len 128] [--new-tokens 64] [--requests 5]

One run, one machine: the in-process engine (one prompt at a time, batch 1) and the same prompts
through a local cluster (prefill + one decode replica on loopback, sequential requests), then the
KV hand-off alone: a real snapshot from an in-process engine sent on a Decode stream to the
replica, timed from the header to the ack. Prints a table with ratios; --json writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import grpc

from bench.common import random_prompts
from nxcore import Engine, RequestRng, RuntimeConfig, SamplingParams, SequenceRequest, StoppingCriteria
from nxserve.client import Client
from nxserve.cluster import LocalCluster
from nxserve.decode_codec import DecodeStub
from nxserve.grpc_common import server_options
from prefill_svc.kv_sender import decode_header, send_kv


def in_process(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """Median TTFT (context encoding incl. first token) and decode tokens/s at batch 1."""
    ttft, speed = [], []
    greedy = SamplingParams()
    for prompt in prompts:
        rng = RequestRng(0)
        start = time.perf_counter()
        [token] = engine.context_encode([SequenceRequest(slot=0, token_ids=prompt, sampling=greedy, rng=rng)])
        ttft.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            [token] = engine.token_generate([SequenceRequest(slot=0, token_ids=[token], sampling=greedy, rng=rng)])
        speed.append((new_tokens - 1) / (time.perf_counter() - start))
        engine.free(0)
    return {"ttft_ms": statistics.median(ttft) * 1000, "decode_tok_s": statistics.median(speed)}


def through_services(target: str, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    ttft, speed = [], []
    with Client(target) as client:
        client.generate_text(prompts[0], max_new_tokens=4, ignore_eos=True)  # connections warm
        for prompt in prompts:
            r = client.generate_text(prompt, max_new_tokens=new_tokens, ignore_eos=True)
            ttft.append(r.ttft_s)
            speed.append(r.decode_tokens_per_s)
    return {"ttft_ms": statistics.median(ttft) * 1000, "decode_tok_s": statistics.median(speed)}


async def kv_transfer(engine: Engine, decode_target: str, prompts: list[list[int]]) -> dict[str, float | list[float]]:
    """Bytes and milliseconds (median, min, max, each) of a header + chunks + commit -> ack on a real
    Decode stream, and the median throughput in GB/s."""
    seconds, sizes = [], []
    greedy = SamplingParams(seed=0)
    async with grpc.aio.insecure_channel(decode_target, options=server_options()) as channel:
        stub = DecodeStub(channel)
        for prompt in prompts:
            rng = RequestRng(0)
            [first] = engine.context_encode([SequenceRequest(slot=0, token_ids=prompt, sampling=greedy, rng=rng)])
            kv = engine.export_kv(0, len(prompt))
            engine.free(0)
            header = decode_header(engine, kv, request_id="bench", prompt_ids=prompt, sampling=greedy,
                                   stopping=StoppingCriteria(max_new_tokens=2), stop_strings=(), first_token=first,
                                   rng_offset=rng.offset)
            call = stub.Decode()
            sent = await send_kv(call, header, kv, chunk_bytes=1 << 20)
            call.cancel()
            seconds.append(sent.seconds)
            sizes.append(sent.bytes_sent)
    t, size = statistics.median(seconds), statistics.median(sizes)
    return {"kv_bytes": size, "kv_transfer_ms": t * 1000, "kv_gb_s": size / t / 1e9,
            "kv_transfer_ms_min": min(seconds) * 1000, "kv_transfer_ms_max": max(seconds) * 1000,
            "kv_transfer_ms_each": [round(s * 1000, 3) for s in seconds]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default: 128)")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per request (default: 64)")
    p.add_argument("--requests", type=int, default=5, help="requests per measurement; medians are reported (default: 5)")
    p.add_argument("--dtype", default="auto", help="engine dtype on both sides (default: the checkpoint's)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per slot (default: 512)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)

    config = RuntimeConfig(batch_size=1, seq_len=args.seq_len, dtype=args.dtype)
    print(f"loading {args.model} in-process ...", file=sys.stderr)
    engine = Engine.from_pretrained(args.model, config)
    prompts = random_prompts(args.requests, args.prompt_len, engine.model_config.vocab_size)
    in_process(engine, prompts[:1], 4)  # warm
    local = in_process(engine, prompts, args.new_tokens)
    print("starting prefill + 1 decode replica ...", file=sys.stderr)
    engine_args = ["--seq-len", str(args.seq_len), "--dtype", engine.config.dtype, "--batch-size", "4"]
    with LocalCluster(args.model, decode_replicas=1, engine_args=engine_args) as cluster:
        remote = through_services(cluster.target, prompts, args.new_tokens)
        transfer = asyncio.run(kv_transfer(engine, cluster.decode_targets[0], prompts))

    print(f"\n{args.model}: {engine.model_config.model_type}, {engine.config.dtype}, prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, medians of {args.requests} requests")
    print(f"{'':24}{'in-process':>12}{'services':>12}{'ratio':>8}")
    for key, label in (("ttft_ms", "TTFT (ms)"), ("decode_tok_s", "decode (tokens/s)")):
        print(f"{label:24}{local[key]:12.2f}{remote[key]:12.2f}{remote[key] / local[key]:8.2f}")
    print(f"KV transfer: {transfer['kv_gb_s']:.2f} GB/s ({transfer['kv_bytes'] / 1e6:.3f} MB per request in "
          f"{transfer['kv_transfer_ms']:.2f} ms median, {transfer['kv_transfer_ms_min']:.2f}-{transfer['kv_transfer_ms_max']:.2f} ms "
          f"over {len(transfer['kv_transfer_ms_each'])} requests, header to ack)")
    print(f"TTFT overhead through services: {remote['ttft_ms'] - local['ttft_ms']:.2f} ms")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "dtype": engine.config.dtype, "in_process": local,
                                         "services": remote, "kv": transfer}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
