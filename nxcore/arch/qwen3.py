"""Qwen3: Llama with per-head RMSNorm on queries and keys, optional attention bias and sliding layers."""

from __future__ import annotations

from typing import Any

from nxcore.arch import Architecture, register
from nxcore.arch.llama import config_fields, convert_state_dict
from nxcore.arch.qwen2 import layer_windows
from nxcore.model_config import ModelConfig


def read_config(hf: Any) -> ModelConfig:
    bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(
        **config_fields(hf),
        attention_bias=bias,
        o_proj_bias=bias,
        qk_norm=True,
        sliding_windows=layer_windows(hf),
    )


QWEN3 = register(Architecture(model_type="qwen3", read_config=read_config, convert_state_dict=convert_state_dict))
