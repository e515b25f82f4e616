"""Linear layers whose bf16 weights run prepacked for oneDNN on CPU.

Decode is a chain of matrix-vector products, so its speed is the speed at which each linear
streams its weight. On CPU, `F.linear` in bfloat16 reorders the weight into oneDNN's blocked
layout on every call; measured on this project's machine (AMD EPYC, avx512_bf16), it streams
~30 GB/s where the same product on a weight packed once reaches ~60-73 GB/s, with bit-identical
results. Inductor only packs weights under freezing, which bakes a copy of them into every
compiled graph, so the packing is done here instead, once per weight at load:

- `prepack(model)` packs every `Linear`'s weight and keeps the packed copy in a registry keyed by
  the dense weight's storage; the registry entry dies with the model;
- `Linear.forward` calls the custom op `nxcore::linear(x, weight, bias)`. Graphs (eager, exported,
  AOTInductor) see the dense weight as an ordinary input, so the compiled artifacts stay
  weight-free and shape-static; the op finds the packed copy by the weight's storage and falls
  back to `F.linear` when there is none (float32, an unpacked model, no oneDNN).

On CPUs with AVX512-BF16 and no AMX (AMD EPYC), `prepack` makes nxcore's own VNNI copy instead
(`nxcore/csrc/invariant.cpp`; `vnni_preferred`, NXSERVE_BF16_LINEAR), and `nxcore::linear` runs
on it at every row count: faster than oneDNN there up to a few dozen rows, level beyond, and
batch-invariant.

On CPUs with AMX-BF16 (Intel Xeon), `prepack` also makes nxcore's AMX copy
(`nxcore/csrc/amx_linear.cpp`, `amx_preferred`): `nxcore::linear` runs it for 2 to
`torch.ops.nxcore._amx_rows()` rows (decode's batches, where it reads the weights faster than
oneDNN) and for one row over weights of at most 1024 in_features (faster than the GEMV there), and
batch-invariant linears at every row count. Such CPUs then hold three copies of each bf16 weight
(dense, AMX, oneDNN's for more rows).

`nxcore::linear` is defined in C++ (`nxcore/csrc/linear.cpp`, built by `nxcore.native`): it runs
the VNNI copy where there is one, oneDNN on the packed copy, on AMD CPUs an AVX512-BF16 GEMV on the dense weight for one or two rows
(decode; measured faster there, slower than oneDNN on Intel), and `at::linear` otherwise, and compiled graphs call it without entering
Python. Where the C++ ops cannot be built, the op is defined here in Python with the oneDNN and
`F.linear` paths only.
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import nn
from torch.nn import functional as F

from nxcore import native
from nxcore.modules.eager import on_xla, runs_eagerly

_PACKED: dict[tuple[int, int, tuple[int, ...], torch.dtype], torch.Tensor] = {}
"""(storage address, storage offset, shape, dtype) of a dense weight -> its oneDNN-packed copy."""

PACKABLE = (torch.bfloat16,)
"""Dtypes packed when oneDNN supports them here (float32 measured no faster packed)."""


def _key(weight: torch.Tensor) -> tuple[int, int, tuple[int, ...], torch.dtype]:
    return weight.untyped_storage().data_ptr(), int(weight.storage_offset()), tuple(weight.shape), weight.dtype


def _python_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias, on the packed copy of `weight` when `prepack` made one."""
    packed = _PACKED.get(_key(weight))
    if packed is None:
        return F.linear(x, weight, bias)
    return _packed_linear(x, packed, bias, weight.shape[0])


@native.on_load
def _define_op(loaded: bool) -> None:
    """`nxcore::linear` is the C++ op once loaded; else it is defined here. Its shape function either way.
    `nxcore::linear_invariant` (batch-invariant mode) exists only in C++: see `Linear.forward`."""
    if not loaded:
        torch.library.custom_op("nxcore::linear", _python_linear, mutates_args=())
    torch.library.register_fake("nxcore::linear")(_fake_linear)
    if loaded:
        torch.library.register_fake("nxcore::linear_invariant")(_fake_linear)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
    return out.view(*x.shape[:-1], out_features)


def _fake_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear routed through `nxcore::linear` (same parameters, same state-dict names).

    Traced (torch.export, torch.compile: fake or functional tensors), it is the custom op, so graphs
    keep the dense weight as their input. Run eagerly without the C++ op, it calls oneDNN on the
    packed weight itself: the Python op's dispatch costs ~30-40 us a call (measured here), a few ms
    per decode step."""

    invariant: bool = False
    """Batch-invariant mode (`RuntimeConfig.batch_invariant`): `nxcore::linear_invariant`
    (nxcore/csrc/invariant.cpp), whose every output element is summed in one order whatever the
    number of rows, instead of the kernels chosen by row count below."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.invariant:
            return torch.ops.nxcore.linear_invariant(x, self.weight, self.bias)
        if on_xla(x):  # XLA lowers the matmul itself; the op's Python body reads a storage address it has not
            return F.linear(x, self.weight, self.bias)
        if not native.available() and runs_eagerly(x):
            packed = _PACKED.get(_key(self.weight))
            if packed is not None:
                return _packed_linear(x, packed, self.bias, self.weight.shape[0])
        return torch.ops.nxcore.linear(x, self.weight, self.bias)


