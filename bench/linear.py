"""Linear-layer benchmark: one decode step's chain of linears, per kernel, against this machine's
read bandwidth, in one run.

    python -m bench.linear [--model DIR] [--rows 1 2 4 8 16] [--rounds 8]

For every linear a decode step of the engine runs (fused qkv, o, fused gate-up, down per layer,
then the LM head: `nxcore.modules`), with random bf16 weights of the checkpoint's shapes (default: the TinyLlama shape), it
times the whole chain at each row count (tokens in the step) through:
- `nxcore::linear`, the op the engine calls (C++ GEMV up to `torch.ops.nxcore._gemv_rows()` rows,
  on CPUs with AMX nxcore's AMX kernel up to `torch.ops.nxcore._amx_rows()`, oneDNN packed beyond;
  the Python op where the C++ ops are not built);
- oneDNN on the weights packed once (`mkldnn::_linear_pointwise`);
- on CPUs with AMX, nxcore's AMX kernel at every row count (`nxcore::amx_linear`, the copies
  `prepack` made);
- `F.linear` on the dense weights;
- the C++ GEMV forced on (for row counts it takes, 1 and 2), streaming one weight row at a time
  and eight (`torch.ops.nxcore._set_gemv_streams`), whichever the vendor's default is.
Rounds interleave the kernels, so a noisy machine slows them alike; each figure is the median.
Bandwidth is a `torch.sum` of a buffer the size of the chain's weights, timed in the same rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch.nn import functional as F
from transformers import AutoConfig

from nxcore import native
from nxcore.modules import linear as nx_linear

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)


def chain_shapes(cfg: dict) -> list[tuple[int, int]]:
    """(out_features, in_features) of every linear one decode step runs, in order."""
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim
    layer = [(q + 2 * kv, hidden), (hidden, q), (2 * inter, hidden), (hidden, inter)]
    return layer * cfg["num_hidden_layers"] + [(cfg["vocab_size"], hidden)]


def main(argv: list[str] | None = None) -> int:
    native.configure_from(os.environ)  # an entry point: NXSERVE_NATIVE* are read here
    parser = argparse.ArgumentParser(prog="python -m bench.linear", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder whose config.json gives the shapes (default: TinyLlama shape)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="tokens per step to time")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds (median reported)")
    args = parser.parse_args(argv)
    if not nx_linear.can_pack(torch.bfloat16):
        print("this CPU's oneDNN has no bfloat16 support: nothing to compare", file=sys.stderr)
        return 1
    cfg = AutoConfig.from_pretrained(args.model).to_dict() if args.model else TINYLLAMA
    shapes = chain_shapes(cfg)
    torch.manual_seed(0)
    print(f"building {len(shapes)} random bf16 weights ...", file=sys.stderr, flush=True)
    weights = [torch.randn(n, k, dtype=torch.bfloat16) / k**0.5 for n, k in shapes]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
    n_bytes = sum(w.numel() * w.element_size() for w in weights)
    buf = torch.ones(n_bytes // 4, dtype=torch.float32)
    status = native.load()
    op_name = "nxcore::linear (C++)" if status is None else "nxcore::linear (Python)"
    print(f"{len(shapes)} linears, {n_bytes / 1e6:.0f} MB of weights; {op_name}" + ("" if status is None else f": {status}"))

    def chain(kernel, rows: int, gemv_streams: int | None = None):
        """The chain through `kernel`; with `gemv_streams`, nxcore::linear with the C++ GEMV on at
        that many streams for the chain's duration."""
        inputs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k in {k for _, k in shapes}}

        def run() -> None:
            if gemv_streams is None:
                for i, w in enumerate(weights):
                    kernel(inputs[w.shape[1]], i)
                return
            before = (torch.ops.nxcore._set_gemv_rows(native.GEMV_MAX_ROWS), torch.ops.nxcore._set_gemv_streams(gemv_streams))
            try:
                for i, w in enumerate(weights):
                    kernel(inputs[w.shape[1]], i)
            finally:
                torch.ops.nxcore._set_gemv_rows(before[0])
                torch.ops.nxcore._set_gemv_streams(before[1])

        return run

    kernels = {
        op_name: lambda x, i: torch.ops.nxcore.linear(x, weights[i], None),
        "oneDNN packed": lambda x, i: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], ""),
        "F.linear": lambda x, i: F.linear(x, weights[i]),
    }
    model = torch.nn.Module()  # registers the packed copies with the op for the oneDNN path beyond the GEMV rows
    for i, w in enumerate(weights):
        lin = nx_linear.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16).requires_grad_(False)
        lin.weight.data = w
        model.add_module(f"l{i}", lin)
    nx_linear.prepack(model)
    if status is None and torch.ops.nxcore._amx_packed_count() > 0:
        kernels["AMX (nxcore)"] = lambda x, i: torch.ops.nxcore.amx_linear(x, weights[i], None)
    print(f"{'rows':>4} {'kernel':<26} {'ms/step':>8} {'GB/s':>7} {'of bw':>6}")
    for rows in args.rows:
        fns = {name: chain(kernel, rows) for name, kernel in kernels.items()}
        if status is None and rows <= native.GEMV_MAX_ROWS and torch.ops.nxcore._gemv_supported():
            for streams in (1, 8):
                fns[f"C++ GEMV, {streams} stream{'s' if streams > 1 else ''}"] = chain(kernels[op_name], rows, gemv_streams=streams)
        times: dict[str, list[float]] = {name: [] for name in ["bandwidth", *fns]}
        for _ in range(args.rounds):
            for name, fn in [("bandwidth", buf.sum), *fns.items()]:
                fn()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        bw = n_bytes / statistics.median(times["bandwidth"]) / 1e9
        for name in fns:
            t = statistics.median(times[name])
            print(f"{rows:>4} {name:<26} {t * 1e3:8.1f} {n_bytes / t / 1e9:7.1f} {n_bytes / t / 1e9 / bw:6.0%}")
        print(f"{rows:>4} {'torch.sum (bandwidth)':<26} {n_bytes / bw / 1e6:8.1f} {bw:7.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
