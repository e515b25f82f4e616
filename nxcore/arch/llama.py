"""Llama: the base architecture. Other architectures reuse these functions and change a few facts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from nxcore.arch import Architecture, StateDictConverter, register
from nxcore.model_config import ModelConfig, RopeConfig
from nxcore.modules.rotary import ROPE_TYPES


def read_rope(hf: Any) -> RopeConfig:
    """Rotary settings from HF `rope_parameters` (transformers >= 5) or `rope_theta`/`rope_scaling`."""
    params = getattr(hf, "rope_parameters", None)
    if params is None:
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    params = dict(params)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported: supported types are {list(ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported: only 1.0")
    rope = RopeConfig(theta=float(params.get("rope_theta", 10000.0)), rope_type=rope_type)
    if rope_type == "linear":
        rope = RopeConfig(theta=rope.theta, rope_type=rope_type, factor=float(params["factor"]))
    elif rope_type == "llama3":
        rope = RopeConfig(
            theta=rope.theta,
            rope_type=rope_type,
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    return rope


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def config_fields(hf: Any) -> dict[str, Any]:
    """The ModelConfig fields every Llama-like HF config provides."""
    num_heads = hf.num_attention_heads
    dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None) or "float32"
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    return dict(
        model_type=hf.model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // num_heads,
        rms_norm_eps=hf.rms_norm_eps,
        max_position_embeddings=hf.max_position_embeddings,
        rope=read_rope(hf),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        hidden_act=getattr(hf, "hidden_act", "silu"),
        dtype=dtype,
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_ids=_token_ids(getattr(hf, "eos_token_id", None)),
        pad_token_id=getattr(hf, "pad_token_id", None),
    )


def read_config(hf: Any) -> ModelConfig:
    bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(
        **config_fields(hf),
        attention_bias=bias,
        o_proj_bias=bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
    )


IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class Taker:
    """Hands out checkpoint tensors by name and remembers which were missing or never taken."""

    def __init__(self, hf: Mapping[str, torch.Tensor]) -> None:
        self.hf = hf
        self.taken: set[str] = set()
        self.missing: list[str] = []

    def __call__(self, name: str) -> torch.Tensor | None:
        if name not in self.hf:
            self.missing.append(name)
            return None
        self.taken.add(name)
        return self.hf[name]

    def optional(self, name: str) -> torch.Tensor | None:
        return self(name) if name in self.hf else None

    def check(self, model_type: str) -> None:
        unexpected = sorted(k for k in self.hf if k not in self.taken and not k.endswith(IGNORED_SUFFIXES))
        if self.missing or unexpected:
            raise ValueError(
                f"checkpoint does not match the {model_type} architecture: "
                f"missing tensors {self.missing or 'none'}; unexpected tensors {unexpected or 'none'}"
            )


Tensors = dict[str, torch.Tensor | None]
"""Converted tensors by nxcore name; None where the checkpoint lacked one (Taker.check then fails)."""

MlpConverter = Callable[[Taker, ModelConfig, int], Tensors]
"""(taker, config, layer index) -> nxcore tensors of that layer's MLP, named from `mlp.`."""


def convert_dense_mlp(take: Taker, cfg: ModelConfig, layer: int, *, prefix: str = "mlp.") -> Tensors:
    mlp = f"model.layers.{layer}.{prefix}"
    out: Tensors = {
        "mlp.gate_up_proj.weight": _cat([take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")]),
        "mlp.down_proj.weight": take(mlp + "down_proj.weight"),
    }
    if cfg.mlp_bias:
        out["mlp.gate_up_proj.bias"] = _cat([take(mlp + "gate_proj.bias"), take(mlp + "up_proj.bias")])
        out["mlp.down_proj.bias"] = take(mlp + "down_proj.bias")
    return out


def make_converter(mlp: MlpConverter = convert_dense_mlp) -> StateDictConverter:
    """A Llama-family converter whose MLP tensors come from `mlp` (dense or experts)."""

    def convert(hf: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """HF tensors -> nxcore names: strip `model.`, fuse q/k/v and gate/up, tie lm_head."""
        take = Taker(hf)
        out: Tensors = {
            "embed_tokens.weight": take("model.embed_tokens.weight"),
            "norm.weight": take("model.norm.weight"),
        }
        for i in range(cfg.num_layers):
            src, dst = f"model.layers.{i}.", f"layers.{i}."
            attn = src + "self_attn."
            out[dst + "attn.qkv_proj.weight"] = _cat([take(f"{attn}{p}_proj.weight") for p in "qkv"])
            if cfg.attention_bias:
                out[dst + "attn.qkv_proj.bias"] = _cat([take(f"{attn}{p}_proj.bias") for p in "qkv"])
            out[dst + "attn.o_proj.weight"] = take(attn + "o_proj.weight")
            if cfg.o_proj_bias:
                out[dst + "attn.o_proj.bias"] = take(attn + "o_proj.bias")
            if cfg.qk_norm:
                out[dst + "attn.q_norm.weight"] = take(attn + "q_norm.weight")
                out[dst + "attn.k_norm.weight"] = take(attn + "k_norm.weight")
            out.update({dst + k: v for k, v in mlp(take, cfg, i).items()})
            out[dst + "input_norm.weight"] = take(src + "input_layernorm.weight")
            out[dst + "post_attn_norm.weight"] = take(src + "post_attention_layernorm.weight")
        if cfg.tie_word_embeddings:
            take.optional("lm_head.weight")
            out["lm_head.weight"] = out["embed_tokens.weight"]
        else:
            out["lm_head.weight"] = take("lm_head.weight")
        take.check(cfg.model_type)  # raises unless every tensor was there: no None is left
        return {name: tensor for name, tensor in out.items() if tensor is not None}

    return convert


convert_state_dict = make_converter()


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [p for p in parts if p is not None]
    return torch.cat(present, dim=0) if len(present) == len(parts) else None


LLAMA = register(Architecture(model_type="llama", read_config=read_config, convert_state_dict=convert_state_dict))
