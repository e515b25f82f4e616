"""bf16 linears: the C++ `nxcore::linear` (GEMV for decode rows, oneDNN on weights packed once
beyond) and its Python fallback give F.linear's numbers; packed copies die with the model."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nxcore import native
from nxcore.modules import linear as packed_linear
from nxcore.modules.linear import Linear, can_pack, prepack

pytestmark = pytest.mark.skipif(not can_pack(torch.bfloat16), reason="this CPU's oneDNN has no bfloat16 support")


@pytest.fixture(params=[1, 8], ids=["one-stream", "eight-streams"])
def gemv(request: pytest.FixtureRequest) -> Iterator[None]:
    """The C++ GEMV on for 1 and 2 rows, streaming one weight row at a time or eight (each the
    default on some CPUs: see nxcore/csrc/linear.cpp); skips where it cannot run."""
    if not native.available():
        pytest.skip("nxcore's C++ ops are not built here")
    before = torch.ops.nxcore._set_gemv_rows(native.GEMV_MAX_ROWS)
    try:
        if torch.ops.nxcore._gemv_rows() == 0:
            pytest.skip("no C++ GEMV on this machine (no AVX512-BF16)")
        streams = torch.ops.nxcore._set_gemv_streams(request.param)
        try:
            yield
        finally:
            torch.ops.nxcore._set_gemv_streams(streams)
    finally:
        torch.ops.nxcore._set_gemv_rows(before)


BF16_ULP = 2.0**-7
"""bfloat16's relative spacing: summing in another order may round to the neighbouring value."""


def _model(bias: bool, sizes: tuple[int, int, int] = (48, 96, 40)) -> nn.Module:
    torch.manual_seed(0)
    a, b, c = sizes
    model = nn.Sequential(Linear(a, b, bias=bias), nn.SiLU(), Linear(b, c, bias=bias)).to(torch.bfloat16)
    return model.eval().requires_grad_(False)


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    first, second = model[0], model[2]
    return F.linear(F.silu(F.linear(x, first.weight, first.bias)), second.weight, second.bias)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler on PATH")
def test_the_cpp_ops_are_built_where_a_compiler_is() -> None:
    """Where there is a compiler (AOTInductor needs one too), the C++ op must be the one in use."""
    assert native.load() is None
    assert native.available()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [3, 5, 33])
def test_packed_linear_equals_f_linear(bias: bool, rows: int) -> None:
    """Beyond the GEMV's rows the op runs oneDNN on the packed weight: bit-identical to F.linear."""
    model = _model(bias)
    x = torch.randn(2, rows, 48, dtype=torch.bfloat16)
    assert prepack(model) == 2
    assert len({packed_linear._key(m.weight) for m in (model[0], model[2])} & packed_linear._PACKED.keys()) == 2
    assert torch.equal(model(x), _reference(model, x))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("sizes", [(48, 96, 40), (2048, 1030, 13), (100, 37, 300), (64, 16, 8)])
@pytest.mark.parametrize("shape", [(1,), (1, 1), (2,), (1, 2)])
def test_gemv_rows_match_float32_to_one_rounding(bias: bool, sizes: tuple[int, int, int], shape: tuple[int, ...], gemv: None) -> None:
    """Decode rows run the GEMV: float32 sums rounded once, so each output is the float32
    reference's bf16 rounding or its neighbour. The input widths reach every part of the kernel's
    loop (two vectors a step, one vector, the masked tail under 32 lanes); output counts split
    unevenly across threads, in whole groups of eight streamed rows and with rows left over."""
    model = _model(bias, sizes)
    prepack(model)
    x = torch.randn(*shape, sizes[0], dtype=torch.bfloat16)
    first = model[0]
    with torch.profiler.profile() as prof:
        got = first(x)
    names = {event.name for event in prof.events()}
    assert "nxcore::linear" in names and "mkldnn::_linear_pointwise" not in names
    exact = F.linear(x.float(), first.weight.float(), None if first.bias is None else first.bias.float())
    assert got.shape == exact.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), exact.to(torch.bfloat16).float(), rtol=BF16_ULP, atol=1e-6)
    torch.testing.assert_close(model(x), _reference(model, x), rtol=2 * BF16_ULP, atol=1e-3)


def test_float32_is_not_packed_and_equals_f_linear() -> None:
    model = _model(True).float()
    assert prepack(model) == 0
    x = torch.randn(1, 48)
    assert torch.equal(model(x), _reference(model, x))


def test_packed_entries_die_with_the_model() -> None:
    model = _model(False)
    before = len(packed_linear._PACKED)
    native_before = torch.ops.nxcore._packed_count() if native.available() else 0
    prepack(model)
    assert len(packed_linear._PACKED) == before + 2
    if native.available():
        assert torch.ops.nxcore._packed_count() == native_before + 2
    del model
    gc.collect()
    assert len(packed_linear._PACKED) == before
    if native.available():
        assert torch.ops.nxcore._packed_count() == native_before


