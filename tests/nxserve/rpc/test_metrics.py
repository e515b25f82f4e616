"""The metrics' names as Prometheus sees them, the README's table of them, and the Grafana
dashboard's queries agree; every PromQL expression of the dashboard parses (with promtool, where
Prometheus is installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Counter, Histogram
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nxserve.rpc.metrics import DURATION_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS, DecodeMetrics, PrefillMetrics

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "deploy" / "grafana" / "nxserve.json"


def _exposition() -> dict[str, tuple[str, set[str]]]:
    """Every instrument of both services with one point each, rendered as a /metrics page:
    family name -> (type, sample names)."""
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry, disable_target_info=True)])
    instruments = [PrefillMetrics(provider.get_meter("prefill")), DecodeMetrics(provider.get_meter("decode"))]
    for group in instruments:
        for instrument in vars(group).values():
            if isinstance(instrument, Histogram):
                instrument.record(0.5)
            elif isinstance(instrument, Counter):
                instrument.add(1)
    instruments[0].observe(queue_depth=lambda: 0, replicas_routable=lambda: 1)
    instruments[1].observe(lambda: (1, 2, 0))
    text = generate_latest(registry).decode()
    provider.shutdown()
    return {f.name: (f.type, {s.name for s in f.samples}) for f in text_string_to_metric_families(text)}


def _readme_rows() -> list[list[str]]:
    """The cells of README's metrics table (OpenTelemetry name, Prometheus name, type, service, attributes, question)."""
    lines = re.findall(r"^\| (?:gen_ai|nxserve)\.[\w.]+ \|.*$", (ROOT / "README.md").read_text(), flags=re.M)
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def _readme_table() -> dict[str, str]:
    """OpenTelemetry name -> Prometheus name, from README's metrics table."""
    return {row[0]: row[1] for row in _readme_rows()}


def test_readme_table_lists_every_metric_by_its_prometheus_name() -> None:
    exposed = _exposition()
    table = _readme_table()
    samples = {name for _, names in exposed.values() for name in names}
    for otel, prom in table.items():
        assert prom in samples or f"{prom}_count" in samples, f"README lists {otel} as {prom}, which /metrics does not show"
        assert prom.startswith(otel.replace(".", "_")), f"{prom} is not {otel}'s translation"
    documented = {prom.removesuffix("_total") for prom in table.values()}
    assert set(exposed) == documented, f"metrics missing from README's table: {sorted(set(exposed) - documented)}"


def test_genai_histograms_use_the_conventions_buckets() -> None:
    assert DURATION_BUCKETS[0] == 0.01 and DURATION_BUCKETS[-1] == 81.92 and len(DURATION_BUCKETS) == 14
    assert TTFT_BUCKETS[0] == 0.001 and TTFT_BUCKETS[-1] == 10.0
    assert TPOT_BUCKETS[0] == 0.01 and TPOT_BUCKETS[-1] == 2.5


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "model"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    samples = {name for _, names in _exposition().values() for name in names}
    attributes = {a.strip().split(" ")[0].replace(".", "_") for row in _readme_rows() for a in row[4].split(",") if a.strip()}
    for expr in _dashboard_exprs():
        grouping = {label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")}
        matchers = set(re.findall(r"(\w+)\s*(?:=~|!=|=)", expr))
        assert grouping | matchers <= attributes | {"le", "job", "instance", "otel_scope_name"}, (expr, sorted(grouping | matchers - attributes))
        bare = re.sub(r"by \([^)]*\)|\{[^}]*\}", "", expr)
        used = set(re.findall(r"\b((?:gen_ai|nxserve)_[a-z_]+)", bare))
        assert used and used <= samples, f"{expr} queries metrics nobody exports: {sorted(used - samples)}"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("time to first token", "time per output token", "tokens per second", "queue", "slots", "kv hand-off", "errors"):
        assert topic in titles, topic


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (apt-get install prometheus)")
def test_dashboard_promql_parses(tmp_path: Path) -> None:
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr{i}", "expr": e.replace("$__rate_interval", "5m").replace("$model", ".*")}
                    for i, e in enumerate(_dashboard_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "rules.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(rules))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
