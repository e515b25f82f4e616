"""Context encoding's last layer computes one position per row (`CausalLM.hidden_states(keep=...)`):
the cache it writes is the full computation's, bit for bit, and the kept position's output is the
full computation's at that position (the same bits in batch-invariant mode, where every kernel sums
in one order whatever the number of rows)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nxcore import RuntimeConfig, native
from nxcore.loader import load_rank, read_model_config
from nxcore.modules.decoder import CausalLM
from nxserve.testing.model_factory import make_model

LENGTH = 40


def _model(tmp_path: Path, arch: str, dtype: str, invariant: bool = False) -> CausalLM:
    # mistral with a window shorter than the prompt: its layers attend through masks, not by index
    overrides = {"sliding_window": 9} if arch == "mistral" else {}
    path = make_model(arch=arch, preset="tiny", out=tmp_path / arch, overrides=overrides)
    config = RuntimeConfig(batch_size=3, seq_len=64, dtype=dtype, batch_invariant=invariant)
    model, _ = load_rank(path, read_model_config(path), config)
    return model


def _run(model: CausalLM, ids: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for buf in model.kv_cache.buffers():
        buf.zero_()
    positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    ctx = model.context(prefill=True, slot_ids=torch.tensor([2, 0, 1]), positions=positions)
    with torch.no_grad():
        hidden = model.hidden_states(ids, ctx, keep=keep)
    return hidden, [buf.clone() for buf in model.kv_cache.buffers()]


@pytest.mark.parametrize(("arch", "dtype"), [("llama", "float32"), ("llama", "bfloat16"), ("mistral", "float32"), ("qwen3_moe", "float32")])
def test_the_kept_position_and_the_cache_are_the_full_computation(tmp_path: Path, arch: str, dtype: str) -> None:
    model = _model(tmp_path, arch, dtype)
    torch.manual_seed(0)
    ids = torch.randint(3, model.cfg.vocab_size, (3, LENGTH))
    keep = torch.tensor([LENGTH - 1, 0, 17])  # the bucket's end, its start, a prompt ending inside it
    full, full_cache = _run(model, ids, None)
    kept, kept_cache = _run(model, ids, keep)
    assert full.shape == (3, LENGTH, model.cfg.hidden_size) and kept.shape == (3, 1, model.cfg.hidden_size)
    assert all(torch.equal(a, b) for a, b in zip(full_cache, kept_cache))
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == "bfloat16" else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(kept[:, 0], full[torch.arange(3), keep], **tol)


@pytest.mark.skipif(not native.available(), reason="batch-invariant mode needs nxcore's C++ ops (g++ and ninja)")
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_batch_invariant_mode_keeps_the_bits(tmp_path: Path, arch: str) -> None:
    model = _model(tmp_path, arch, "bfloat16", invariant=True)
    torch.manual_seed(1)
    ids = torch.randint(3, model.cfg.vocab_size, (3, LENGTH))
    keep = torch.tensor([5, LENGTH - 1, 30])
    full, _ = _run(model, ids, None)
    kept, _ = _run(model, ids, keep)
    assert torch.equal(kept[:, 0], full[torch.arange(3), keep])


def test_keep_is_refused_outside_context_encoding(tmp_path: Path) -> None:
    model = _model(tmp_path, "llama", "float32")
    ctx = model.context(prefill=False, slot_ids=torch.tensor([0]), positions=torch.tensor([[3]]))
    with pytest.raises(ValueError, match="context encoding only"):
        model.hidden_states(torch.tensor([[5]]), ctx, keep=torch.tensor([0]))
