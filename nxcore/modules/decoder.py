"""Decoder layer and the causal LM, mirroring HF's `DecoderLayer` / `Model` / `ForCausalLM`."""

from __future__ import annotations

import torch
from torch import nn

from nxcore import native
from nxcore.errors import EngineError
from nxcore.kv_cache import KVCache
from nxcore.model_config import ModelConfig
from nxcore.modules.attention import Attention, AttentionContext, build_mask
from nxcore.modules.linear import Linear
from nxcore.modules.mlp import GatedMLP
from nxcore.modules.moe import MoE, Router
from nxcore.modules.norm import RMSNorm
from nxcore.modules.rotary import cos_sin_table, inv_frequencies
from nxcore.parallel.comm import TPComm, single_rank
from nxcore.parallel.plan import make_plan


def _comm(cfg: ModelConfig, comm: TPComm | None) -> TPComm:
    return comm if comm is not None else single_rank(make_plan(cfg, 1))


class DecoderLayer(nn.Module):
    """Attention and MLP hold this rank's heads and intermediate units (row-parallel outputs are
    partial sums); the layer all-reduces them before the residual add."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, comm: TPComm | None = None, *, capacity_factor: float | None = None) -> None:
        super().__init__()
        self.comm = _comm(cfg, comm)
        plan = self.comm.plan
        self.input_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.attn = Attention(
            layer_idx=layer_idx,
            hidden_size=cfg.hidden_size,
            num_heads=plan.q_per_rank,
            num_kv_heads=plan.kv_per_rank,
            head_dim=cfg.head_dim,
            qkv_bias=cfg.attention_bias,
            o_bias=cfg.o_proj_bias,
            qk_norm_eps=cfg.rms_norm_eps if cfg.qk_norm else None,
            sliding_window=cfg.sliding_windows[layer_idx],
        )
        self.post_attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        if cfg.moe_layers[layer_idx]:
            self.mlp: nn.Module = MoE(
                hidden_size=cfg.hidden_size,
                intermediate_size=plan.moe_intermediate_per_rank,
                num_experts=cfg.num_experts,
                top_k=cfg.num_experts_per_tok,
                normalize=cfg.norm_topk_prob,
                act=cfg.hidden_act,
                local_experts=plan.experts_of(self.comm.rank),
                capacity_factor=capacity_factor,
            )
        else:
            self.mlp = GatedMLP(
                hidden_size=cfg.hidden_size,
                intermediate_size=plan.intermediate_per_rank,
                bias=cfg.mlp_bias,
                act=cfg.hidden_act,
            )

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: KVCache, keep: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, hidden] -> [B, T, hidden], or [B, 1, hidden] with `keep` (see `CausalLM.hidden_states`)."""
        attn = self.comm.all_reduce(self.attn(self.input_norm(x), ctx, cache, keep))
        if keep is not None:
            x = x.gather(1, keep[:, None, None].expand(-1, 1, x.shape[-1]))
        x, h = self.post_attn_norm.add_forward(x, attn)
        return x + self.comm.all_reduce(self.mlp(h))


