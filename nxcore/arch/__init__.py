"""Architecture registry: `model_type` -> how its HF config and checkpoint map onto nxcore.

Llama is the base (`nxcore.arch.llama`); every other architecture is a small module that states
only what differs and registers itself here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from nxcore.model_config import ModelConfig

ConfigReader = Callable[[Any], ModelConfig]
StateDictConverter = Callable[[Mapping[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Architecture:
    model_type: str
    read_config: ConfigReader
    """HF PretrainedConfig -> ModelConfig."""
    convert_state_dict: StateDictConverter
    """HF tensors (by HF name) -> nxcore tensors (by nxcore name): the convert_hf_to_neuron_state_dict analog."""


_REGISTRY: dict[str, Architecture] = {}
_BUILTIN_MODULES = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen3_moe")


def register(arch: Architecture) -> Architecture:
    _REGISTRY[arch.model_type] = arch
    return arch


def get_architecture(model_type: str) -> Architecture:
    for name in _BUILTIN_MODULES:
        importlib.import_module(f"nxcore.arch.{name}")
    if model_type not in _REGISTRY:
        raise ValueError(f"model_type={model_type!r} is not supported: supported architectures are {sorted(_REGISTRY)}")
    return _REGISTRY[model_type]


def supported_model_types() -> list[str]:
    get_architecture("llama")
    return sorted(_REGISTRY)
