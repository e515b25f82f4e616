"""TTFT and decode speed through the services next to the in-process engine, plus KV transfer.

    python -m bench.services --model DIR [--prompt-len 128] [--new-tokens 64] [--requests 5]
                             [--kv-tokens 128,512,1536 --seq-len 2048]

One run, one machine: the in-process engine (one prompt at a time, batch 1) and the same prompts
through a local cluster (prefill + one decode replica on loopback, sequential requests), then the
KV hand-off alone: a real snapshot from an in-process engine sent on a Decode stream to the
replica, timed from the header to the ack, as chunks and through a shared-memory arena. Prints
tables with ratios; --json writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from bench.common import random_prompts
from nxcore import Engine, RequestRng, RuntimeConfig, SamplingParams, SequenceRequest, StoppingCriteria, native
from nxserve.client import Client
from nxserve.cluster import LocalCluster
from nxserve.kv import SHM, DecodeStub, KVSender, OutboundKV, engine_layout
from nxserve.kv.shm import KVArena, sees_probe
from nxserve.rpc.convert import decode_header, fingerprint_pb
from nxserve.rpc.server import channel_options
from nxserve.v1 import decode_pb2, decode_pb2_grpc


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


def through_services(target: str, prompts: list[list[int]], new_tokens: int, **client_options: Any) -> dict[str, float]:
    ttft, speed = [], []
    with Client(target, **client_options) as client:
        client.generate_text(prompts[0], max_new_tokens=4, ignore_eos=True)  # connections warm
        for prompt in prompts:
            r = client.generate_text(prompt, max_new_tokens=new_tokens, ignore_eos=True)
            ttft.append(r.ttft_s)
            speed.append(r.decode_tokens_per_s)
    return {"ttft_ms": statistics.median(ttft) * 1000, "decode_tok_s": statistics.median(speed)}


async def kv_transfer(engine: Engine, decode_target: str, prompts: list[list[int]], arena: KVArena | None = None) -> dict[str, float | list[float]]:
    """Bytes and milliseconds (median, min, max, each) of a header + chunks + commit -> ack on a real
    Decode stream (a header naming a region of `arena` -> ack when given), less the time the
    replica queued the request for a slot, and the median throughput in GB/s. The KV is exported
    as prefill exports it (into a region of `arena` when given); the stream is opened 10 ms before
    the header, as prefill opens it before context encoding."""
    seconds, sizes = [], []
    greedy = SamplingParams(seed=0)
    sender = KVSender(arena=arena, chunk_bytes=1 << 20)
    fingerprint = fingerprint_pb(digest=engine.fingerprint, architecture=engine.model_config.model_type, dtype=engine.config.dtype)
    async with grpc.aio.insecure_channel(decode_target, options=channel_options()) as channel:
        stub = DecodeStub(channel)
        for prompt in prompts:
            rng = RequestRng(0)
            [first] = engine.context_encode([SequenceRequest(slot=0, token_ids=prompt, sampling=greedy, rng=rng)])
            kv = OutboundKV.reserve(arena, [engine_layout(engine, len(prompt))])
            if arena is not None and kv.region is None:
                raise RuntimeError(f"no room in the arena for {len(prompt)} tokens of KV")
            kv.export(0, engine, 0)
            kv.seal()  # as prefill's worker seals it after the export
            engine.free(0)
            await asyncio.sleep(0.1)  # no context encoding (and its spinning threads) next to the transfer
            header = decode_header(
                request_id="bench",
                prompt_ids=prompt,
                sampling=greedy,
                stopping=StoppingCriteria(max_new_tokens=2),
                stop_strings=(),
                first_token=first,
                rng_offset=rng.offset,
                fingerprint=fingerprint,
            )
            call = stub.Decode()  # opened ahead, as prefill opens it before it encodes the prompt
            await asyncio.sleep(0.01)
            try:
                sent = await sender.send(call, header, kv, shared_memory=arena is not None, peer=decode_target)
            finally:
                call.cancel()
                kv.release()
            if (sent.transport == SHM) != (arena is not None):
                raise RuntimeError(f"the KV went as {sent.transport}, not as asked")
            seconds.append(sent.seconds)
            sizes.append(sent.bytes_sent)
            await asyncio.sleep(0.1)  # the replica's decode step for the request, which is cancelled
    t, size = statistics.median(seconds), statistics.median(sizes)
    return {
        "kv_bytes": size,
        "kv_transfer_ms": t * 1000,
        "kv_gb_s": size / t / 1e9,
        "kv_transfer_ms_min": min(seconds) * 1000,
        "kv_transfer_ms_max": max(seconds) * 1000,
        "kv_transfer_ms_each": [round(s * 1000, 3) for s in seconds],
    }


async def round_trip(decode_target: str, n: int) -> dict[str, float]:
    """Milliseconds (median, min) of an empty unary call to the replica (GetLoad), paced like the
    hand-offs: the gRPC floor under each of them."""
    seconds = []
    async with grpc.aio.insecure_channel(decode_target, options=channel_options()) as channel:
        stub = decode_pb2_grpc.DecodeStub(channel)
        await stub.GetLoad(decode_pb2.GetLoadRequest(), timeout=10)
        for _ in range(n):
            await asyncio.sleep(0.1)
            start = time.perf_counter()
            await stub.GetLoad(decode_pb2.GetLoadRequest(), timeout=10)
            seconds.append(time.perf_counter() - start)
    return {"round_trip_ms": statistics.median(seconds) * 1000, "round_trip_ms_min": min(seconds) * 1000}


def main(argv: list[str] | None = None) -> int:
    native.configure_from(os.environ)  # an entry point: NXSERVE_NATIVE* are read here
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default: 128)")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per request (default: 64)")
    p.add_argument("--requests", type=int, default=5, help="requests per measurement; medians are reported (default: 5)")
    p.add_argument("--dtype", default="auto", help="engine dtype on both sides (default: the checkpoint's)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per slot (default: 512)")
    p.add_argument(
        "--kv-tokens",
        type=lambda v: [int(x) for x in v.split(",")],
        default=None,
        help="prompt lengths to time the KV hand-off at, e.g. 128,512,1536 (each < --seq-len; default: --prompt-len)",
    )
    p.add_argument(
        "--kv-shm-dir",
        type=Path,
        default=Path("/dev/shm"),
        help="shared-memory directory for the second KV measurement, through an arena there (default: /dev/shm)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="also run the services with TLS on every service and mTLS between them (throwaway certificates), "
        "and report TTFT and decode speed next to plaintext",
    )
    p.add_argument(
        "--telemetry",
        action="store_true",
        help="also run the services with every telemetry export on (OTLP traces, metrics and logs to a sink in this "
        "process, Prometheus /metrics scraped every second, JSON logs) and report TTFT and decode speed next to none",
    )
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)

    config = RuntimeConfig(batch_size=1, seq_len=args.seq_len, dtype=args.dtype)
    print(f"loading {args.model} in-process ...", file=sys.stderr)
    engine = Engine.from_pretrained(args.model, config)
    prompts = random_prompts(args.requests, args.prompt_len, engine.model_config.vocab_size)
    in_process(engine, prompts[:1], 4)  # warm
    local = in_process(engine, prompts, args.new_tokens)
    print("starting prefill + 1 decode replica ...", file=sys.stderr)
    engine_args = ["--seq-len", str(args.seq_len), "--dtype", engine.config.dtype, "--batch-size", "4", "--kv-shm-dir", str(args.kv_shm_dir)]
    kv_tokens = args.kv_tokens or [args.prompt_len]
    transfers: dict[str, list[dict]] = {"chunks": [], "shared memory": []}
    with LocalCluster(args.model, decode_replicas=1, engine_args=engine_args) as cluster:
        remote = through_services(cluster.target, prompts, args.new_tokens)
        floor = asyncio.run(round_trip(cluster.decode_targets[0], args.requests))
        arena = _arena(args.kv_shm_dir, cluster.decode_targets[0], max(kv_tokens), engine)
        try:
            for n in kv_tokens:
                kv_prompts = random_prompts(args.requests, n, engine.model_config.vocab_size)
                transfers["chunks"].append({"tokens": n, **asyncio.run(kv_transfer(engine, cluster.decode_targets[0], kv_prompts))})
                if arena is not None:
                    transfers["shared memory"].append({"tokens": n, **asyncio.run(kv_transfer(engine, cluster.decode_targets[0], kv_prompts, arena))})
        finally:
            if arena is not None:
                arena.close()

    secured = _with_tls(args, engine_args, prompts) if args.tls else None
    observed = _with_telemetry(args, engine_args, prompts) if args.telemetry else None

    print(
        f"\n{args.model}: {engine.model_config.model_type}, {engine.config.dtype}, prompt {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens, medians of {args.requests} requests"
    )
    print(f"{'':24}{'in-process':>12}{'services':>12}{'ratio':>8}")
    for key, label in (("ttft_ms", "TTFT (ms)"), ("decode_tok_s", "decode (tokens/s)")):
        print(f"{label:24}{local[key]:12.2f}{remote[key]:12.2f}{remote[key] / local[key]:8.2f}")
    print("\nKV hand-off, header to ack less the replica's queueing, median of each:")
    print(f"{'transport':>14}{'tokens':>8}{'MB':>9}{'ms':>9}{'min-max ms':>16}{'GB/s':>7}")
    for transport, rows in transfers.items():
        for t in rows:
            print(
                f"{transport:>14}{t['tokens']:8d}{t['kv_bytes'] / 1e6:9.3f}{t['kv_transfer_ms']:9.2f}"
                f"{t['kv_transfer_ms_min']:8.2f}-{t['kv_transfer_ms_max']:<7.2f}{t['kv_gb_s']:7.2f}"
            )
    if not transfers["shared memory"]:
        print(f"(no shared-memory figures: no arena could be made in {args.kv_shm_dir}, or the replica does not see it)")
    print(f"floor: an empty call to the replica (GetLoad) took {floor['round_trip_ms']:.2f} ms (min {floor['round_trip_ms_min']:.2f})")
    transfer = transfers["chunks"][0]
    print(
        f"\nTTFT overhead through services: {remote['ttft_ms'] - local['ttft_ms']:.2f} ms; services TTFT over in-process "
        f"TTFT plus the KV hand-off ({transfer['tokens']} tokens, chunks): "
        f"{remote['ttft_ms'] / (local['ttft_ms'] + transfer['kv_transfer_ms']):.2f}"
    )
    if secured is not None:
        plain, tls = secured["plaintext"], secured["tls"]
        print("\nTLS on every service, mTLS prefill -> decode, against plaintext (mean of a run before and after):")
        print(f"{'':24}{'plaintext':>12}{'TLS':>12}{'ratio':>8}")
        for key, label in (("ttft_ms", "TTFT (ms)"), ("decode_tok_s", "decode (tokens/s)")):
            print(f"{label:24}{plain[key]:12.2f}{tls[key]:12.2f}{tls[key] / plain[key]:8.3f}")
    if observed is not None:
        off, ctl, on = observed["off"], observed["control"], observed["on"]
        paired = observed["paired_ratio"]
        print(f"\nTelemetry: every export on against none, {observed['requests']} requests per cluster, interleaved; the control is a")
        print("second cluster without telemetry (how far two identical clusters differ here). Ratios to 'off': of medians, and")
        print("the median of per-request ratios.")
        print(f"{'':20}{'off':>9}{'control':>9}{'on':>9}{'ctl/off':>9}{'on/off':>9}{'ctl pair':>9}{'on pair':>9}")
        for key, label in (("ttft_ms", "TTFT (ms)"), ("decode_tok_s", "decode (tokens/s)")):
            print(
                f"{label:20}{off[key]:9.2f}{ctl[key]:9.2f}{on[key]:9.2f}{ctl[key] / off[key]:9.3f}{on[key] / off[key]:9.3f}"
                f"{paired['control'][key]:9.3f}{paired['on'][key]:9.3f}"
            )
        print(f"client span per Generate call (SDK tracer, batch processor): {observed['client_span_us']:.1f} us")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": str(args.model),
                    "dtype": engine.config.dtype,
                    "in_process": local,
                    "services": remote,
                    "kv": transfer,
                    "kv_chunks": transfers["chunks"],
                    "kv_shared_memory": transfers["shared memory"],
                    "kv_floor": floor,
                    "tls": secured,
                    "telemetry": observed,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


def _with_tls(args: argparse.Namespace, engine_args: list[str], prompts: list[list[int]]) -> dict[str, dict[str, float]]:
    """TTFT and decode through plaintext services, then through TLS + mTLS ones, then plaintext
    again (the VM's speed drifts: the plaintext figure is the mean of the two around the TLS one)."""
    from nxserve.pki import ClusterTLS

    runs = []
    with tempfile.TemporaryDirectory() as pki:
        for tls in (None, ClusterTLS.create(Path(pki)), None):
            with LocalCluster(args.model, decode_replicas=1, engine_args=engine_args, tls=tls) as cluster:
                runs.append(through_services(cluster.target, prompts, args.new_tokens, **cluster.client_options()))
    plain = {k: (runs[0][k] + runs[2][k]) / 2 for k in runs[0]}
    return {"plaintext": plain, "tls": runs[1], "plaintext_runs": runs[0::2]}  # type: ignore[dict-item]


def _with_telemetry(args: argparse.Namespace, engine_args: list[str], prompts: list[list[int]], rounds: int = 3) -> dict[str, Any]:
    """TTFT and decode with no telemetry and with all of it, on two clusters up at once, their
    requests interleaved (off, on, then on, off, ...) so that the VM's drift falls on both; then the
    cost of a client's span per call."""
    import threading
    import urllib.request
    from concurrent import futures

    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    from nxserve.cluster import _free_ports

    # OTLP receivers that parse and drop what they get (the collector's work is not ours to time).
    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            return trace_service_pb2.ExportTraceServiceResponse()

    class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(self, request, context):
            return metrics_service_pb2.ExportMetricsServiceResponse()

    class Logs(logs_service_pb2_grpc.LogsServiceServicer):
        def Export(self, request, context):
            return logs_service_pb2.ExportLogsServiceResponse()

    sink = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), sink)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), sink)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), sink)
    port = sink.add_insecure_port("127.0.0.1:0")
    sink.start()
    on_env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_LOGS_EXPORTER": "otlp",
        "OTEL_METRIC_EXPORT_INTERVAL": "5000",
    }
    saved = {k: os.environ.pop(k, None) for k in on_env}
    # Two clusters without telemetry: the second is the control, its ratio to the first is what
    # two identical clusters differ by on this machine (the noise the "on" figure sits in).
    clusters = {
        "off": LocalCluster(args.model, decode_replicas=1, engine_args=engine_args),
        "control": LocalCluster(args.model, decode_replicas=1, engine_args=engine_args),
        "on": LocalCluster(args.model, decode_replicas=1, engine_args=[*engine_args, "--log-format", "json"], metrics_port=_free_ports(1)[0]),
    }
    stop = threading.Event()

    def scrape() -> None:
        """As Prometheus would, more often than its default 15 s."""
        while not stop.wait(1.0):
            for p in clusters["on"].metrics_ports().values():
                with urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=5) as r:
                    r.read()

    modes = list(clusters)
    figures: dict[str, dict[str, list[float]]] = {m: {"ttft_ms": [], "decode_tok_s": []} for m in modes}
    try:
        clusters["off"].start()
        clusters["control"].start()
        os.environ.update(on_env)
        try:
            clusters["on"].start()
        finally:
            for k in on_env:
                os.environ.pop(k, None)
        threading.Thread(target=scrape, daemon=True).start()
        clients = {m: Client(c.target) for m, c in clusters.items()}
        for c in clients.values():
            c.generate_text(prompts[0], max_new_tokens=4, ignore_eos=True)  # connections warm
        for i, prompt in enumerate(prompts * rounds):
            for mode in modes[i % 3 :] + modes[: i % 3]:  # each cluster first, second and third in turn
                r = clients[mode].generate_text(prompt, max_new_tokens=args.new_tokens, ignore_eos=True)
                figures[mode]["ttft_ms"].append(r.ttft_s * 1000)
                figures[mode]["decode_tok_s"].append(r.decode_tokens_per_s)
        for c in clients.values():
            c.close()
    finally:
        stop.set()
        for cluster in clusters.values():
            cluster.stop()
        sink.stop(0)
        for k, v in saved.items():
            if v is not None:
                os.environ[k] = v
    result: dict[str, Any] = {m: {k: statistics.median(v) for k, v in f.items()} for m, f in figures.items()}
    result["paired_ratio"] = {
        m: {k: statistics.median(b / a for a, b in zip(figures["off"][k], figures[m][k], strict=True)) for k in figures[m]} for m in ("control", "on")
    }
    result["requests"] = len(figures["on"]["ttft_ms"])
    result["client_span_us"] = _client_span_cost()
    return result


