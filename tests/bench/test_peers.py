"""bench.peers: the shared measurement method, the workload checks, and a run without vLLM on the tiny model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench.peers import vllm_cpu
from bench.peers.method import measure


def test_measure_subtracts_the_first_token_and_checks_counts() -> None:
    calls = []

    def run(prompts: list[list[int]], n: int) -> tuple[float, int]:
        calls.append((len(prompts), n))
        return 0.010 + 0.002 * (n - 1) * len(prompts), len(prompts) * n  # 10 ms prefill, 2 ms per token per row

    figures = measure(run, [[5, 6]] * 4, 8, repeats=2)
    assert calls[0] == (4, 2)  # the warm-up
    assert figures.ttft_b1_ms == pytest.approx(10.0)
    assert figures.decode_b1_ms == pytest.approx(2.0)
    assert figures.batch_tok_s == pytest.approx(32 / (0.010 + 0.002 * 7 * 4))
    with pytest.raises(RuntimeError, match="produced 3 tokens"):
        measure(lambda prompts, n: (1.0, 3), [[5]], 2, repeats=1)


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    vllm_cpu.add_arguments(p)
    return p.parse_args(list(argv))


def test_workload_file_with_flags_on_top(tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"requests": 32, "prompt_len": 128, "output_len": 64, "temperature": 0.0, "ignore_eos": True}))
    w = vllm_cpu.load_workload(_args("--workload", str(path), "--requests", "4"))
    assert (w.requests, str(w.prompt_len), str(w.output_len)) == (4, "128", "64")
    path.write_text(json.dumps({"requests": 8, "prompt_len": "32..512"}))
    with pytest.raises(vllm_cpu.UsageError, match="fixed prompt_len"):
        vllm_cpu.load_workload(_args("--workload", str(path)))
    path.write_text(json.dumps({"requests": 8, "no_such_key": 1}))
    with pytest.raises(vllm_cpu.UsageError, match="unknown workload keys"):
        vllm_cpu.load_workload(_args("--workload", str(path)))


def test_missing_vllm_venv_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 512}))
    assert (
        vllm_cpu.main(
            [
                "--model",
                str(model),
                "--venv",
                str(tmp_path / "none"),
                "--engines",
                "vllm",
                "--requests",
                "2",
                "--prompt-len",
                "8",
                "--new-tokens",
                "2",
            ]
        )
        == 2
    )
    assert "--setup" in capsys.readouterr().err


@pytest.mark.slow
def test_runs_nxserve_and_transformers_on_the_tiny_model(tmp_path: Path) -> None:
    from nxserve.testing.model_factory import make_model

    tiny = make_model(arch="llama", preset="tiny", out=tmp_path / "tiny")
    out = tmp_path / "peers.json"
    assert (
        vllm_cpu.main(
            [
                "--model",
                str(tiny),
                "--engines",
                "nxserve",
                "transformers",
                "--dtype",
                "float32",
                "--requests",
                "4",
                "--prompt-len",
                "16",
                "--new-tokens",
                "4",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    engines = json.loads(out.read_text())["engines"]
    assert set(engines) == {"nxserve eager", "transformers"}
    assert all(engines[e]["batch_tok_s"] > 0 and engines[e]["decode_b1_ms"] > 0 for e in engines)
