"""Metrics through the OpenTelemetry SDK: one MeterProvider per service, read two ways.

- Prometheus text on `--metrics-port` (HTTP `/metrics`), through opentelemetry-exporter-prometheus:
  OTel's reader, served by prometheus_client's HTTP server, renders the SDK's points as Prometheus
  names (unit suffixes, `_total` on counters) at each scrape.
- OTLP, when the standard variables ask for it (OTEL_METRICS_EXPORTER=otlp, or an OTLP endpoint
  and OTEL_METRICS_EXPORTER unset), every OTEL_METRIC_EXPORT_INTERVAL.

Why the OTel exporter rather than instruments of prometheus_client's own (`python -m
bench.metrics`, 2-core VM): a histogram point costs 7.3 us through the SDK against 1.6 us in
prometheus_client, and a page 0.20 ms against 0.14 ms. A request records a handful of points and
a decode step two (each step takes milliseconds), well under 0.1%, and one set of instruments
feeds both exports instead of two instrumentations that could disagree.

Names follow the OpenTelemetry GenAI conventions where they define one (gen_ai.server.*), with the
bucket boundaries they recommend; the rest are nxserve.*. Without a provider (neither export asked
for) every instrument is the API's no-op: nothing is recorded and nothing costs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

log = logging.getLogger(__name__)

DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
"""gen_ai.server.request.duration's recommended boundaries (seconds)."""
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
"""gen_ai.server.time_to_first_token's recommended boundaries (seconds)."""
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
"""gen_ai.server.time_per_output_token's recommended boundaries (seconds)."""
FAST_BUCKETS = [0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096]
"""Steps, encodings, hand-offs and queue waits (seconds): half a millisecond to seconds."""
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536]
BYTES_BUCKETS = [2**k for k in range(12, 32, 2)]
ROWS_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]

OPERATION = "text_completion"
"""gen_ai.operation.name of a Generate call (a prompt in, a completion out)."""
PROVIDER = "nxserve"
"""gen_ai.provider.name: not one of the conventions' well-known providers, so ours."""


def configure_metrics(service_name: str, environ: Mapping[str, str], *, prometheus_port: int | None, host: str = "0.0.0.0") -> Any:
    """Install a MeterProvider for this service when `prometheus_port` is given or the environment
    asks for OTLP; returns it (None: metrics off). Reads OTEL_* from `environ` (the entry point's)."""
    exporter = environ.get("OTEL_METRICS_EXPORTER", "").lower()
    endpoint = environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    otlp = exporter == "otlp" or (exporter == "" and bool(endpoint))
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true" or not (otlp or prometheus_port is not None):
        return None
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader

    from nxserve.rpc.tracing import resource_for

    readers: list[MetricReader] = []
    if prometheus_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        readers.append(PrometheusMetricReader())
        server, _ = start_http_server(prometheus_port, addr=host)
        log.info("Prometheus metrics on http://%s:%d/metrics", host, server.server_port)
    if otlp:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        log.info("exporting metrics over OTLP to %s", endpoint or "the default endpoint")
    provider = MeterProvider(resource=resource_for(service_name, environ), metric_readers=readers)
    metrics.set_meter_provider(provider)
    return provider


def shutdown_metrics() -> None:
    provider = metrics.get_meter_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def gauge(
    meter: metrics.Meter, name: str, read: Callable[[], float | Iterable[tuple[float, dict[str, Any]]]], *, unit: str, description: str
) -> None:
    """An observable gauge read at each collection (`read` returns a value, or (value, attributes) pairs)."""

    def observe(options: CallbackOptions) -> Iterable[Observation]:
        try:
            value = read()
        except Exception:
            return []
        if isinstance(value, int | float):
            return [Observation(value)]
        return [Observation(v, attributes) for v, attributes in value]

    meter.create_observable_gauge(name, callbacks=[observe], unit=unit, description=description)


