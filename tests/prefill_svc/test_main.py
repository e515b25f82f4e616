"""The prefill service's own flags: arena sizes and their default."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from prefill_svc.__main__ import _arena_default, _size


def test_sizes_take_k_m_g_suffixes_and_refuse_nonsense() -> None:
    assert [_size(v) for v in ("4096", "256M", "256MB", "1G", "1.5k")] == [4096, 256 << 20, 256 << 20, 1 << 30, 1536]
    for bad in ("abc", "0", "-1M", "M"):
        with pytest.raises(argparse.ArgumentTypeError):
            _size(bad)


def _engine(layers: int, kv_heads: int, head_dim: int, dtype: str, ctx_batch: int = 4, max_prompt: int = 1024) -> SimpleNamespace:
    return SimpleNamespace(
        model_config=SimpleNamespace(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim),
        config=SimpleNamespace(dtype=dtype, ctx_batch_size=ctx_batch, max_prompt_len=max_prompt),
    )


def test_default_arena_holds_four_full_batches_within_bounds() -> None:
    small = _engine(12, 4, 64, "bfloat16")  # 12 KiB a token
    assert _arena_default(small, None) == 4 * 4 * 1024 * 12 * 1024 == 192 << 20
    assert _arena_default(small, _engine(2, 1, 64, "float32")) == 4 * 4 * 1024 * (12 + 1) * 1024
    assert _arena_default(_engine(2, 2, 16, "float32", ctx_batch=1, max_prompt=128), None) == 16 << 20
    assert _arena_default(_engine(32, 8, 128, "bfloat16"), None) == 1 << 30
