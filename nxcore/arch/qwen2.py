"""Qwen2: Llama with bias on the q/k/v projections (not on o_proj) and optional sliding-window layers."""

from __future__ import annotations

from typing import Any

from nxcore.arch import Architecture, register
from nxcore.arch.llama import config_fields, convert_state_dict
from nxcore.model_config import ModelConfig


def layer_windows(hf: Any) -> tuple[int | None, ...]:
    """Per-layer window from HF `layer_types` (`sliding_attention` layers use `sliding_window`)."""
    types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
    window = getattr(hf, "sliding_window", None)
    return tuple(window if t == "sliding_attention" else None for t in types)


def read_config(hf: Any) -> ModelConfig:
    return ModelConfig(**config_fields(hf), attention_bias=True, sliding_windows=layer_windows(hf))


QWEN2 = register(Architecture(model_type="qwen2", read_config=read_config, convert_state_dict=convert_state_dict))
