"""`nxserve bench serve` end to end against a real local cluster on the tiny model, and the wiring of
`nxserve bench` (harness correctness only, no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nxserve.cli import main
from nxserve.cluster import LocalCluster, _free_ports

pytestmark = pytest.mark.slow

ENGINE_ARGS = ["--seq-len", "128", "--batch-size", "4", "--threads", "1", "--dtype", "float32"]
RUN_KEYS = {
    "load",
    "label",
    "requests",
    "completed",
    "errors",
    "errors_by_code",
    "finish_reasons",
    "duration_s",
    "request_throughput",
    "output_token_throughput",
    "prompt_tokens",
    "output_tokens",
    "ttft_ms",
    "tpot_ms",
    "e2e_ms",
    "per_request",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cluster(tiny: Path):
    with LocalCluster(tiny, decode_replicas=1, engine_args=ENGINE_ARGS) as c:
        yield c
        assert c.exited() == []


def bench_serve(tmp_path: Path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "serve.json"
    code = main(["bench", "serve", *args, "--json", str(out)])
    return code, json.loads(out.read_text())


def check_run(run: dict, requests: int) -> None:
    assert set(run) >= RUN_KEYS
    assert run["requests"] == requests == run["completed"] + run["errors"] == len(run["per_request"])
    assert run["errors"] == sum(run["errors_by_code"].values())
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        stats = run[key]
        assert set(stats) == {"mean", "p50", "p90", "p99"}
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
    assert run["ttft_ms"]["p99"] <= run["e2e_ms"]["p99"]
    assert run["request_throughput"] > 0 and run["output_token_throughput"] > 0


def test_poisson_sweep_from_a_workload_file_with_flag_overrides(cluster: LocalCluster, tmp_path: Path) -> None:
    workload = Path(__file__).parents[2] / "bench" / "workloads" / "serve-poisson.json"
    code, report = bench_serve(
        tmp_path,
        "--target",
        cluster.target,
        "--workload",
        str(workload),
        "--requests",
        "5",
        "--prompt-len",
        "4..40",
        "--output-len",
        "6+-2",
        "--rate",
        "20,40,inf",
        "--stream-interval",
        "3",
        "--plot-dir",
        str(tmp_path / "plots"),
    )
    assert code == 0
    assert set(report) == {"target", "model", "workload", "runs"}
    assert report["model"]["vocab_size"] > 0
    w = report["workload"]
    assert (w["requests"], w["prompt_len"], w["output_len"], w["rate"], w["stream_interval"]) == (5, "4..40", "6+-2", [20.0, 40.0, "inf"], 3)
    assert w["description"].startswith("Poisson")  # from the file
    assert [r["load"] for r in report["runs"]] == [{"rate": 20.0}, {"rate": 40.0}, {"rate": "inf"}]
    for run in report["runs"]:
        check_run(run, 5)
        assert run["errors"] == 0 and run["finish_reasons"] == {"length": 5}
        assert run["output_tokens"] == sum(r["output_tokens"] for r in run["per_request"])
    for name in ("latency_cdf.png", "throughput.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG_MAGIC


def test_fixed_concurrency_with_text_prompts(cluster: LocalCluster, tmp_path: Path, capsys) -> None:
    code, report = bench_serve(
        tmp_path,
        "--target",
        cluster.target,
        "--requests",
        "4",
        "--concurrency",
        "2",
        "--prompt",
        "text",
        "--prompt-len",
        "3..12",
        "--output-len",
        "5",
        "--warmup",
        "0",
        "--plot-dir",
        str(tmp_path / "plots"),
    )
    assert code == 0
    [run] = report["runs"]
    check_run(run, 4)
    assert run["load"] == {"concurrency": 2} and run["output_tokens"] == 20
    assert (tmp_path / "plots" / "latency_cdf.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "plots" / "throughput.png").exists()  # one load: nothing to sweep
    table = capsys.readouterr().out
    assert "concurrency 2" in table and "TTFT (ms)" in table and "4/4" in table


def test_unreachable_target_is_reported_as_errors(tmp_path: Path, capsys) -> None:
    [port] = _free_ports(1)
    code, report = bench_serve(tmp_path, "--target", f"127.0.0.1:{port}", "--requests", "3", "--rate", "100", "--timeout", "5")
    assert code == 2
    assert report["model"] is None
    [run] = report["runs"]
    assert run["requests"] == 3 and run["completed"] == 0 and run["errors"] == 3
    assert run["errors_by_code"] == {"UNAVAILABLE": 3}
    assert run["ttft_ms"]["p50"] is None
    out, err = capsys.readouterr()
    assert "UNAVAILABLE x3" in out and "no request completed" in err


@pytest.mark.parametrize(
    "benchmark, flags",
    [
        ("engine", ("--model", "--backends", "--batches", "--prefill-lens", "--no-hf", "--json")),
        (
            "serve",
            ("--target", "--workload", "--requests", "--prompt-len", "--output-len", "--rate", "--concurrency", "--seed", "--json", "--plot-dir"),
        ),
    ],
)
def test_bench_help(benchmark: str, flags: tuple[str, ...], capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", benchmark, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in flags)
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "engine" in capsys.readouterr().out


def test_bench_engine_command_writes_json(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    assert (
        main(
            [
                "bench",
                "engine",
                "--model",
                str(tiny),
                "--backends",
                "eager",
                "--dtype",
                "float32",
                "--batches",
                "1",
                "--prefill-lens",
                "16",
                "--prompt-len",
                "8",
                "--steps",
                "1",
                "--repeats",
                "1",
                "--no-hf",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["backend"] == "eager" and data["decode_b1_ms"] > 0 and set(data["prefill_ms"]) == {"16"}
