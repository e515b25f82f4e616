"""Mixtral: Mistral attention with a sparse MoE MLP on every layer (w1 = gate, w3 = up, w2 = down);
the chosen experts' affinities are always renormalized."""

from __future__ import annotations

from typing import Any

from nxcore.arch import Architecture, register
from nxcore.arch.llama import Taker, config_fields, make_converter
from nxcore.arch.moe_common import stack_experts
from nxcore.model_config import ModelConfig


def read_config(hf: Any) -> ModelConfig:
    return ModelConfig(
        **config_fields(hf),
        sliding_windows=(getattr(hf, "sliding_window", None),) * hf.num_hidden_layers,
        num_experts=hf.num_local_experts,
        num_experts_per_tok=hf.num_experts_per_tok,
        moe_intermediate_size=hf.intermediate_size,
        norm_topk_prob=True,
    )


def convert_mlp(take: Taker, cfg: ModelConfig, layer: int) -> dict:
    moe = f"model.layers.{layer}.block_sparse_moe."
    return stack_experts(take, cfg, router=moe + "gate.weight", experts=moe + "experts.", names=("w1.weight", "w3.weight", "w2.weight"))


MIXTRAL = register(Architecture(model_type="mixtral", read_config=read_config, convert_state_dict=make_converter(convert_mlp)))
