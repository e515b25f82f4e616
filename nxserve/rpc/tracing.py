"""OpenTelemetry set-up for the services and W3C trace context over gRPC metadata.

Exporting is off unless configured through the standard environment variables
(OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_TRACES_EXPORTER, ...).
The entry points call `configure_tracing` once; everything else uses `opentelemetry.trace`.
"""

from __future__ import annotations

import asyncio
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
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = resource_for(service_name, environ)
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("exporting traces over OTLP to %s as %s", endpoint, resource.attributes["service.name"])
    return True


def resource_for(service_name: str, environ: Mapping[str, str]) -> Any:
    """The OpenTelemetry resource of a service: service.name is OTEL_SERVICE_NAME, else
    `service_name` (nxserve-prefill, nxserve-decode); OTEL_RESOURCE_ATTRIBUTES adds the rest."""
    from opentelemetry.sdk.resources import Resource

    return Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME") or service_name})


DEADLINE_SLACK_S = 0.25
"""A call that the caller ends within this long of its deadline ended by the deadline. A server
cannot tell a caller's cancel from its deadline (both arrive as a reset stream, and the caller's
clock runs ahead of the server's by the time the call took to arrive): a reset this close to the
deadline is the deadline."""


def ended_by_deadline(context: Any) -> bool:
    """Whether a call that was cancelled under the gRPC servicer `context` ran out of time."""
    remaining = context.time_remaining() if context is not None else None
    return remaining is not None and remaining <= DEADLINE_SLACK_S


def record_error(span: trace.Span, exc: BaseException, *, context: Any = None) -> tuple[str, str]:
    """Mark `span` as failed by `exc` with the status a caller gets (rpc.grpc.status_code, the
    code's number; error.type, the kind): a cancel and a passed deadline are told apart by the
    servicer `context`'s deadline. Returns (code name, error type)."""
    from nxserve.rpc.status import as_service_error, status_of

    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | GeneratorExit):  # the caller left, or its time ran out
        code, kind, details = (
            ("DEADLINE_EXCEEDED", "DeadlineExceeded", "the caller's deadline passed")
            if ended_by_deadline(context)
            else ("CANCELLED", "Cancelled", "the caller cancelled")
        )
        number = {"DEADLINE_EXCEEDED": 4, "CANCELLED": 1}[code]
    else:
        error = as_service_error(exc)
        status, details, _ = status_of(error)
        code, kind, number = status.name, type(error).__name__, status.value[0]
    span.set_attributes({"rpc.grpc.status_code": number, "error.type": kind})
    span.set_status(trace.Status(trace.StatusCode.ERROR, f"{code}: {details}"[:500]))
    return code, kind


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
    except GeneratorExit:  # the stream's consumer left: not this span's error
        raise
    except BaseException as exc:
        status = getattr(span, "status", None)  # an SDK span's; the API's no-op span has none
        if span.is_recording() and (status is None or status.status_code != trace.StatusCode.ERROR):
            record_error(span, exc)
        raise
    finally:
        span.end()
