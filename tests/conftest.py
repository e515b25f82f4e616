"""Shared fixtures: tiny Hugging Face checkpoints written with `save_pretrained`, once per session."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

from nxcore import native

native.configure_from(os.environ)  # NXSERVE_NATIVE=0 make test runs the suite on the Python ops

TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.08,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# Checkpoints nxserve did not write itself: plain save_pretrained of each config class, with the
# options the engine must honour (tied embeddings, MQA, explicit head_dim, rope scaling, windows).
VARIANTS: dict[str, tuple[type, dict[str, Any]]] = {
    "llama": (LlamaConfig, {}),
    "llama-mqa-tied-llama3": (
        LlamaConfig,
        dict(
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "llama-headdim-linear": (
        LlamaConfig,
        dict(head_dim=32, num_key_value_heads=4, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    ),
    "qwen2": (Qwen2Config, dict(use_sliding_window=True, sliding_window=12, max_window_layers=1)),
    "qwen3": (Qwen3Config, dict(head_dim=32)),
    "mistral": (MistralConfig, dict(sliding_window=12)),
}

# Mixtures of experts (written on demand: tests/nxcore/test_moe.py, test_compiled.py).
MOE_VARIANTS: dict[str, tuple[type, dict[str, Any]]] = {
    "mixtral": (MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=96, sliding_window=None)),
    "qwen3_moe": (
        Qwen3MoeConfig,
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            head_dim=32,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        ),
    ),
}


@dataclass
class Checkpoint:
    name: str
    path: Path
    hf_model: Any

    def hf_greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """transformers generate(), greedy, eos ignored: the new tokens only."""
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = self.hf_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        return out[0, len(prompt) :].tolist()

    def hf_logits(self, prompt: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.hf_model(torch.tensor([prompt])).logits[0]


def write_checkpoint(path: Path, config_cls: type, overrides: dict[str, Any], *, seed: int = 0) -> Checkpoint:
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **overrides})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model.save_pretrained(path)
    return Checkpoint(name=path.name, path=path, hf_model=model)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoint]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: write_checkpoint(root / name, cls, overrides) for name, (cls, overrides) in VARIANTS.items()}


@pytest.fixture(params=sorted(VARIANTS))
def checkpoint(request: pytest.FixtureRequest, checkpoints: dict[str, Checkpoint]) -> Checkpoint:
    return checkpoints[request.param]


def random_prompt(length: int, *, seed: int, vocab: int = TINY["vocab_size"]) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=gen).tolist()


from tests.services import client, cluster, shm_dir, svc_engine, svc_model  # noqa: E402, F401 (fixtures of the service tests)
