"""Checkpoint loading: single and sharded safetensors, and key mismatches listed by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nxcore import Engine, RuntimeConfig, StoppingCriteria, generate
from tests.conftest import Checkpoint, random_prompt

CONFIG = RuntimeConfig(batch_size=1, seq_len=64, buckets=(64,))


def _copy(checkpoint: Checkpoint, dst: Path) -> Path:
    shutil.copytree(checkpoint.path, dst)
    return dst


def test_sharded_checkpoint_loads_and_matches(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    ckpt = checkpoints["llama"]
    ckpt.hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    prompt = random_prompt(10, seed=5)
    [result] = generate(Engine.from_pretrained(tmp_path, CONFIG), [prompt], stopping=StoppingCriteria(max_new_tokens=8, ignore_eos=True))
    assert result.output_ids == ckpt.hf_greedy(prompt, 8)


def test_missing_and_unexpected_tensors_are_listed(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    path = _copy(checkpoints["llama"], tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]; unexpected tensors \['model.layers.0.self_attn.extra.weight'\]"
    ):
        Engine.from_pretrained(path, CONFIG)


def test_tied_checkpoint_without_lm_head_and_untied_without_it(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    tied = load_file(checkpoints["llama-mqa-tied-llama3"].path / "model.safetensors")
    assert "lm_head.weight" not in tied  # the engine takes lm_head from the embedding
    path = _copy(checkpoints["llama"], tmp_path / "untied")
    tensors = load_file(path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \['lm_head.weight'\]"):
        Engine.from_pretrained(path, CONFIG)


def test_directory_without_weights_or_config(tmp_path: Path, checkpoints: dict[str, Checkpoint]) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json does not exist"):
        Engine.from_pretrained(tmp_path, CONFIG)
    shutil.copy(checkpoints["llama"].path / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"expected model\.safetensors or model\.safetensors\.index\.json"):
        Engine.from_pretrained(tmp_path, CONFIG)