KERNEL_ENV = "NXSERVE_BF16_LINEAR"
"""Which kernel bf16 linears run (read by `prepack`): `auto` (default), `vnni` or `onednn`."""


def _kernel_choice() -> str:
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in ("auto", "vnni", "onednn"):
        raise ValueError(f"{KERNEL_ENV}={choice!r}: use auto, vnni or onednn")
    return choice


def vnni_preferred() -> bool:
    """Whether `prepack` gives bf16 linears nxcore's own VNNI-packed weights rather than oneDNN's.
    `auto`: on CPUs with AVX512-BF16 and no AMX, where they measured faster at few rows and level
    beyond (AMD EPYC, one thread, ten weight shapes: 1.2-1.97x oneDNN's packed GEMM at 1-8 rows,
    0.99-1.21x at 32, 0.93-1.09x at 128-512; 1.0-1.37x the C++ GEMV at one row); oneDNN's AMX
    kernels elsewhere. `vnni` wherever AVX512-BF16
    runs, `onednn` never (NXSERVE_BF16_LINEAR)."""
    choice = _kernel_choice()
    if choice == "onednn" or not native.available():
        return False
    return choice == "vnni" or bool(torch.ops.nxcore._linear_vnni_preferred())


def can_pack(dtype: torch.dtype) -> bool:
    if dtype not in PACKABLE or not torch.backends.mkldnn.is_available():
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def amx_preferred() -> bool:
    """Whether `prepack` gives bf16 linears nxcore's AMX copies (nxcore/csrc/amx_linear.cpp): on CPUs
    with AMX-BF16 unless NXSERVE_BF16_LINEAR says `onednn` or `vnni`. `nxcore::linear` runs them up
    to `torch.ops.nxcore._amx_rows()` rows (decode's row counts, where they read the weights faster
    than oneDNN; one row only over short weight rows, see nxcore/csrc/linear.cpp) and oneDNN's
    packed copy beyond; `nxcore::linear_invariant` at every row count."""
    return _kernel_choice() == "auto" and native.available() and bool(torch.ops.nxcore._amx_supported())


def prepack(model: nn.Module) -> int:
    """Pack the weight of every `Linear` in `model` (CPU, packable dtype); returns how many.
    The packed copies are dropped when `model` is garbage-collected."""
    _drop_deferred()
    weights = []
    amx = amx_preferred()
    vnni = vnni_preferred()
    for module in model.modules():
        if not isinstance(module, Linear) or module.weight.device.type != "cpu":
            continue
        weight = module.weight.detach()
        if native.available():
            if amx and torch.ops.nxcore._pack_amx(weight):
                # nxcore::linear runs it for few rows and oneDNN's copy (below) beyond;
                # nxcore::linear_invariant runs it at every row count and never reads oneDNN's
                weights.append(weight)
                if module.invariant:
                    continue
            elif (module.invariant or vnni) and torch.ops.nxcore._pack_invariant(weight):
                # nxcore::linear and nxcore::linear_invariant run on the VNNI copy where there is one
                # (bf16, AVX512-BF16; nxcore/csrc/invariant.cpp) and never read oneDNN's
                weights.append(weight)
                continue
        if can_pack(module.weight.dtype):
            key = _key(weight)
            if key not in _PACKED:
                _PACKED[key] = torch.ops.mkldnn._reorder_linear_weight(weight, None)
                if native.available():
                    torch.ops.nxcore._register_packed(weight, _PACKED[key])
                weights.append(weight)
    if weights:
        weakref.finalize(model, _drop, weights)
    return len({_key(w) for w in weights})


_DEFERRED: list[list[torch.Tensor]] = []
"""Weights of models collected while torch was tracing a graph (see `_drop`)."""


def _drop(weights: list[torch.Tensor]) -> None:
    """Forget the packed copies of `weights` (held until now, so no other tensor can take their
    addresses while they are registered). A model's finalizer runs wherever the garbage collector
    happens to, which can be in the middle of torch.export or torch.compile tracing another model:
    an op called then lands in that graph (strict export then fails on a lifted constant). So while
    torch traces, the weights wait for the next `_drop` or `prepack` that runs outside tracing."""
    _DEFERRED.append(weights)
    if not torch.compiler.is_compiling():
        _drop_deferred()


def _drop_deferred() -> None:
    while _DEFERRED:
        for weight in _DEFERRED.pop():
            _PACKED.pop(_key(weight), None)
            if native.available():
                torch.ops.nxcore._unregister_packed(weight)
                torch.ops.nxcore._unpack_invariant(weight)
                torch.ops.nxcore._unpack_amx(weight)
