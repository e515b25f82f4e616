"""Qwen3-MoE: Qwen3 attention (q/k norm); sparse MoE MLPs except on `mlp_only_layers` and layers
off the `decoder_sparse_step`; affinities renormalized when `norm_topk_prob`."""

from __future__ import annotations

import dataclasses
from typing import Any

from nxcore.arch import Architecture, register
from nxcore.arch.llama import Taker, convert_dense_mlp, make_converter
from nxcore.arch.moe_common import stack_experts
from nxcore.arch.qwen3 import read_config as read_qwen3_config
from nxcore.model_config import ModelConfig


def sparse_layers(hf: Any) -> tuple[bool, ...]:
    only_dense = set(getattr(hf, "mlp_only_layers", None) or ())
    step = getattr(hf, "decoder_sparse_step", 1) or 1
    return tuple(i not in only_dense and hf.num_experts > 0 and (i + 1) % step == 0 for i in range(hf.num_hidden_layers))


def read_config(hf: Any) -> ModelConfig:
    return dataclasses.replace(
        read_qwen3_config(hf),
        num_experts=hf.num_experts,
        num_experts_per_tok=hf.num_experts_per_tok,
        moe_intermediate_size=hf.moe_intermediate_size,
        norm_topk_prob=bool(hf.norm_topk_prob),
        moe_layers=sparse_layers(hf),
    )


def convert_mlp(take: Taker, cfg: ModelConfig, layer: int) -> dict:
    if not cfg.moe_layers[layer]:
        return convert_dense_mlp(take, cfg, layer)
    mlp = f"model.layers.{layer}.mlp."
    return stack_experts(
        take, cfg, router=mlp + "gate.weight", experts=mlp + "experts.", names=("gate_proj.weight", "up_proj.weight", "down_proj.weight")
    )


QWEN3_MOE = register(Architecture(model_type="qwen3_moe", read_config=read_config, convert_state_dict=make_converter(convert_mlp)))
