"""Per-module parity with the transformers modules of the same config (fp32, tiny shapes).

Each nxcore module (RMSNorm, rotary tables, attention in its prefill and decode paths, gated MLP,
decoder layer) is compared against the Hugging Face module built from the same HF config, with the
HF weights copied in the way the checkpoint converter fuses them (q,k,v -> qkv_proj; gate,up ->
gate_up_proj). The nxcore config is read from the HF config by `nxcore.arch.*.read_config`, so the
config readers are covered too.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, Qwen2Config, Qwen3Config
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3DecoderLayer

from nxcore.arch import llama as llama_arch
from nxcore.arch import qwen2 as qwen2_arch
from nxcore.arch import qwen3 as qwen3_arch
from nxcore.kv_cache import KVCache
from nxcore.model_config import ModelConfig, RopeConfig
from nxcore.modules.attention import Attention, AttentionContext, build_mask
from nxcore.modules.decoder import DecoderLayer
from nxcore.modules.mlp import GatedMLP
from nxcore.modules.norm import RMSNorm
from nxcore.modules.rotary import apply_rotary, cos_sin_table, inv_frequencies

ATOL = 1e-5
RTOL = 1e-5

BASE = dict(
    vocab_size=32,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)

LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)


def close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float = ATOL, rtol: float = RTOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def llama_config(**overrides: Any) -> LlamaConfig:
    config = LlamaConfig(**{**BASE, **overrides})
    config._attn_implementation = "eager"
    return config


@torch.no_grad()
def randomize(module: nn.Module, *, seed: int) -> None:
    """Random weights; norm weights around 1 so they matter without blowing up."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if "norm" in name:
            param.copy_(1.0 + 0.2 * noise)
        else:
            param.copy_(0.15 * noise)