def _client_span_cost(calls: int = 20000) -> float:
    """Microseconds a Client adds to each Generate call for its span, its traceparent and its two
    metrics, with the OpenTelemetry SDK installed (a batch span processor whose exporter drops spans)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    from nxserve import client as client_module

    class Drop(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    default, client_module._tracer = client_module._tracer, provider.get_tracer("nxserve.client")  # this process's global stays as it was
    client = Client("127.0.0.1:1")
    request = client_module._build_request([1, 2, 3], max_new_tokens=8)
    try:
        start = time.perf_counter()
        for _ in range(calls):
            traced = client._start(request)
            client._call_args(None, traced.ctx)
            traced.end(None)
        cost = (time.perf_counter() - start) / calls * 1e6
    finally:
        client_module._tracer = default
        client.close()
        provider.shutdown()
    return cost


def _arena(directory: Path, decode_target: str, max_tokens: int, engine: Engine) -> KVArena | None:
    """An arena in `directory` big enough for the largest snapshot, if the replica sees the directory."""
    size = engine_layout(engine, max_tokens).nbytes
    try:
        arena = KVArena(directory, size + KVArena.ALIGN)
    except OSError as exc:
        print(f"no shared-memory KV arena in {directory}: {exc}", file=sys.stderr)
        return None
    with grpc.insecure_channel(decode_target) as channel:
        probe = decode_pb2_grpc.DecodeStub(channel).GetLoad(decode_pb2.GetLoadRequest(), timeout=10).shm_probe
    if not sees_probe(directory, probe):
        arena.close()
        return None
    return arena


if __name__ == "__main__":
    sys.exit(main())
