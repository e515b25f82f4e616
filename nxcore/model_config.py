"""Model config: the architecture facts nxcore needs, read once from a checkpoint's HF config.

Every architecture is described by the same flat dataclass; an architecture module only says how
its HF config maps onto it (see `nxcore.arch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from nxcore.config import DTYPES


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_parameters`)."""

    theta: float = 10000.0
    rope_type: str = "default"
    """One of `default`, `linear`, `llama3`."""
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a decoder-only transformer."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """Bias on the q/k/v projections (Qwen2; Llama's `attention_bias`)."""
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    """Per-head RMSNorm on queries and keys before rotary (Qwen3)."""
    sliding_windows: tuple[int | None, ...] = ()
    """Per layer: attention window in tokens, or None for full attention."""
    num_experts: int = 0
    """Experts per MoE layer; 0 for a dense model."""
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    """Renormalize the chosen experts' affinities to sum to 1."""
    moe_layers: tuple[bool, ...] = ()
    """Per layer: True for a mixture-of-experts MLP, False for a dense one."""
    hidden_act: str = "silu"
    dtype: str = "float32"
    """The checkpoint's own dtype (config.json), used when the runtime config does not say."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}")
        if self.hidden_act not in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported: use silu, gelu, gelu_pytorch_tanh or relu")
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)
        if not self.moe_layers:
            object.__setattr__(self, "moe_layers", (self.num_experts > 0,) * self.num_layers)
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} is invalid: allowed 1..{self.num_experts}")
        if len(self.sliding_windows) != self.num_layers:
            raise ValueError(f"{len(self.sliding_windows)} sliding windows given for {self.num_layers} layers")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES.get(self.dtype, torch.float32)

    def fingerprint_fields(self) -> dict[str, Any]:
        """What a KV cache layout depends on."""
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
        }