def nx_attention(cfg: ModelConfig, layer_idx: int = 0) -> Attention:
    """The Attention a DecoderLayer builds for `cfg`."""
    return Attention(
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


@torch.no_grad()
def load_attention(nx: Attention, hf: nn.Module) -> None:
    """Copy an HF attention's q/k/v/o (+ biases, + q/k norms) into nxcore's fused layout."""
    assert (nx.qkv_proj.bias is None) == (hf.q_proj.bias is None), "qkv bias presence differs from HF"
    assert (nx.o_proj.bias is None) == (hf.o_proj.bias is None), "o_proj bias presence differs from HF"
    assert (nx.q_norm is None) == (getattr(hf, "q_norm", None) is None), "q/k norm presence differs from HF"
    nx.qkv_proj.weight.copy_(torch.cat([hf.q_proj.weight, hf.k_proj.weight, hf.v_proj.weight], dim=0))
    if nx.qkv_proj.bias is not None:
        nx.qkv_proj.bias.copy_(torch.cat([hf.q_proj.bias, hf.k_proj.bias, hf.v_proj.bias], dim=0))
    nx.o_proj.weight.copy_(hf.o_proj.weight)
    if nx.o_proj.bias is not None:
        nx.o_proj.bias.copy_(hf.o_proj.bias)
    if nx.q_norm is not None:
        nx.q_norm.weight.copy_(hf.q_norm.weight)
        nx.k_norm.weight.copy_(hf.k_norm.weight)


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, T, S] -> HF additive float mask (0 where allowed, finfo.min elsewhere)."""
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def explicit_allowed(batch: int, length: int, window: int | None) -> torch.Tensor:
    """Causal (and windowed) mask written independently of nxcore: key k allowed iff q-window < k <= q."""
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return allowed[None, None].expand(batch, 1, length, length)


def rope_tables(hf_config: Any, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    cfg_rope = llama_arch.read_rope(hf_config)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return cos_sin_table(inv_frequencies(cfg_rope, head_dim), seq_len)


def hf_attention_output(hf_attn: nn.Module, hf_config: Any, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    batch, length, _ = x.shape
    position_ids = torch.arange(length)[None].expand(batch, length)
    position_embeddings = LlamaRotaryEmbedding(hf_config)(x, position_ids)
    out, _ = hf_attn(x, position_embeddings=position_embeddings, attention_mask=additive_mask(allowed))
    return out


def make_cache(cfg: ModelConfig, *, slots: int, seq_len: int, seed: int) -> KVCache:
    """A KV cache whose rows hold random stale data, so masking of stale entries is exercised."""
    cache = KVCache(
        num_layers=cfg.num_layers,
        slots=slots,
        kv_heads=cfg.num_kv_heads,
        seq_len=seq_len,
        head_dim=cfg.head_dim,
        dtype=torch.float32,
    )
    gen = torch.Generator().manual_seed(seed)
    for buf in cache.buffers():
        buf.copy_(torch.randn(buf.shape, generator=gen))
    return cache


def nx_prefill(
    module: nn.Module,
    cfg: ModelConfig,
    x: torch.Tensor,
    cache: KVCache,
    slot_ids: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor],
    window: int | None,
) -> torch.Tensor:
    batch, length, _ = x.shape
    positions = torch.arange(length)[None].expand(batch, length)
    cos, sin = tables
    ctx = AttentionContext(
        prefill=True,
        slot_ids=slot_ids,
        positions=positions,
        cos=cos[positions],
        sin=sin[positions],
        masks={window: build_mask(q_pos=positions, k_pos=positions, window=window)},
    )
    return module(x, ctx, cache)


def nx_decode(
    module: nn.Module,
    x: torch.Tensor,
    start: int,
    cache: KVCache,
    slot_ids: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor],
    window: int | None,
) -> torch.Tensor:
    batch, length, _ = x.shape
    positions = (start + torch.arange(length))[None].expand(batch, length).contiguous()
    cos, sin = tables
    key_positions = torch.arange(cache.seq_len)[None]
    ctx = AttentionContext(
        prefill=False,
        slot_ids=slot_ids,
        positions=positions,
        cos=cos[positions],
        sin=sin[positions],
        masks={window: build_mask(q_pos=positions, k_pos=key_positions, window=window)},
    )
    return module(x, ctx, cache)


# --------------------------------------------------------------------------------------------- RMSNorm


def test_rmsnorm_matches_llama_rmsnorm() -> None:
    torch.manual_seed(0)
    ours, ref = RMSNorm(64, eps=1e-5), LlamaRMSNorm(64, eps=1e-5)
    randomize(ref, seed=1)
    with torch.no_grad():
        ours.weight.copy_(ref.weight)
    x = torch.randn(3, 7, 64) * 3
    with torch.no_grad():
        close(ours(x), ref(x))


# ---------------------------------------------------------------------------------------------- Rotary

ROPE_CASES = {
    "default": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    "default-theta": dict(rope_parameters=dict(rope_type="default", rope_theta=1e6), head_dim=32),
    "linear-2": dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
    "linear-4": dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0), head_dim=32),
    "llama3": dict(rope_parameters=LLAMA3_ROPE),
    "llama3-hd32": dict(rope_parameters=LLAMA3_ROPE, head_dim=32),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_cos_sin_table_matches_llama_rotary_embedding(case: str) -> None:
    hf_config = llama_config(**ROPE_CASES[case])
    rope = llama_arch.read_rope(hf_config)
    assert rope.rope_type == hf_config.rope_parameters["rope_type"]
    assert rope.theta == hf_config.rope_parameters["rope_theta"]
    head_dim = hf_config.head_dim
    cos_table, sin_table = cos_sin_table(inv_frequencies(rope, head_dim), hf_config.max_position_embeddings)
    assert cos_table.shape == (hf_config.max_position_embeddings, head_dim)

    gen = torch.Generator().manual_seed(0)
    position_ids = torch.stack(
        [
            torch.arange(hf_config.max_position_embeddings),
            torch.randint(0, hf_config.max_position_embeddings, (hf_config.max_position_embeddings,), generator=gen),
        ]
    )
    x = torch.zeros(2, position_ids.shape[1], head_dim)
    ref_cos, ref_sin = LlamaRotaryEmbedding(hf_config)(x, position_ids)
    close(cos_table[position_ids], ref_cos)
    close(sin_table[position_ids], ref_sin)


def test_scaled_rope_really_changes_frequencies() -> None:
    # Guards the parity test above against comparing two unscaled tables.
    head_dim = 16
    default = inv_frequencies(RopeConfig(theta=500000.0), head_dim)
    llama3 = inv_frequencies(llama_arch.read_rope(llama_config(rope_parameters=LLAMA3_ROPE)), head_dim)
    linear = inv_frequencies(RopeConfig(rope_type="linear", factor=4.0), head_dim)
    assert not torch.allclose(default, llama3)
    # llama3 keeps high frequencies, divides low ones by the factor, and smooths in between.
    assert llama3[0] == default[0]
    close(llama3[-1], default[-1] / 8.0)
    close(linear, inv_frequencies(RopeConfig(), head_dim) / 4.0)


def test_read_rope_legacy_rope_scaling_fields() -> None:
    legacy = SimpleNamespace(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 3.0})
    assert llama_arch.read_rope(legacy) == RopeConfig(theta=5e5, rope_type="linear", factor=3.0)
    assert llama_arch.read_rope(SimpleNamespace(rope_theta=1234.0)) == RopeConfig(theta=1234.0)


@pytest.mark.parametrize(
    "params",
    [
        dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64),
        dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
    ],
    ids=["yarn", "dynamic"],
)
def test_unsupported_rope_type_is_rejected(params: dict[str, Any]) -> None:
    hf_config = llama_config(rope_parameters=params)
    with pytest.raises(ValueError, match=params["rope_type"]):
        llama_arch.read_rope(hf_config)
    with pytest.raises(ValueError, match=params["rope_type"]):
        inv_frequencies(RopeConfig(rope_type=params["rope_type"], factor=params["factor"]), 16)
    legacy = SimpleNamespace(rope_theta=10000.0, rope_scaling={"type": params["rope_type"], "factor": 2.0})
    with pytest.raises(ValueError, match=params["rope_type"]):
        llama_arch.read_rope(legacy)


def test_apply_rotary_matches_hf_apply_rotary_pos_emb() -> None:
    torch.manual_seed(0)
    hf_config = llama_config(rope_parameters=LLAMA3_ROPE, head_dim=32)
    cos_table, sin_table = rope_tables(hf_config, 256)
    positions = torch.tensor([[0, 1, 2, 3, 4], [100, 7, 255, 64, 65]])
    q = torch.randn(2, 4, 5, 32)
    k = torch.randn(2, 2, 5, 32)
    cos, sin = cos_table[positions], sin_table[positions]
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    close(apply_rotary(q, cos, sin), ref_q)
    close(apply_rotary(k, cos, sin), ref_k)


# ------------------------------------------------------------------------------------------- Attention

ATTENTION_CASES = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "head_dim-32": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "llama3-rope": dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE),
    "attention_bias": dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True),
}

ARCH_ATTENTION = {
    "llama": (LlamaConfig, LlamaAttention, llama_arch.read_config, {}),
    "qwen2": (Qwen2Config, Qwen2Attention, qwen2_arch.read_config, {}),
    "qwen3": (Qwen3Config, Qwen3Attention, qwen3_arch.read_config, dict(head_dim=32)),
    "qwen3-bias": (Qwen3Config, Qwen3Attention, qwen3_arch.read_config, dict(head_dim=16, attention_bias=True)),
}


def build_pair(
    config_cls: type, attn_cls: type, read_config: Any, overrides: dict[str, Any], *, window: int | None = None, seed: int = 0
) -> tuple[Any, ModelConfig, nn.Module, Attention]:
    hf_config = config_cls(**{**BASE, **overrides})
    hf_config._attn_implementation = "eager"
    cfg = read_config(hf_config)
    if window is not None:
        cfg = dataclasses.replace(cfg, sliding_windows=(window,) * cfg.num_layers)
    hf_attn = attn_cls(hf_config, layer_idx=0).eval()
    randomize(hf_attn, seed=seed)
    nx = nx_attention(cfg).eval()
    load_attention(nx, hf_attn)
    return hf_config, cfg, hf_attn, nx


def check_attention(
    hf_config: Any,
    cfg: ModelConfig,
    hf_attn: nn.Module,
    nx: Attention,
    *,
    window: int | None,
    batch: int = 2,
    length: int = 11,
    seq_len: int = 24,
    seed: int = 0,
) -> None:
    torch.manual_seed(seed)
    x = torch.randn(batch, length, cfg.hidden_size)
    tables = rope_tables(hf_config, seq_len)
    slot_ids = torch.tensor([2, 0, 1][:batch])
    with torch.no_grad():
        ref = hf_attention_output(hf_attn, hf_config, x, explicit_allowed(batch, length, window))

        # Prefill: the bucket attends over itself and writes its keys into the slots' rows.
        cache = make_cache(cfg, slots=3, seq_len=seq_len, seed=seed + 1)
        close(nx_prefill(nx, cfg, x, cache, slot_ids, tables, window), ref)

        # Decode one token after a prefill of length-1 tokens: matches HF's last row.
        cache = make_cache(cfg, slots=3, seq_len=seq_len, seed=seed + 2)
        nx_prefill(nx, cfg, x[:, :-1], cache, slot_ids, tables, window)
        close(nx_decode(nx, x[:, -1:], length - 1, cache, slot_ids, tables, window), ref[:, -1:])

        # Decode (speculation-style) three tokens at once after a prefill of length-3 tokens.
        cache = make_cache(cfg, slots=3, seq_len=seq_len, seed=seed + 3)
        nx_prefill(nx, cfg, x[:, :-3], cache, slot_ids, tables, window)
        close(nx_decode(nx, x[:, -3:], length - 3, cache, slot_ids, tables, window), ref[:, -3:])

        # Token-by-token decode from the first token reproduces every row.
        cache = make_cache(cfg, slots=3, seq_len=seq_len, seed=seed + 4)
        nx_prefill(nx, cfg, x[:, :1], cache, slot_ids, tables, window)
        rows = [nx_decode(nx, x[:, t : t + 1], t, cache, slot_ids, tables, window) for t in range(1, length)]
        close(torch.cat(rows, dim=1), ref[:, 1:])


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_llama_attention_prefill_and_decode(case: str) -> None:
    hf_config, cfg, hf_attn, nx = build_pair(LlamaConfig, LlamaAttention, llama_arch.read_config, ATTENTION_CASES[case])
    if case == "head_dim-32":
        assert cfg.head_dim == 32 != cfg.hidden_size // cfg.num_heads
    check_attention(hf_config, cfg, hf_attn, nx, window=None)


@pytest.mark.parametrize("window", [1, 4, 20])
def test_sliding_window_attention_prefill_and_decode(window: int) -> None:
    hf_config, cfg, hf_attn, nx = build_pair(LlamaConfig, LlamaAttention, llama_arch.read_config, dict(num_key_value_heads=2), window=window)
    assert nx.sliding_window == window
    check_attention(hf_config, cfg, hf_attn, nx, window=window, length=13)


def test_sliding_window_really_restricts_attention() -> None:
    # The windowed output differs from full attention, so the window test is not vacuous.
    hf_config, cfg, hf_attn, _ = build_pair(LlamaConfig, LlamaAttention, llama_arch.read_config, {})
    x = torch.randn(1, 10, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = hf_attention_output(hf_attn, hf_config, x, explicit_allowed(1, 10, None))
        windowed = hf_attention_output(hf_attn, hf_config, x, explicit_allowed(1, 10, 4))
    close(full[:, :4], windowed[:, :4])
    assert not torch.allclose(full[:, 4:], windowed[:, 4:], atol=1e-3)


def test_build_mask_semantics() -> None:
    q_pos = torch.tensor([[5, 6], [0, 1]])
    k_pos = torch.arange(8)[None]
    mask = build_mask(q_pos=q_pos, k_pos=k_pos, window=3)
    assert mask.shape == (2, 1, 2, 8)
    assert mask.dtype == torch.bool
    assert mask[0, 0, 0].tolist() == [k in (3, 4, 5) for k in range(8)]
    assert mask[0, 0, 1].tolist() == [k in (4, 5, 6) for k in range(8)]
    assert mask[1, 0, 0].tolist() == [k == 0 for k in range(8)]
    full = build_mask(q_pos=q_pos, k_pos=k_pos, window=None)
    assert full[0, 0, 1].tolist() == [k <= 6 for k in range(8)]


@pytest.mark.parametrize("arch", sorted(ARCH_ATTENTION))
def test_qwen_style_attention_prefill_and_decode(arch: str) -> None:
    config_cls, attn_cls, read_config, overrides = ARCH_ATTENTION[arch]
    hf_config, cfg, hf_attn, nx = build_pair(config_cls, attn_cls, read_config, overrides)
    if arch.startswith("qwen3"):
        assert nx.q_norm is not None and nx.q_norm.eps == hf_config.rms_norm_eps
    if arch == "qwen2":
        assert nx.qkv_proj.bias is not None and nx.o_proj.bias is None
    check_attention(hf_config, cfg, hf_attn, nx, window=None)


def test_prefill_writes_keys_and_values_into_the_slot_rows_only() -> None:
    hf_config, cfg, hf_attn, nx = build_pair(LlamaConfig, LlamaAttention, llama_arch.read_config, {})
    tables = rope_tables(hf_config, 16)
    cache = make_cache(cfg, slots=3, seq_len=16, seed=5)
    before = {name: buf.clone() for name, buf in cache.named_buffers()}
    x = torch.randn(2, 6, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    slot_ids = torch.tensor([2, 0])
    with torch.no_grad():
        nx_prefill(nx, cfg, x, cache, slot_ids, tables, None)
        positions = torch.arange(6)[None].expand(2, 6)
        k = hf_attn.k_proj(x).view(2, 6, -1, cfg.head_dim).transpose(1, 2)
        cos, sin = LlamaRotaryEmbedding(hf_config)(x, positions)
        _, ref_k = apply_rotary_pos_emb(k, k, cos, sin)
        ref_v = hf_attn.v_proj(x).view(2, 6, -1, cfg.head_dim).transpose(1, 2)
    k_buf, v_buf = cache.buffers_of(0)
    for row, slot in enumerate(slot_ids.tolist()):
        close(k_buf[slot, :, :6], ref_k[row])
        close(v_buf[slot, :, :6], ref_v[row])
        torch.testing.assert_close(k_buf[slot, :, 6:], before["k0"][slot, :, 6:], atol=0, rtol=0)
    for untouched in (1, cache.scratch_slot):
        torch.testing.assert_close(k_buf[untouched], before["k0"][untouched], atol=0, rtol=0)
        torch.testing.assert_close(v_buf[untouched], before["v0"][untouched], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------- MLP


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp_matches_llama_mlp(act: str, bias: bool) -> None:
    hf_config = llama_config(hidden_act=act, mlp_bias=bias)
    ref = LlamaMLP(hf_config).eval()
    randomize(ref, seed=3)
    ours = GatedMLP(hidden_size=64, intermediate_size=hf_config.intermediate_size, bias=bias, act=act)
    with torch.no_grad():
        ours.gate_up_proj.weight.copy_(torch.cat([ref.gate_proj.weight, ref.up_proj.weight], dim=0))
        ours.down_proj.weight.copy_(ref.down_proj.weight)
        if bias:
            ours.gate_up_proj.bias.copy_(torch.cat([ref.gate_proj.bias, ref.up_proj.bias], dim=0))
            ours.down_proj.bias.copy_(ref.down_proj.bias)
        x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(4))
        close(ours(x), ref(x))


# --------------------------------------------------------------------------------------- Decoder layer

DECODER_CASES = {
    "llama": (LlamaConfig, LlamaDecoderLayer, llama_arch, dict(rope_parameters=LLAMA3_ROPE)),
    "llama-mqa-headdim": (LlamaConfig, LlamaDecoderLayer, llama_arch, dict(num_key_value_heads=1, head_dim=32)),
    "qwen3": (Qwen3Config, Qwen3DecoderLayer, qwen3_arch, dict(head_dim=32)),
}


@pytest.mark.parametrize("case", sorted(DECODER_CASES))
def test_decoder_layer_matches_hf(case: str) -> None:
    config_cls, layer_cls, arch, overrides = DECODER_CASES[case]
    hf_config = config_cls(**{**BASE, **overrides})
    hf_config._attn_implementation = "eager"
    cfg = arch.read_config(hf_config)
    hf_layer = layer_cls(hf_config, layer_idx=0).eval()
    randomize(hf_layer, seed=7)

    # Load through the checkpoint converter, so the q,k,v and gate,up fusion orders are covered too.
    hf_state = {f"model.layers.0.{name}": t for name, t in hf_layer.state_dict().items()}
    hf_state |= {
        "model.embed_tokens.weight": torch.zeros(cfg.vocab_size, cfg.hidden_size),
        "model.norm.weight": torch.ones(cfg.hidden_size),
        "lm_head.weight": torch.zeros(cfg.vocab_size, cfg.hidden_size),
    }
    converted = arch.convert_state_dict(hf_state, cfg)
    layer_state = {k.removeprefix("layers.0."): v for k, v in converted.items() if k.startswith("layers.0.")}
    ours = DecoderLayer(cfg, 0).eval()
    ours.load_state_dict(layer_state, strict=True)

    batch, length = 2, 9
    x = torch.randn(batch, length, cfg.hidden_size, generator=torch.Generator().manual_seed(8))
    position_ids = torch.arange(length)[None].expand(batch, length)
    tables = rope_tables(hf_config, 16)
    with torch.no_grad():
        ref = hf_layer(
            x,
            attention_mask=additive_mask(explicit_allowed(batch, length, None)),
            position_ids=position_ids,
            position_embeddings=LlamaRotaryEmbedding(hf_config)(x, position_ids),
        )
        if isinstance(ref, tuple):
            ref = ref[0]
        cache = make_cache(cfg, slots=2, seq_len=16, seed=9)
        close(nx_prefill(ours, cfg, x, cache, torch.tensor([1, 0]), tables, None), ref)

        cache = make_cache(cfg, slots=2, seq_len=16, seed=10)
        nx_prefill(ours, cfg, x[:, :-1], cache, torch.tensor([1, 0]), tables, None)
        close(nx_decode(ours, x[:, -1:], length - 1, cache, torch.tensor([1, 0]), tables, None), ref[:, -1:])