class CausalLM(nn.Module):
    """Embedding, decoder layers, final norm, LM head, rotary tables and the KV cache.

    Under TP the embedding and LM head hold this rank's vocabulary rows (vocab-parallel): the
    embedding all-reduces masked lookups, and `logits` returns this rank's vocabulary slice.
    """

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    """The rotary tables [seq_len, head_dim] (buffers)."""

    def __init__(
        self, cfg: ModelConfig, *, slots: int, seq_len: int, dtype: torch.dtype, comm: TPComm | None = None, capacity_factor: float | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.comm = _comm(cfg, comm)
        plan = self.comm.plan
        self.embed_tokens = nn.Embedding(plan.vocab_per_rank, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, self.comm, capacity_factor=capacity_factor) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, plan.vocab_per_rank, bias=False)
        self.tie_weights()
        self.register_buffer("rope_cos", torch.empty(seq_len, cfg.head_dim, dtype=dtype), persistent=False)
        self.register_buffer("rope_sin", torch.empty(seq_len, cfg.head_dim, dtype=dtype), persistent=False)
        self.kv_cache = KVCache(
            num_layers=cfg.num_layers,
            slots=slots,
            kv_heads=plan.kv_per_rank,
            seq_len=seq_len,
            head_dim=cfg.head_dim,
            dtype=dtype,
        )
        self.windows = sorted(set(cfg.sliding_windows), key=lambda w: -1 if w is None else w)
        self.init_buffers()

    invariant: bool = False
    """Batch-invariant mode: see `set_batch_invariant`."""

    def set_batch_invariant(self) -> None:
        """Compute every row as if it were alone (`RuntimeConfig.batch_invariant`): the linears, the
        MoE experts and router through `nxcore::linear_invariant`, context encoding's attention
        through the decode kernel. Norms, rotary, activations and sampling are row-local already
        (tests/nxcore/test_batch_invariance.py checks the whole model, both backends)."""
        if not native.available():
            raise EngineError(
                f"batch-invariant mode needs nxcore's C++ ops, which are not in use here ({native.load()}): "
                "install a C++ compiler (g++) and ninja, or run without --batch-invariant"
            )
        self.invariant = True
        for module in self.modules():
            if isinstance(module, Linear | Attention | MoE | Router):
                module.invariant = True

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

    def context(
        self, *, prefill: bool, slot_ids: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor | None = None
    ) -> AttentionContext:
        """Rotary tables and masks for one call, computed once for all layers.

        Decode attends over cache positions `key_positions` [L] (default: the whole cache)."""
        if prefill:
            key_positions = positions
        else:
            if key_positions is None:
                key_positions = torch.arange(self.kv_cache.seq_len, device=positions.device)
            key_positions = key_positions[None, :]

        # Prefill attention without a window is plain causal (see Attention.forward): no mask for it,
        # except in batch-invariant mode, where it runs the decode kernel, which reads one.
        masks = {
            w: build_mask(q_pos=positions, k_pos=key_positions, window=w) for w in self.windows if not (prefill and w is None and not self.invariant)
        }
        return AttentionContext(
            prefill=prefill,
            slot_ids=slot_ids,
            positions=positions,
            cos=self.rope_cos[positions],
            sin=self.rope_sin[positions],
            masks=masks,
            kv_len=key_positions.shape[-1],
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.comm.world == 1:
            return self.embed_tokens(input_ids)
        local = input_ids - self.comm.vocab_offset
        inside = (local >= 0) & (local < self.comm.plan.vocab_per_rank)
        x = self.embed_tokens(torch.where(inside, local, torch.zeros_like(local)))
        return self.comm.all_reduce(x * inside.unsqueeze(-1).to(x.dtype))

    def hidden_states(self, input_ids: torch.Tensor, ctx: AttentionContext, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The final norm's output [B, T, hidden]; with `keep` ([B] indices, prefill), only that
        position of each row: [B, 1, hidden].

        A context encoding needs every layer's keys and values but the last layer's output at one
        position per row (the one whose logits give the first token), so the last layer computes
        its keys and values for all positions and its attention, output projection and MLP for
        that position alone: about 90% of the last layer's work skipped, e.g. 11% of the linears'
        FLOPs in 8 layers (llama.cpp skips the last layer's MLP the same way)."""
        x = self.embed(input_ids)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, self.kv_cache, keep if i == last else None)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of this rank's vocabulary slice; padded vocab entries are -inf."""
        logits = self.lm_head(hidden).to(torch.float32)
        real = self.comm.plan.vocab_size - self.comm.vocab_offset
        if real < logits.shape[-1]:
            index = torch.arange(logits.shape[-1], device=logits.device)
            logits = logits.masked_fill(index >= real, float("-inf"))
        return logits
