"""Mistral: Llama with a sliding attention window on every layer (when `sliding_window` is set)."""

from __future__ import annotations

from typing import Any

from nxcore.arch import Architecture, register
from nxcore.arch.llama import config_fields, convert_state_dict
from nxcore.model_config import ModelConfig


def read_config(hf: Any) -> ModelConfig:
    window = getattr(hf, "sliding_window", None)
    return ModelConfig(**config_fields(hf), sliding_windows=(window,) * hf.num_hidden_layers)


MISTRAL = register(Architecture(model_type="mistral", read_config=read_config, convert_state_dict=convert_state_dict))
