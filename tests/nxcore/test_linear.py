"""Prepacked bf16 linears: the same numbers as F.linear, packed once per weight, dropped with the model."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nxcore.modules import linear as packed_linear
from nxcore.modules.linear import Linear, can_pack, prepack

pytestmark = pytest.mark.skipif(not can_pack(torch.bfloat16), reason="this CPU's oneDNN has no bfloat16 support")


def _model(bias: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(Linear(48, 96, bias=bias), nn.SiLU(), Linear(96, 40, bias=bias)).to(torch.bfloat16)
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_packed_linear_equals_f_linear(bias: bool, rows: int) -> None:
    model = _model(bias)
    x = torch.randn(2, rows, 48, dtype=torch.bfloat16)
    first, second = model[0], model[2]
    expected = F.linear(F.silu(F.linear(x, first.weight, first.bias)), second.weight, second.bias)
    assert prepack(model) == 2
    assert len({packed_linear._key(m.weight) for m in (first, second)} & packed_linear._PACKED.keys()) == 2
    assert torch.equal(model(x), expected)


def test_float32_is_not_packed_and_entries_die_with_the_model() -> None:
    assert prepack(_model(False).float()) == 0
    model = _model(False)
    before = len(packed_linear._PACKED)
    prepack(model)
    assert len(packed_linear._PACKED) == before + 2
    del model
    gc.collect()
    assert len(packed_linear._PACKED) == before


def test_eager_call_skips_the_custom_op_with_the_same_numbers() -> None:
    model = _model(True)
    prepack(model)
    x = torch.randn(2, 3, 48, dtype=torch.bfloat16)
    first = model[0]
    via_op = torch.ops.nxcore.linear(x, first.weight, first.bias)
    with torch.profiler.profile() as prof:
        eager = first(x)
    names = {event.name for event in prof.events()}
    assert "mkldnn::_linear_pointwise" in names and "nxcore::linear" not in names
    assert torch.equal(eager, via_op)
    assert torch.equal(via_op, F.linear(x, first.weight, first.bias))


@pytest.mark.parametrize("strict", [True, False])
def test_exported_graph_calls_the_op_with_the_dense_weight(strict: bool) -> None:
    model = _model(True)
    prepack(model)
    x = torch.randn(3, 48, dtype=torch.bfloat16)
    program = torch.export.export(model, (x,), strict=strict)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("nxcore.linear.default") == 2
    assert torch.equal(program.module()(x), model(x))
