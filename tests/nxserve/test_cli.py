"""The `nxserve` command line: make-model, and generate --json against transformers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nxserve.cli import main
from tests.conftest import Checkpoint, random_prompt


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", ["llama", "llama-mqa-tied-llama3", "llama-headdim-linear", "qwen2", "qwen3", "mistral"])
def test_generate_json_equals_transformers_greedy(checkpoints: dict[str, Checkpoint], name: str, capsys) -> None:
    ckpt = checkpoints[name]
    prompts = [random_prompt(n, seed=n) for n in (4, 19)]
    args = ["generate", "--model", str(ckpt.path), "--max-new-tokens", "10", "--ignore-eos", "--json"]
    for p in prompts:
        args += ["--prompt-ids", ",".join(map(str, p))]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["prompt_ids"] for line in lines] == prompts
    for line, prompt in zip(lines, prompts):
        assert line["output_ids"] == ckpt.hf_greedy(prompt, 10)
        assert line["finish_reason"] == "length"
        assert line["text"] == ""  # this checkpoint has no tokenizer files


def test_make_model_then_generate_text(tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "tiny"
    code, _, err = run_cli(capsys, "make-model", "--arch", "llama", "--preset", "tiny", "--out", str(out_dir))
    assert code == 0 and "wrote tiny llama checkpoint" in err
    code, out, _ = run_cli(capsys, "generate", "--model", str(out_dir), "--prompt", "Hello world", "--max-new-tokens", "8", "--ignore-eos", "--json")
    assert code == 0
    [line] = [json.loads(s) for s in out.splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert line["prompt_ids"] == tokenizer("Hello world")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    ids = torch.tensor([line["prompt_ids"]])
    ref = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id
    )
    assert line["output_ids"] == ref[0, ids.shape[1] :].tolist()
    assert line["text"] == tokenizer.decode(line["output_ids"], skip_special_tokens=True)


def test_sampled_generation_is_reproducible_by_seed(checkpoints: dict[str, Checkpoint], capsys) -> None:
    args = [
        "generate",
        "--model",
        str(checkpoints["qwen3"].path),
        "--prompt-ids",
        "5,6,7",
        "--temperature",
        "0.9",
        "--top-p",
        "0.9",
        "--seed",
        "3",
        "--max-new-tokens",
        "12",
        "--ignore-eos",
        "--json",
    ]
    first = run_cli(capsys, *args)[1]
    assert run_cli(capsys, *args)[1] == first


def test_errors_are_reported_not_raised(checkpoints: dict[str, Checkpoint], tmp_path: Path, capsys) -> None:
    path = str(checkpoints["llama"].path)
    code, _, err = run_cli(capsys, "generate", "--model", path, "--prompt-ids", ",".join(["5"] * 40), "--seq-len", "32")
    assert code == 2 and "largest context bucket (32)" in err
    code, _, err = run_cli(capsys, "generate", "--model", path, "--prompt", "text needs a tokenizer")
    assert code == 2 and "no tokenizer files" in err
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path), "--prompt-ids", "1")
    assert code == 2 and "config.json does not exist" in err


def test_help_lists_every_command_and_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "nxserve.cli", "generate", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in (
        "--prompt-ids",
        "--max-new-tokens",
        "--temperature",
        "--top-k",
        "--top-p",
        "--seed",
        "--ignore-eos",
        "--dtype",
        "--batch-size",
        "--seq-len",
        "--backend",
        "--json",
    ):
        assert flag in out
    out = subprocess.run([sys.executable, "-m", "nxserve.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "make-model" in out and "generate" in out


@pytest.mark.parametrize(("service", "flags"), [("prefill", ("--decode", "--kv-shm-dir", "--grace")), ("decode", ("--kv-shm-dir", "--grace"))])
def test_service_subcommands_are_the_services(service: str, flags: tuple[str, ...]) -> None:
    """`nxserve prefill|decode` (the container image's entry point) run `python -m {service}_svc`, flags and all."""
    out = subprocess.run([sys.executable, "-m", "nxserve.cli", service, "--help"], capture_output=True, text=True, check=True).stdout
    direct = subprocess.run([sys.executable, "-m", f"{service}_svc", "--help"], capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"usage: nxserve {service} ")
    assert re.findall(r"--[\w-]+", out) == re.findall(r"--[\w-]+", direct)  # the same parser, the same flags
    for flag in (*flags, "--model", "--port", "--metrics-port", "--health-port", "--dtype", "--tls-cert"):
        assert flag in out, flag
    out = subprocess.run([sys.executable, "-m", "nxserve.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "prefill" in out and "decode" in out