class PrefillMetrics:
    """The prefill service's instruments (the public API's view of each request)."""

    def __init__(self, meter: metrics.Meter | None = None) -> None:
        meter = meter or metrics.get_meter("nxserve.prefill_svc")
        self.request_duration = meter.create_histogram(
            "gen_ai.server.request.duration",
            unit="s",
            description="Generate calls from arrival to the last token (or the error)",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.time_to_first_token = meter.create_histogram(
            "gen_ai.server.time_to_first_token",
            unit="s",
            description="Arrival to the first token, successful requests",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
        )
        self.time_per_output_token = meter.create_histogram(
            "gen_ai.server.time_per_output_token",
            unit="s",
            description="Time per token after the first, successful requests with two or more tokens",
            explicit_bucket_boundaries_advisory=TPOT_BUCKETS,
        )
        self.requests = meter.create_counter("nxserve.requests", unit="{request}", description="Generate calls by gRPC status code")
        self.tokens = meter.create_counter(
            "nxserve.tokens", unit="{token}", description="Prompt (gen_ai.token.type=input) and generated (output) tokens"
        )
        self.queue_time = meter.create_histogram(
            "nxserve.queue.duration", unit="s", description="Wait for context encoding", explicit_bucket_boundaries_advisory=FAST_BUCKETS
        )
        self.encoding_time = meter.create_histogram(
            "nxserve.context_encoding.duration",
            unit="s",
            description="Context-encoding calls (and their KV export) by bucket",
            explicit_bucket_boundaries_advisory=FAST_BUCKETS,
        )
        self.kv_bytes = meter.create_counter("nxserve.kv.transfer.size", unit="By", description="KV handed to decode, by transport")
        self.kv_time = meter.create_histogram(
            "nxserve.kv.transfer.duration",
            unit="s",
            description="KV hand-off, header to ack less decode's queueing, by transport",
            explicit_bucket_boundaries_advisory=FAST_BUCKETS,
        )
        self.migrations = meter.create_counter(
            "nxserve.migrations", unit="{request}", description="Requests moved to another decode replica after theirs failed"
        )
        self.meter = meter

    def observe(self, *, queue_depth: Callable[[], float], replicas_routable: Callable[[], float]) -> None:
        gauge(self.meter, "nxserve.queue.depth", queue_depth, unit="{request}", description="Prompts waiting for context encoding")
        gauge(
            self.meter,
            "nxserve.decode.replicas.routable",
            replicas_routable,
            unit="{replica}",
            description="Decode replicas prefill routes to now (up, same model)",
        )


class DecodeMetrics:
    """A decode replica's instruments."""

    def __init__(self, meter: metrics.Meter | None = None) -> None:
        meter = meter or metrics.get_meter("nxserve.decode_svc")
        self.queue_time = meter.create_histogram(
            "nxserve.queue.duration", unit="s", description="Wait for a decode slot", explicit_bucket_boundaries_advisory=FAST_BUCKETS
        )
        self.step_time = meter.create_histogram(
            "nxserve.decode.step.duration",
            unit="s",
            description="Decode steps (token generation or a speculation round)",
            explicit_bucket_boundaries_advisory=FAST_BUCKETS,
        )
        self.step_rows = meter.create_histogram(
            "nxserve.decode.step.rows", unit="{request}", description="Requests per decode step", explicit_bucket_boundaries_advisory=ROWS_BUCKETS
        )
        self.requests = meter.create_counter("nxserve.decode.requests", unit="{request}", description="Decode calls by how they ended")
        self.proposed = meter.create_counter("nxserve.speculation.proposed", unit="{token}", description="Tokens proposed by speculation")
        self.accepted = meter.create_counter("nxserve.speculation.accepted", unit="{token}", description="Proposed tokens the target model accepted")
        self.meter = meter

    def observe(self, load: Callable[[], tuple[int, int, int]]) -> None:
        """Slots and queue from the loop's `load()` (free slots, all slots, queued requests): the
        slots as OpenTelemetry names a pool's usage (db.client.connection.count and .max)."""

        def slots() -> list[tuple[float, dict[str, Any]]]:
            free, total, _ = load()
            return [(total - free, {"nxserve.slot.state": "used"}), (free, {"nxserve.slot.state": "free"})]

        gauge(self.meter, "nxserve.decode.slots.count", slots, unit="{slot}", description="Decode slots by state: used (holding a request) or free")
        gauge(self.meter, "nxserve.decode.slots.max", lambda: load()[1], unit="{slot}", description="Decode slots in all (--batch-size)")
        gauge(self.meter, "nxserve.queue.depth", lambda: load()[2], unit="{request}", description="Requests waiting for a slot")
