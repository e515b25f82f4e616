"""The benchmark scripts run end to end on the tiny model (harness correctness only, no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nxserve.testing.model_factory import make_model

pytestmark = pytest.mark.slow


def test_engine_bench_writes_the_documented_keys(tiny: Path, tmp_path: Path) -> None:
    from bench import engine

    out = tmp_path / "engine.json"
    assert (
        engine.main(
            [
                "--model",
                str(tiny),
                "--backends",
                "eager",
                "--dtype",
                "float32",
                "--batches",
                "1",
                "4",
                "--prefill-lens",
                "32",
                "128",
                "--steps",
                "2",
                "--repeats",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    for key in (
        "decode_b1_ms",
        "roofline_b1_ms",
        "hf_decode_b1_ms",
        "throughput_b4_tok_s",
        "hf_throughput_b4_tok_s",
        "prefill_ms",
        "hf_prefill_ms",
        "model",
        "dtype",
        "backend",
        "prefill_gflop_s",
        "matmul_peak_gflop_s",
    ):
        assert key in data
    assert data["decode_b1_ms"] > 0 and set(data["prefill_ms"]) == {"32", "128"}
    assert set(data["prefill_gflop_s"]) == {"32", "128"} and data["matmul_peak_gflop_s"]["F.linear"] > 0


def test_speculation_and_moe_and_tp_benches_run(tiny: Path, tmp_path: Path) -> None:
    from bench import speculation, tp

    assert speculation.main(["--model", str(tiny), "--k", "2", "--new-tokens", "8", "--json", str(tmp_path / "s.json")]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert all(r["greedy_equal"] for r in rows)
    assert tp.main(["--model", str(tiny), "--steps", "2", "--tp", "1", "--json", str(tmp_path / "t.json")]) == 0
    moe_model = make_model(arch="mixtral", preset="tiny", out=tmp_path / "mixtral")
    from bench import moe

    assert moe.main(["--model", str(moe_model), "--batches", "1", "2", "--steps", "2", "--json", str(tmp_path / "m.json")]) == 0
    assert set(json.loads((tmp_path / "m.json").read_text())["rows"]) == {"1", "2"}


def test_metrics_bench_runs(tmp_path: Path) -> None:
    from bench import metrics

    assert metrics.main(["--points", "200", "--scrapes", "2", "--json", str(tmp_path / "m.json")]) == 0
    figures = json.loads((tmp_path / "m.json").read_text())
    assert all(figures[k] > 0 for k in ("otel_record_us", "prometheus_client_record_us", "otel_scrape_ms", "prometheus_client_scrape_ms"))


def test_services_bench_runs(tiny: Path, tmp_path: Path) -> None:
    from bench import services

    shm = tmp_path / "shm"
    shm.mkdir()
    assert (
        services.main(
            [
                "--model",
                str(tiny),
                "--prompt-len",
                "16",
                "--new-tokens",
                "4",
                "--requests",
                "1",
                "--seq-len",
                "128",
                "--kv-tokens",
                "16,100",
                "--kv-shm-dir",
                str(shm),
                "--telemetry",
                "--json",
                str(tmp_path / "svc.json"),
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "svc.json").read_text())
    assert data["kv"]["kv_bytes"] > 0 and data["services"]["ttft_ms"] > 0 and data["kv_floor"]["round_trip_ms"] > 0
    for transport in ("kv_chunks", "kv_shared_memory"):
        assert [row["tokens"] for row in data[transport]] == [16, 100]
        assert data[transport][1]["kv_bytes"] > data[transport][0]["kv_bytes"] > 0
    assert list(shm.iterdir()) == []
    telemetry = data["telemetry"]
    assert all(telemetry[m]["ttft_ms"] > 0 and telemetry[m]["decode_tok_s"] > 0 for m in ("off", "control", "on"))
    assert telemetry["requests"] == 3 and telemetry["client_span_us"] > 0


@pytest.mark.parametrize("tied", [False, True])
def test_roofline_counts_the_bytes_a_decode_step_reads(tmp_path: Path, tied: bool) -> None:
    """An untied input embedding is read one row per token, so it is left out; tied weights count
    once. The benchmark counts on a meta-device model built from the config: same figure."""
    from transformers import AutoModelForCausalLM

    from bench.engine import bytes_read_per_token

    model_dir = make_model(arch="llama", preset="tiny", out=tmp_path / "m", overrides={"tie_word_embeddings": tied})
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    embedding = model.get_input_embeddings().weight
    everything = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() yields tied ones once
    expected = everything if tied else everything - embedding.numel() * embedding.element_size()
    assert bytes_read_per_token(model) == expected
    with torch.device("meta"):
        shapes_only = AutoModelForCausalLM.from_config(model.config)
    assert bytes_read_per_token(shapes_only) == expected


def test_roofline_counts_only_the_routed_experts_of_a_mixture_of_experts(tmp_path: Path) -> None:
    """At batch 1 a token reads num_experts_per_tok of the experts' weights, and everything else."""
    from transformers import AutoModelForCausalLM

    from bench.engine import bytes_read_per_token

    model = AutoModelForCausalLM.from_pretrained(make_model(arch="mixtral", preset="tiny", out=tmp_path / "m"))
    cfg = model.config
    embedding = model.get_input_embeddings().weight
    expert_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if ".experts." in name)
    rest = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if ".experts." not in name and p is not embedding)
    assert expert_bytes > 0 and cfg.num_experts_per_tok < cfg.num_local_experts
    assert bytes_read_per_token(model) == round(rest + expert_bytes * cfg.num_experts_per_tok / cfg.num_local_experts)


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_prefill_flops_count_every_linear_the_tokens_pass_and_causal_attention(tmp_path: Path, arch: str) -> None:
    """Against the checkpoint's own modules: 2 x in x out per token for each decoder linear (a
    mixture's routed experts only, plus its router), the LM head once, and causal attention's two
    products over the pairs at or below the diagonal."""
    from transformers import AutoModelForCausalLM

    from bench.engine import prefill_flops
    from nxcore.arch import get_architecture

    path = make_model(arch=arch, preset="tiny", out=tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(path)
    cfg = model.config
    length = 40
    per_token = 0
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            share = cfg.num_experts_per_tok / cfg.num_local_experts if ".experts." in f".{name}." else 1
            per_token += 2 * module.in_features * module.out_features * share
    router = getattr(model.model.layers[0].mlp, "gate", None)
    if router is not None and not isinstance(router, torch.nn.Linear):  # transformers' router module: hidden x experts
        per_token += cfg.num_hidden_layers * 2 * cfg.hidden_size * cfg.num_local_experts
    experts = getattr(model.model.layers[0].mlp, "experts", None)
    if experts is not None and not isinstance(experts, torch.nn.ModuleList):  # fused expert tensors
        per_token += cfg.num_hidden_layers * 2 * sum(p[0].numel() for n, p in experts.named_parameters() if "bias" not in n) * cfg.num_experts_per_tok
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = cfg.num_hidden_layers * 4 * cfg.num_attention_heads * head_dim * length * (length + 1) // 2
    expected = per_token * length + attention + 2 * cfg.hidden_size * cfg.vocab_size
    ours = get_architecture(cfg.model_type).read_config(cfg)
    assert prefill_flops(ours, length) == pytest.approx(expected, rel=1e-9)


def test_prefill_plan_bench_runs(tiny: Path, tmp_path: Path) -> None:
    from bench import prefill_plan

    workload = tmp_path / "w.json"
    workload.write_text(json.dumps({"requests": 12, "prompt_len": "8..200", "output_len": 1, "prompt": "ids"}))
    out = tmp_path / "p.json"
    args = ["--model", str(tiny), "--dtype", "float32", "--batch", "8", "--rounds", "1", "--workload", str(workload), "--json", str(out)]
    assert prefill_plan.main(args) == 0
    cases = json.loads(out.read_text())["cases"]
    assert [c["case"] for c in cases][:3] == ["8 x 128", "7 x 128 + 1 x 130", "3 x 128"]
    by_name = {c["case"]: c for c in cases}
    assert by_name["7 x 128 + 1 x 130"]["padding"]["plan"] < by_name["7 x 128 + 1 x 130"]["padding"]["one"]
    assert all(c["ms"]["one"] > 0 and c["ms"]["plan"] > 0 for c in cases)
