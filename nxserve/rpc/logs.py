"""The services' logs: text for people, or JSON lines for machines, and OTLP when asked.

`--log-format json` writes one JSON object per line with timestamp, level, service, logger and
message, plus request_id, trace_id and span_id when the line concerns a request (passed as
`extra`), and any other fields a line carries: the access line each service writes when a request
ends (`access`) has its status code, tokens, times, replica and KV transport as fields, not in a
sentence to parse. OTEL_LOGS_EXPORTER=otlp also sends every record over OTLP, with the trace and
span ids attached, to the same collector as the traces.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
ACCESS_LOGGER = "nxserve.access"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: the standard fields, the request's ids, and the record's extra fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("otel")})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def span_ids(span: trace.Span) -> dict[str, str]:
    """trace_id and span_id of a span, as the W3C traceparent writes them (empty when not sampled)."""
    context = span.get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


def configure_logging(*, level: str, fmt: str, service: str, environ: Mapping[str, str]) -> None:
    """stderr logging in `fmt` (text or json), and OTLP when OTEL_LOGS_EXPORTER=otlp."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if environ.get("OTEL_LOGS_EXPORTER", "").lower() == "otlp" and environ.get("OTEL_SDK_DISABLED", "").lower() != "true":
        from opentelemetry._logs import set_logger_provider
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
        from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

        from nxserve.rpc.tracing import resource_for

        provider = LoggerProvider(resource=resource_for(service, environ))
        provider.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter()))
        set_logger_provider(provider)
        root.addHandler(LoggingHandler(level=logging.getLevelName(level), logger_provider=provider))


def shutdown_logging() -> None:
    from opentelemetry._logs import get_logger_provider

    provider = get_logger_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def access(message: str, *args: Any, span: trace.Span | None, **fields: Any) -> None:
    """The line a service writes when a request ends (`message % args` for people), its fields as
    structured data (JSON keys, OTLP attributes)."""
    extra = {**fields, **(span_ids(span) if span is not None else {})}
    if span is None:
        logging.getLogger(ACCESS_LOGGER).info(message, *args, extra=extra)
        return
    with trace.use_span(span, end_on_exit=False):  # the OTLP log handler takes the ids from the current span
        logging.getLogger(ACCESS_LOGGER).info(message, *args, extra=extra)