def test_a_model_collected_while_torch_traces_drops_its_packed_weights_after() -> None:
    """A model's finalizer can run in the middle of export or compile tracing of another: its ops
    must not land in that graph (strict export failed on the lifted weight), and the packed copies
    go at the next drop outside tracing."""
    model = _model(False)
    before = len(packed_linear._PACKED)
    native_before = torch.ops.nxcore._packed_count() if native.available() else 0
    prepack(model)
    weights = [model[0].weight.detach(), model[2].weight.detach()]

    class CollectsMidTrace(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            packed_linear._drop(weights)  # what the model's finalizer does
            return x * 2

    program = torch.export.export(CollectsMidTrace(), (torch.randn(3),), strict=False)
    assert [str(n.target) for n in program.graph.nodes if n.op == "call_function"] == ["aten.mul.Tensor"]
    assert len(packed_linear._PACKED) == before + 2  # still registered: dropped after tracing
    packed_linear._drop([])
    assert len(packed_linear._PACKED) == before
    if native.available():
        assert torch.ops.nxcore._packed_count() == native_before
    del model
    gc.collect()  # its own finalizer finds nothing left to drop
    assert len(packed_linear._PACKED) == before


def test_eager_call_runs_the_op_with_its_numbers() -> None:
    model = _model(True)
    prepack(model)
    x = torch.randn(2, 3, 48, dtype=torch.bfloat16)
    first = model[0]
    via_op = torch.ops.nxcore.linear(x, first.weight, first.bias)
    with torch.profiler.profile() as prof:
        eager = first(x)
    names = {event.name for event in prof.events()}
    assert "mkldnn::_linear_pointwise" in names
    # The C++ op is called eagerly too; the Python one is skipped for its ~30-40 us dispatch.
    assert ("nxcore::linear" in names) == native.available()
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


def test_python_fallback_without_the_cpp_ops() -> None:
    """NXSERVE_NATIVE=0 (as where no compiler is): the op is defined in Python and runs oneDNN on
    the packed weight for every row count, so eager calls and the op agree exactly. Against the
    float32 reference each output is its bf16 rounding or the neighbour; against F.linear, within
    that too. (Bit-identity with F.linear held in 600 local trials but failed in one CI run of six:
    unseeded data that F.linear summed in another order.)"""
    script = f"""
import torch
from torch.nn import functional as F
import os
from nxcore import native
native.configure_from(os.environ)  # as an entry point does
from nxcore.modules import linear
assert not native.available()
torch.manual_seed(0)
for trial in range(20):
    w = torch.randn(40, 48, dtype=torch.bfloat16); b = torch.randn(40, dtype=torch.bfloat16)
    m = linear.Linear(48, 40, dtype=torch.bfloat16).requires_grad_(False)
    m.weight.copy_(w); m.bias.copy_(b)
    linear.prepack(m)
    for rows in (1, 5):
        x = torch.randn(rows, 48, dtype=torch.bfloat16)
        got = torch.ops.nxcore.linear(x, m.weight, m.bias)
        assert torch.equal(m(x), got)
        exact = F.linear(x.float(), w.float(), b.float())
        torch.testing.assert_close(got.float(), exact.to(torch.bfloat16).float(), rtol={BF16_ULP}, atol=1e-6)
        torch.testing.assert_close(got, F.linear(x, w, b), rtol={2 * BF16_ULP}, atol=1e-3)
"""
    env = {**os.environ, native.ENV_DISABLE: "0"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    status = subprocess.run(
        [sys.executable, "-c", "import sys; from nxcore import native; sys.exit(native.main())"], env=env, capture_output=True, text=True, timeout=120
    )
    assert status.returncode == 0 and "not in use, disabled by NXSERVE_NATIVE=0" in status.stdout


def test_gemv_rows_setting_is_bounded() -> None:
    if not native.available():
        pytest.skip("nxcore's C++ ops are not built here")
    with pytest.raises(RuntimeError, match=r"rows must be in 0..2, got 3"):
        torch.ops.nxcore._set_gemv_rows(3)
    before = torch.ops.nxcore._set_gemv_rows(0)
    try:
        assert torch.ops.nxcore._gemv_rows() == 0
    finally:
        torch.ops.nxcore._set_gemv_rows(before)
    with pytest.raises(RuntimeError, match=r"streams must be 1 or 8, got 4|this build has one GEMV"):
        torch.ops.nxcore._set_gemv_streams(4)
    assert torch.ops.nxcore._gemv_streams() in (1, 8)
    # by default every CPU that can run the GEMV runs it for one row at least (AMD two, Intel one)
    assert (torch.ops.nxcore._gemv_rows() > 0) == torch.ops.nxcore._gemv_supported()
