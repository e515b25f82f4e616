"""OpenTelemetry set-up for the services and W3C trace context over gRPC metadata.

Exporting is off unless configured through the standard environment variables
(OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_TRACES_EXPORTER, ...).
The entry points call `configure_tracing` once; everything else uses `opentelemetry.trace`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

log = logging.getLogger(__name__)


def configure_tracing(service_name: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Install an SDK tracer provider exporting over OTLP when an endpoint is configured.

    Returns whether spans are exported.
    """
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true" or not endpoint or environ.get("OTEL_TRACES_EXPORTER") == "none":
        return False
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("exporting traces over OTLP to %s as %s", endpoint, resource.attributes["service.name"])
    return True


def shutdown_tracing() -> None:
    """Flush and stop the exporter, if one was installed."""
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def inject_metadata(ctx: otel_context.Context | None = None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying the current (or given) trace context."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return tuple(carrier.items())


def extract_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> otel_context.Context:
    """The trace context a caller sent in gRPC metadata (empty context when none)."""
    carrier = {key: value for key, value in (metadata or ()) if isinstance(value, str)}
    return propagate.extract(carrier)


@contextmanager
def span_in(tracer: trace.Tracer, name: str, *, parent: otel_context.Context, **kwargs: Any) -> Iterator[tuple[trace.Span, otel_context.Context]]:
    """A span under `parent` and the context that holds it, without touching the current context.

    gRPC aio runs a streaming handler's steps in different contexts, so `start_as_current_span`
    around a `yield` fails to detach; pass the returned context to child spans instead.
    """
    span = tracer.start_span(name, context=parent, **kwargs)
    try:
        yield span, trace.set_span_in_context(span, parent)
    except BaseException as exc:
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        span.end()
