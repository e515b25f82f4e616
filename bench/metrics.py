"""What a metric costs: recording a point and rendering a /metrics page, through the OpenTelemetry
SDK with its Prometheus reader (what the services use, `nxserve/rpc/metrics.py`) against
prometheus_client's own instruments, in one run.

    python -m bench.metrics [--points 100000] [--scrapes 200]

The instrument is gen_ai.server.request.duration as the services record it (the conventions'
buckets, three attributes). prometheus_client is timed two ways: looking its labels up on every
point, as the services would, and on a child bound once.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from pathlib import Path

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from nxserve.rpc.metrics import DURATION_BUCKETS


def measure(points: int, scrapes: int) -> dict[str, float]:
    otel_registry, prom_registry = CollectorRegistry(), CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=otel_registry, disable_target_info=True)])
    otel = provider.get_meter("bench").create_histogram(
        "gen_ai.server.request.duration", unit="s", explicit_bucket_boundaries_advisory=DURATION_BUCKETS
    )
    attributes = {"gen_ai.operation.name": "text_completion", "gen_ai.request.model": "m", "error.type": "InvalidRequest"}
    prom = Histogram("gen_ai_server_request_duration_seconds", "d", ["op", "model", "error"], buckets=DURATION_BUCKETS, registry=prom_registry)
    bound = prom.labels("text_completion", "m", "InvalidRequest")
    figures = {
        "otel_record_us": timeit.timeit(lambda: otel.record(0.123, attributes), number=points) / points * 1e6,
        "prometheus_client_record_us": timeit.timeit(lambda: prom.labels("text_completion", "m", "InvalidRequest").observe(0.123), number=points)
        / points
        * 1e6,
        "prometheus_client_bound_record_us": timeit.timeit(lambda: bound.observe(0.123), number=points) / points * 1e6,
        "otel_scrape_ms": timeit.timeit(lambda: generate_latest(otel_registry), number=scrapes) / scrapes * 1e3,
        "prometheus_client_scrape_ms": timeit.timeit(lambda: generate_latest(prom_registry), number=scrapes) / scrapes * 1e3,
    }
    provider.shutdown()
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=100_000, help="points recorded per instrument (default: 100000)")
    p.add_argument("--scrapes", type=int, default=200, help="pages rendered per registry (default: 200)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)
    f = measure(args.points, args.scrapes)
    record = f["otel_record_us"], f["prometheus_client_record_us"]
    scrape = f["otel_scrape_ms"], f["prometheus_client_scrape_ms"]
    print(f"{'':28}{'OTel SDK':>10}{'prom_client':>13}{'ratio':>8}")
    print(f"{'record a point (us)':28}{record[0]:10.2f}{record[1]:13.2f}{record[0] / record[1]:8.2f}")
    print(f"{'  (prom_client, bound)':28}{'':10}{f['prometheus_client_bound_record_us']:13.2f}")
    print(f"{'render /metrics (ms)':28}{scrape[0]:10.3f}{scrape[1]:13.3f}{scrape[0] / scrape[1]:8.2f}")
    if args.json:
        args.json.write_text(json.dumps(f, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
