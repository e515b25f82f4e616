"""Observability end to end, against a real OTLP/gRPC receiver (the collector's Trace, Metrics and
Logs services from opentelemetry-proto) run inside the test: requests sent through
`nxserve.Client` from another process make one trace each from the client through prefill to
decode, metric points whose counts are exactly what was sent, log records (OTLP and JSON lines)
with the same trace ids, and a `/metrics` scrape with the same counts; failed requests keep their
gRPC status code on their spans, and a cancel is told from a passed deadline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from nxserve.client import Client
from nxserve.cluster import LocalCluster, _free_ports
from nxserve.testing.model_factory import make_model
from tests.services import sample, scrape, wait_until

pytestmark = pytest.mark.slow

ENGINE_ARGS = ["--seq-len", "256", "--batch-size", "2", "--threads", "1", "--log-format", "json"]
MODEL_NAME = "tiny-qwen3"


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]
    status_message: str


@dataclass
class Collector(
    trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer, logs_service_pb2_grpc.LogsServiceServicer
):
    """An OTLP/gRPC endpoint that keeps what it receives."""

    spans: list[Span] = field(default_factory=list)
    metrics: list[tuple[str, Any]] = field(default_factory=list)
    """(service.name, Metric), in arrival order (each export is cumulative: the last one counts)."""
    logs: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)
    """(service.name, attributes, trace id) of each log record."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Export(self, request, context):
        service = lambda resource: _attrs(resource.attributes).get("service.name", "")  # noqa: E731
        with self.lock:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                for rs in request.resource_spans:
                    for ss in rs.scope_spans:
                        self.spans.extend(
                            Span(
                                service(rs.resource),
                                s.name,
                                s.trace_id.hex(),
                                s.span_id.hex(),
                                s.parent_span_id.hex(),
                                s.kind,
                                _attrs(s.attributes),
                                s.status.message,
                            )
                            for s in ss.spans
                        )
                return trace_service_pb2.ExportTraceServiceResponse()
            if isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
                for rm in request.resource_metrics:
                    for sm in rm.scope_metrics:
                        self.metrics.extend((service(rm.resource), m) for m in sm.metrics)
                return metrics_service_pb2.ExportMetricsServiceResponse()
            for rl in request.resource_logs:
                for sl in rl.scope_logs:
                    self.logs.extend((service(rl.resource), _attrs(r.attributes), r.trace_id.hex()) for r in sl.log_records)
            return logs_service_pb2.ExportLogsServiceResponse()

    def spans_of(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def last(self, service: str, name: str) -> Any:
        """The latest export of metric `name` from `service` (None before one came)."""
        with self.lock:
            found = [m for s, m in self.metrics if s == service and m.name == name]
        return found[-1] if found else None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(arch="qwen3", preset="tiny", out=tmp_path_factory.mktemp("telemetry") / MODEL_NAME, seed=5)


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Collector, dict[str, str]]]:
    """A receiver, and the environment that points a process's OTLP exports at it (also set here:
    the cluster's services inherit it)."""
    receiver = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(receiver, server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_LOGS_EXPORTER": "otlp",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_BLRP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "tel",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        yield receiver, env
    finally:
        server.stop(0)


CLIENT = """
import json, sys
from nxserve.client import Client
from nxserve.rpc.tracing import configure_tracing, shutdown_tracing
configure_tracing("test-client")
target, requests = sys.argv[1], json.loads(sys.argv[2])
with Client(target) as client:
    for rid, prompt, n in requests:
        result = client.generate_text(prompt, max_new_tokens=n, ignore_eos=True, request_id=rid)
        print(json.dumps([rid, len(result.prompt_ids), len(result.output_ids)]), flush=True)
shutdown_tracing()
"""


def _client_process(target: str, requests: list[tuple[str, list[int], int]], env: dict[str, str]) -> list[tuple[str, int, int]]:
    """Send `requests` (request id, prompt ids, tokens) through nxserve.Client from a process of
    their own with tracing configured from `env`, as an application would."""
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, target, json.dumps(requests)],
        env={**os.environ, **env, "OTEL_SERVICE_NAME": "test-client"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [tuple(json.loads(line)) for line in out.stdout.splitlines()]  # type: ignore[misc]


def _sum_points(metric: Any, **attributes: str) -> float:
    """A counter's value (sum) or a histogram's count over the points whose attributes include `attributes`."""
    kind = metric.WhichOneof("data")
    points = metric.sum.data_points if kind == "sum" else metric.histogram.data_points
    total = 0.0
    for p in points:
        if attributes.items() <= _attrs(p.attributes).items():
            total += p.count if kind == "histogram" else (p.as_int or p.as_double)
    return total


def test_three_requests_traces_metrics_and_logs_agree(model_dir: Path, collector: tuple[Collector, dict[str, str]], tmp_path: Path) -> None:
    receiver, env = collector
    metrics_port = _free_ports(1)[0]
    requests = [("tel-0", [5, 6, 7], 4), ("tel-1", list(range(10, 30)), 9), ("tel-2", [40, 41, 42, 43, 44, 45, 46], 1)]
    cluster = LocalCluster(model_dir, decode_replicas=1, engine_args=ENGINE_ARGS, metrics_port=metrics_port, log_dir=tmp_path)
    with cluster:
        sent = _client_process(cluster.target, requests, env)
        assert sent == [(rid, len(prompt), n) for rid, prompt, n in requests]
        prompt_total, output_total = sum(p for _, p, _ in sent), sum(n for *_, n in sent)

        # The Prometheus endpoint of each service, after those N requests: exact counts.
        prefill = scrape(cluster.metrics_ports()["prefill"])
        assert sample(prefill, "nxserve_requests", "nxserve_requests_total", rpc_grpc_status_code="OK") == len(requests)
        assert sample(prefill, "nxserve_tokens", "nxserve_tokens_total", gen_ai_token_type="input") == prompt_total
        assert sample(prefill, "nxserve_tokens", "nxserve_tokens_total", gen_ai_token_type="output") == output_total
        duration = "gen_ai_server_request_duration_seconds"
        assert sample(prefill, duration, duration + "_count", gen_ai_request_model=MODEL_NAME, gen_ai_operation_name="text_completion") == 3
        ttft = "gen_ai_server_time_to_first_token_seconds"
        assert sample(prefill, ttft, ttft + "_count") == 3
        tpot = "gen_ai_server_time_per_output_token_seconds"
        assert sample(prefill, tpot, tpot + "_count") == 2  # a one-token request has no time per output token
        # Two requests went on to decode (a one-token one ends at prefill), each handing its KV over once.
        kv_size = "nxserve_kv_transfer_size_bytes"
        assert sample(prefill, kv_size, kv_size + "_total", nxserve_kv_transport="shm") > 0
        assert sample(prefill, "nxserve_kv_transfer_duration_seconds", "nxserve_kv_transfer_duration_seconds_count") == 2
        assert sample(prefill, "nxserve_context_encoding_duration_seconds", "nxserve_context_encoding_duration_seconds_count") == 3
        assert sample(prefill, "nxserve_decode_replicas_routable", "nxserve_decode_replicas_routable") == 1
        assert sample(prefill, "nxserve_queue_depth", "nxserve_queue_depth") == 0
        # Decode counts a stream when it closes, which can be just after prefill relayed its last token.
        wait_until(
            lambda: (
                sample(
                    scrape(cluster.metrics_ports()["decode-0"]),
                    "nxserve_decode_requests",
                    "nxserve_decode_requests_total",
                    rpc_grpc_status_code="OK",
                )
                == 2
            ),
            what="decode counting its two streams",
        )
        decode = scrape(cluster.metrics_ports()["decode-0"])
        assert sample(decode, "nxserve_decode_slots_max", "nxserve_decode_slots_max") == 2
        assert sample(decode, "nxserve_decode_slots_count", "nxserve_decode_slots_count", nxserve_slot_state="used") == 0
        assert sample(decode, "nxserve_decode_slots_count", "nxserve_decode_slots_count", nxserve_slot_state="free") == 2
        steps = sample(decode, "nxserve_decode_step_duration_seconds", "nxserve_decode_step_duration_seconds_count")
        assert steps >= 8  # the longest request decoded 8 tokens after prefill's first
        assert sample(decode, "nxserve_decode_step_rows", "nxserve_decode_step_rows_count") == steps
    # stop() sent SIGTERM: each service flushed its spans, metrics and logs before exiting.

    # One trace per request: the client's span, prefill's under it, decode's under prefill's.
    client_spans: dict[str, Span] = {}

    def clients() -> bool:
        with receiver.lock:
            client_spans.update({s.attributes.get("nxserve.request_id"): s for s in receiver.spans if s.service == "test-client"})
        return len(client_spans) == 3

    wait_until(clients, what="the client's three spans")
    for rid, prompt, n in requests:
        root = client_spans[rid]
        assert root.parent_id == "" and root.kind == 3  # SPAN_KIND_CLIENT
        assert root.attributes["gen_ai.usage.output_tokens"] == n and root.attributes["rpc.grpc.status_code"] == 0
        prefill_names = {"generate", "queue", "context_encoding"} | ({"kv_transfer", "decoding"} if n > 1 else set())
        expected = {("tel-prefill", name) for name in prefill_names} | ({("tel-decode", "decode"), ("tel-decode", "kv_receive")} if n > 1 else set())
        wait_until(
            lambda e=expected, t=root.trace_id: e <= {(s.service, s.name) for s in receiver.spans_of(t)}, what=f"{rid}'s spans: {sorted(expected)}"
        )
        spans = receiver.spans_of(root.trace_id)
        server = next(s for s in spans if s.name == "generate" and s.service == "tel-prefill")
        assert server.parent_id == root.span_id and server.kind == 2  # SPAN_KIND_SERVER
        assert server.attributes["nxserve.request_id"] == server.attributes["gen_ai.response.id"] == rid
        assert server.attributes["gen_ai.request.model"] == MODEL_NAME
        assert server.attributes["gen_ai.operation.name"] == "text_completion" and server.attributes["gen_ai.provider.name"] == "nxserve"
        assert server.attributes["gen_ai.usage.input_tokens"] == len(prompt) and server.attributes["gen_ai.usage.output_tokens"] == n
        assert {"gen_ai.request.top_p", "gen_ai.request.top_k", "gen_ai.request.seed"} <= server.attributes.keys()
        assert not any("/" in str(s.attributes.get("gen_ai.request.model", "")) for s in spans)  # a name, never a path

    # Metric points exported over OTLP: the same exact counts (cumulative: the last export holds them).
    def otlp_counts() -> tuple[float, ...]:
        requests_ok = receiver.last("tel-prefill", "nxserve.requests")
        tokens = receiver.last("tel-prefill", "nxserve.tokens")
        duration = receiver.last("tel-prefill", "gen_ai.server.request.duration")
        if None in (requests_ok, tokens, duration):
            return ()
        return (
            _sum_points(requests_ok, **{"rpc.grpc.status_code": "OK"}),
            _sum_points(tokens, **{"gen_ai.token.type": "input"}),
            _sum_points(tokens, **{"gen_ai.token.type": "output"}),
            _sum_points(duration, **{"gen_ai.request.model": MODEL_NAME}),
        )

    wait_until(
        lambda: otlp_counts() == (3, prompt_total, output_total, 3), what=f"OTLP metrics counting 3 requests, {prompt_total} + {output_total} tokens"
    )

    # Log records: one access record per request on prefill, exported over OTLP with its trace id,
    # and the same in the JSON lines of the service's log file.
    trace_of = {rid: span.trace_id for rid, span in client_spans.items()}

    def access_records() -> dict[str, str]:
        with receiver.lock:
            return {a["request_id"]: tid for s, a, tid in receiver.logs if s == "tel-prefill" and a.get("request_id") in trace_of}

    wait_until(lambda: access_records() == trace_of, what="prefill's access log records with each request's trace id")
    lines = [json.loads(line) for line in (cluster.log_dir / "prefill.log").read_text().splitlines() if line.startswith("{")]
    access = {line["request_id"]: line for line in lines if line.get("logger") == "nxserve.access"}
    for rid, prompt, n in requests:
        line = access[rid]
        assert line["trace_id"] == trace_of[rid] and len(line["span_id"]) == 16
        assert (line["status_code"], line["prompt_tokens"], line["completion_tokens"]) == ("OK", len(prompt), n)
        assert line["ttft_ms"] > 0 and line["duration_ms"] >= line["ttft_ms"] and line["service"] == "tel-prefill"
        assert {"timestamp", "level", "decode_replica", "kv_transport"} <= line.keys()
    decode_lines = [json.loads(line) for line in (cluster.log_dir / "decode-0.log").read_text().splitlines() if line.startswith("{")]
    decoded = {line["request_id"]: line for line in decode_lines if line.get("logger") == "nxserve.access"}
    assert {rid for rid, _, n in requests if n > 1} == decoded.keys()
    assert all(decoded[rid]["trace_id"] == trace_of[rid] for rid in decoded)


def test_failed_requests_keep_their_status_code(model_dir: Path, collector: tuple[Collector, dict[str, str]]) -> None:
    """Refused (INVALID_ARGUMENT), past its deadline (DEADLINE_EXCEEDED) and cancelled (CANCELLED)
    requests: each span says which, with the request id."""
    receiver, _ = collector
    metrics_port = _free_ports(1)[0]
    with LocalCluster(model_dir, decode_replicas=1, engine_args=ENGINE_ARGS, metrics_port=metrics_port) as cluster, Client(cluster.target) as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.generate_text([5, 6, 7], max_new_tokens=4, temperature=-1.0, request_id="bad-0")
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as late:
            client.generate_text([5, 6, 7], max_new_tokens=200, ignore_eos=True, request_id="late-0", timeout=0.3)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stream = client.generate([5, 6, 7], max_new_tokens=200, ignore_eos=True, request_id="gone-0")
        next(stream)
        stream.close()  # the caller leaves: the call is cancelled

        def codes() -> dict[str, float]:
            families = scrape(cluster.metrics_ports()["prefill"])
            return {
                c: sample(families, "nxserve_requests", "nxserve_requests_total", rpc_grpc_status_code=c)
                for c in ("INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "CANCELLED", "OK")
            }

        want = {"INVALID_ARGUMENT": 1, "DEADLINE_EXCEEDED": 1, "CANCELLED": 1, "OK": 0}
        try:
            wait_until(lambda: codes() == want, what="one request per failure code")
        except AssertionError:
            assert codes() == want
            raise

    def server_span(rid: str) -> Span | None:
        with receiver.lock:
            return next(
                (s for s in receiver.spans if s.service == "tel-prefill" and s.name == "generate" and s.attributes.get("nxserve.request_id") == rid),
                None,
            )

    wait_until(lambda: all(server_span(r) for r in ("bad-0", "late-0", "gone-0")), what="the three failed requests' spans")
    expected = {
        "bad-0": (3, "InvalidRequest", "INVALID_ARGUMENT"),
        "late-0": (4, "DeadlineExceeded", "DEADLINE_EXCEEDED"),
        "gone-0": (1, "Cancelled", "CANCELLED"),
    }
    for rid, (number, error_type, name) in expected.items():
        span = server_span(rid)
        assert span is not None
        assert (span.attributes.get("rpc.grpc.status_code"), span.attributes.get("error.type")) == (number, error_type), (rid, span)
        assert span.status_message.startswith(name), (rid, span.status_message)


ASYNC_CLIENT = """
import asyncio, sys
from nxserve.client import AsyncClient
from nxserve.rpc.tracing import configure_tracing, shutdown_tracing
configure_tracing("test-async-client")
async def main():
    async with AsyncClient(sys.argv[1]) as client:
        await client.generate_text([5, 6, 7], max_new_tokens=3, ignore_eos=True, request_id="async-0")
asyncio.run(main())
shutdown_tracing()
"""


def test_nxserve_client_and_async_client_start_the_trace(model_dir: Path, collector: tuple[Collector, dict[str, str]]) -> None:
    receiver, env = collector
    with LocalCluster(model_dir, decode_replicas=1, engine_args=ENGINE_ARGS) as cluster:
        runs = [
            (
                [
                    sys.executable,
                    "-m",
                    "nxserve.cli",
                    "client",
                    "--target",
                    cluster.target,
                    "--prompt-ids",
                    "5,6,7",
                    "--max-new-tokens",
                    "3",
                    "--json",
                ],
                "nxserve-client",
            ),
            ([sys.executable, "-c", ASYNC_CLIENT, cluster.target], "test-async-client"),
        ]
        for argv, service in runs:
            clean = {k: v for k, v in {**os.environ, **env}.items() if k != "OTEL_SERVICE_NAME"}
            done = subprocess.run(argv, env=clean, capture_output=True, text=True, timeout=120, check=False)
            assert done.returncode == 0, done.stderr

            def root(service: str = service) -> Span | None:
                with receiver.lock:
                    return next((s for s in receiver.spans if s.service == service and s.kind == 3), None)

            span = wait_until(root, what=f"a CLIENT span from {service}")
            assert span.parent_id == "" and span.attributes["gen_ai.usage.output_tokens"] == 3
            wait_until(
                lambda span=span: any(s.parent_id == span.span_id and s.service == "tel-prefill" for s in receiver.spans_of(span.trace_id)),
                what=f"prefill's span under {service}'s",
            )
