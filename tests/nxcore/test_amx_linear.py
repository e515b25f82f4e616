"""bf16 linears on AMX tiles (nxcore/csrc/amx_linear.cpp): float32 sums rounded once, a row's bits
the same whatever rows come with it and however many threads run; `prepack` gives every bf16 Linear
an AMX copy on CPUs with AMX, `nxcore::linear` runs it up to `_amx_rows()` rows and oneDNN beyond,
batch-invariant mode at every row count; the copies die with the model."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nxcore import native
from nxcore.modules import linear as packed_linear
from nxcore.modules.linear import Linear, prepack


def _amx() -> bool:
    return native.available() and bool(torch.ops.nxcore._amx_supported())


needs_amx = pytest.mark.skipif(not _amx(), reason="needs a CPU with AMX-BF16 (Intel Xeon 4th generation or later) and nxcore's C++ ops")


@pytest.fixture(autouse=True)
def auto_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(packed_linear.KERNEL_ENV, "auto")


def _exact(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return (x.float() @ w.float().T + (b.float() if b is not None else 0)).to(torch.bfloat16).float()


@needs_amx
@pytest.mark.parametrize(("n", "k", "bias"), [(100, 64, True), (17, 96, False), (300, 512, False), (48, 2048, True), (33, 32, True)])
def test_amx_linear_is_a_float32_product_and_rows_are_independent(n: int, k: int, bias: bool) -> None:
    """Output widths ending inside a column tile and a panel, row counts ending inside a row tile
    and a block of 32: every row the bits it has alone, at one thread and at all."""
    torch.manual_seed(n + k)
    w = torch.randn(n, k, dtype=torch.bfloat16)
    b = torch.randn(n, dtype=torch.bfloat16) if bias else None
    x = torch.randn(103, k, dtype=torch.bfloat16)
    assert torch.ops.nxcore._pack_amx(w)
    threads = torch.get_num_threads()
    try:
        full = torch.ops.nxcore.amx_linear(x, w, b)
        for start, rows in [(0, 1), (7, 2), (11, 15), (20, 16), (40, 17), (50, 32), (60, 33), (3, 100)]:
            assert torch.equal(torch.ops.nxcore.amx_linear(x[start : start + rows], w, b), full[start : start + rows])
        torch.set_num_threads(1)
        assert torch.equal(torch.ops.nxcore.amx_linear(x, w, b), full)
        assert torch.equal(torch.ops.nxcore.amx_linear(x.view(1, 103, k), w, b), full.view(1, 103, n))
    finally:
        torch.set_num_threads(threads)
        torch.ops.nxcore._unpack_amx(w)
    torch.testing.assert_close(full.float(), _exact(x, w, b), rtol=1.6e-2, atol=1e-2 * k**0.5)
    assert torch.ops.nxcore._pack_amx(w)
    # the weight prefetch (up to 64 rows; the 103-row call above ran without) moves no bits
    assert torch.equal(torch.ops.nxcore.amx_linear(x[:64], w, b), full[:64])
    before = torch.ops.nxcore._set_amx_prefetch(0)
    try:
        assert torch.equal(torch.ops.nxcore.amx_linear(x[:64], w, b), full[:64])
    finally:
        torch.ops.nxcore._set_amx_prefetch(before)
        torch.ops.nxcore._unpack_amx(w)
    with pytest.raises(RuntimeError, match="no AMX copy of this weight"):
        torch.ops.nxcore.amx_linear(x, w, b)


def test_weights_the_kernel_cannot_take_get_no_copy() -> None:
    """K not a multiple of 32, float32, a transposed view; and everything on CPUs without AMX."""
    if not native.available():
        pytest.skip("needs nxcore's C++ ops (a C++ toolchain)")
    before = torch.ops.nxcore._amx_packed_count()
    for w in (torch.zeros(8, 48, dtype=torch.bfloat16), torch.zeros(8, 64), torch.zeros(64, 8, dtype=torch.bfloat16).T):
        assert not torch.ops.nxcore._pack_amx(w)
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    assert torch.ops.nxcore._pack_amx(w) == _amx()
    torch.ops.nxcore._unpack_amx(w)
    assert torch.ops.nxcore._amx_packed_count() == before
    with pytest.raises(RuntimeError, match="rows must be >= 0"):
        torch.ops.nxcore._set_amx_rows(-1)
    with pytest.raises(RuntimeError, match="bytes must be a multiple of 64"):
        torch.ops.nxcore._set_amx_prefetch(100)


def _model(invariant: bool) -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(Linear(64, 200, bias=True), nn.SiLU(), Linear(200, 40, bias=False)).to(torch.bfloat16)
    for module in model:
        if isinstance(module, Linear):
            module.invariant = invariant
    return model.eval().requires_grad_(False)


def _ops(layer: nn.Module, x: torch.Tensor) -> set[str]:
    with torch.profiler.profile() as prof:
        layer(x)
    return {event.name for event in prof.events()}


@needs_amx
def test_the_default_linear_runs_the_amx_copy_up_to_its_rows_and_onednn_beyond() -> None:
    amx_before, onednn_before = torch.ops.nxcore._amx_packed_count(), len(packed_linear._PACKED)
    model = _model(invariant=False)
    # only the first layer's K (64) is a multiple of 32: the second gets oneDNN's copy alone
    assert prepack(model) == 2
    assert torch.ops.nxcore._amx_packed_count() == amx_before + 1 and len(packed_linear._PACKED) == onednn_before + 2
    first = model[0]
    limit = torch.ops.nxcore._amx_rows()
    assert limit >= 2
    x = torch.randn(limit + 8, 64, dtype=torch.bfloat16)
    few = x[:limit]
    assert "mkldnn::_linear_pointwise" not in _ops(first, few)
    assert torch.equal(first(few), torch.ops.nxcore.amx_linear(few, first.weight, first.bias))
    # one row over short weight rows (in_features <= 1024) too, rather than the GEMV
    assert torch.equal(first(x[3:4]), torch.ops.nxcore.amx_linear(x[3:4], first.weight, first.bias))
    assert "mkldnn::_linear_pointwise" in _ops(first, x)
    torch.testing.assert_close(first(x).float(), F.linear(x.float(), first.weight.float(), first.bias.float()), rtol=1.6e-2, atol=0.1)
    before = torch.ops.nxcore._set_amx_rows(0)  # off: oneDNN from two rows on
    try:
        assert "mkldnn::_linear_pointwise" in _ops(first, few)
    finally:
        torch.ops.nxcore._set_amx_rows(before)
    del model, first
    gc.collect()
    assert torch.ops.nxcore._amx_packed_count() == amx_before and len(packed_linear._PACKED) == onednn_before


@needs_amx
def test_batch_invariant_linears_run_the_amx_copy_at_every_row_count() -> None:
    """No oneDNN copy is made for them (never read): the second layer (K = 200, no AMX copy) gets its
    VNNI copy, as on CPUs without AMX. A row's bits are its own at 1-100 rows."""
    amx_before, onednn_before = torch.ops.nxcore._amx_packed_count(), len(packed_linear._PACKED)
    vnni_before = torch.ops.nxcore._invariant_packed_count()
    model = _model(invariant=True)
    assert prepack(model) == 2
    assert torch.ops.nxcore._amx_packed_count() == amx_before + 1 and torch.ops.nxcore._invariant_packed_count() == vnni_before + 1
    assert len(packed_linear._PACKED) == onednn_before
    first = model[0]
    x = torch.randn(100, 64, dtype=torch.bfloat16)
    full = first(x)
    assert "mkldnn::_linear_pointwise" not in _ops(first, x)
    assert torch.equal(full, torch.ops.nxcore.amx_linear(x, first.weight, first.bias))
    for start, rows in [(0, 1), (9, 2), (30, 31), (1, 64)]:
        assert torch.equal(first(x[start : start + rows]), full[start : start + rows])
    del model, first
    gc.collect()
    assert torch.ops.nxcore._amx_packed_count() == amx_before and torch.ops.nxcore._invariant_packed_count() == vnni_before


def test_onednn_choice_makes_no_amx_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    if not native.available():
        pytest.skip("needs nxcore's C++ ops (a C++ toolchain)")
    monkeypatch.setenv(packed_linear.KERNEL_ENV, "onednn")
    before = torch.ops.nxcore._amx_packed_count()
    model = _model(invariant=False)
    prepack(model)
    assert torch.ops.nxcore._amx_packed_count() == before
