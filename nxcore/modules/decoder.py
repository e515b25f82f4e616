"""Decoder layer and the causal LM, mirroring HF's `DecoderLayer` / `Model` / `ForCausalLM`."""

from __future__ import annotations

import torch
from torch import nn

from nxcore.kv_cache import KVCache
from nxcore.model_config import ModelConfig
from nxcore.modules.attention import Attention, AttentionContext, build_mask
from nxcore.modules.mlp import GatedMLP
from nxcore.modules.norm import RMSNorm
from nxcore.modules.rotary import cos_sin_table, inv_frequencies


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.attn = Attention(
            layer_idx=layer_idx,
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            qkv_bias=cfg.attention_bias,
            o_bias=cfg.o_proj_bias,
            qk_norm_eps=cfg.rms_norm_eps if cfg.qk_norm else None,
            sliding_window=cfg.sliding_windows[layer_idx],
        )
        self.post_attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = GatedMLP(
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            bias=cfg.mlp_bias,
            act=cfg.hidden_act,
        )

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: KVCache) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), ctx, cache)
        return x + self.mlp(self.post_attn_norm(x))


class CausalLM(nn.Module):
    """Embedding, decoder layers, final norm, LM head, rotary tables and the KV cache."""

    def __init__(self, cfg: ModelConfig, *, slots: int, seq_len: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("rope_cos", torch.empty(seq_len, cfg.head_dim, dtype=dtype), persistent=False)
        self.register_buffer("rope_sin", torch.empty(seq_len, cfg.head_dim, dtype=dtype), persistent=False)
        self.kv_cache = KVCache(
            num_layers=cfg.num_layers,
            slots=slots,
            kv_heads=cfg.num_kv_heads,
            seq_len=seq_len,
            head_dim=cfg.head_dim,
            dtype=dtype,
        )
        self.windows = sorted(set(cfg.sliding_windows), key=lambda w: -1 if w is None else w)
        self.init_buffers()

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_buffers(self) -> None:
        """(Re)compute the rotary tables and zero the KV cache: needed after `to_empty`."""
        if self.rope_cos.is_meta:
            return
        cos, sin = cos_sin_table(inv_frequencies(self.cfg.rope, self.cfg.head_dim), self.rope_cos.shape[0])
        with torch.no_grad():
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
            for buf in self.kv_cache.buffers():
                buf.zero_()

    def context(self, *, prefill: bool, slot_ids: torch.Tensor, positions: torch.Tensor) -> AttentionContext:
        """Rotary tables and masks for one call, computed once for all layers."""
        if prefill:
            key_positions = positions
        else:
            key_positions = torch.arange(self.kv_cache.seq_len, device=positions.device)[None, :]

        masks = {w: build_mask(q_pos=positions, k_pos=key_positions, window=w) for w in self.windows}
        return AttentionContext(
            prefill=prefill,
            slot_ids=slot_ids,
            positions=positions,
            cos=self.rope_cos[positions],
            sin=self.rope_sin[positions],
            masks=masks,
        )

    def hidden_states(self, input_ids: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, ctx, self.kv_cache)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).to(torch.float32)
