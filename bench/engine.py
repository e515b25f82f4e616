"""Engine benchmark: decode latency and throughput, prefill time, against transformers and the
memory-bandwidth roofline, in one run.

    python -m bench.engine --model DIR [--backends eager compile] [--json FILE]

- decode at batch 1 (ms/token) and decode throughput at the larger batches (tokens/s), greedy,
  after a prompt of --prompt-len tokens;
- prefill (context encoding incl. the first token) at each --prefill-lens;
- transformers on the same checkpoint and dtype: generate() for decode (cache on, eos ignored;
  its per-token time excludes the prompt's forward) and a forward pass for prefill;
- context encoding's achieved GFLOP/s at each --prefill-lens (`prefill_flops`: the linears' and
  causal attention's multiply-adds) next to this CPU's matmul peak in the same dtype and thread count
  (`matmul_peak`: oneDNN on a packed weight and torch's own `F.linear`, large square shapes);
- this machine's memory bandwidth (a read of a buffer the size of the weights, taken after each
  timed batch-1 decode step, so both see the same machine) and batch-1 decode as a fraction of the
  roofline (weight bytes one step reads, i.e. all but an untied input embedding, over that
  bandwidth).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bench.common import GREEDY, decode_steps, free_all, random_prompts
from nxcore import Engine, RequestRng, RuntimeConfig, SequenceRequest, native
from nxcore.model_config import ModelConfig
from nxcore.modules import linear as linear_module


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Bandwidth:
    """Read bandwidth: the time to sum a buffer of n_bytes (the weights' size). `read()` takes one
    reading; the benchmark takes one after each timed batch-1 decode step, so the roofline is
    measured under the same conditions as the decode it is compared with (on a shared machine the
    bandwidth drifts by tens of percent over a minute)."""

    def __init__(self, n_bytes: int) -> None:
        self.n_bytes = n_bytes
        self._buf = torch.ones(max(n_bytes // 4, 1), dtype=torch.float32)
        self._buf.sum()  # pages touched, threads up
        self.readings: list[float] = []

    def read(self) -> None:
        start = time.perf_counter()
        self._buf.sum()
        self.readings.append(self.n_bytes / (time.perf_counter() - start) / 1e9)

    def gb_s(self) -> float:
        """Median of the readings since the last call, which clears them."""
        readings, self.readings = self.readings, []
        return statistics.median(readings)


def bytes_read_per_token(model: torch.nn.Module) -> int:
    """Weight bytes a batch-1 decode step reads: every parameter once (`named_parameters()` yields
    a tied one once), except the input embedding table, of which a step reads one row per sequence
    (unless it is tied to the LM head), and, in a mixture of experts, only the num_experts_per_tok
    experts the token is routed to (nxcore gathers those at batch 1): expert weights (parameters
    under an `experts` module) count k / num_experts of their bytes. Works on a meta-device model:
    only shapes are used."""
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    cfg = model.config
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    routed = getattr(cfg, "num_experts_per_tok", None)
    share = routed / experts if experts and routed else 1.0
    total = 0.0
    for name, p in model.named_parameters():
        if p is embedding and not tied:
            continue
        nbytes = p.numel() * p.element_size()
        total += nbytes * share if ".experts." in f".{name}" else nbytes
    return round(total)


def prefill_flops(cfg: ModelConfig, length: int) -> float:
    """Floating-point operations of one context encoding of `length` tokens: every linear's
    2 x rows x in x out (the MoE layers' routed experts only), causal attention's two products
    (2 x 2 x heads x head_dim per query-key pair, the pairs at or below the diagonal), and the LM
    head on the last token. Norms, rotary and activations are left out (a few per cent)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attn_proj = cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size
    dense_mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    moe_mlp = cfg.num_experts_per_tok * 3 * cfg.hidden_size * cfg.moe_intermediate_size + cfg.hidden_size * cfg.num_experts
    moe = cfg.moe_layers or (False,) * cfg.num_layers
    weights = sum(attn_proj + (moe_mlp if is_moe else dense_mlp) for is_moe in moe)
    pairs = length * (length + 1) // 2
    attention = cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim * pairs
    return 2.0 * length * weights + attention + 2.0 * cfg.hidden_size * cfg.vocab_size


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """This CPU's matmul GFLOP/s in `dtype` at torch's current thread count, [size, size] x
    [size, size]: oneDNN on a weight packed once (`mkldnn._linear_pointwise`, what nxcore's bf16
    linears run) where oneDNN takes the dtype, and torch's `F.linear`. Median of `repeats`."""
    x = torch.randn(size, size).to(dtype)
    w = torch.randn(size, size).to(dtype)
    flops = 2.0 * size**3
    out = {"F.linear": flops / _median_time(lambda: torch.nn.functional.linear(x, w), repeats) / 1e9}
    if dtype == torch.bfloat16 and linear_module.can_pack(dtype):
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        out["oneDNN packed"] = flops / _median_time(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), repeats) / 1e9
    return out


def decode_ms_per_step(engine: Engine, batch: int, prompt_len: int, steps: int, between: Callable[[], object] | None = None) -> float:
    prompts = random_prompts(batch, prompt_len, engine.model_config.vocab_size)
    ms, requests = decode_steps(engine, prompts, steps, between)
    free_all(engine, requests)
    return ms


def prefill_ms(engine: Engine, length: int, repeats: int) -> float:
    prompt = random_prompts(1, length, engine.model_config.vocab_size)[0]

    def once() -> None:
        engine.context_encode([SequenceRequest(slot=0, token_ids=prompt, sampling=GREEDY, rng=RequestRng(0))])
        engine.free(0)

    return _median_time(once, repeats) * 1000


@torch.no_grad()
def hf_decode_ms_per_token(model, batch: int, prompt_len: int, steps: int) -> float:
    ids = torch.tensor(random_prompts(batch, prompt_len, model.config.vocab_size))
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        return time.perf_counter() - start

    run(2)
    return (run(steps + 1) - run(1)) / steps * 1000  # the prompt's forward cancels out


@torch.no_grad()
def hf_prefill_ms(model, length: int, repeats: int) -> float:
    ids = torch.tensor(random_prompts(1, length, model.config.vocab_size))
    return _median_time(lambda: model(ids, use_cache=True), repeats) * 1000


def bench_backend(args: argparse.Namespace, backend: str, max_len: int, bandwidth: Bandwidth) -> dict:
    config = RuntimeConfig(batch_size=max(args.batches), ctx_batch_size=1, seq_len=max_len, dtype=args.dtype, backend=backend)
    print(f"[{backend}] loading {args.model} ...", file=sys.stderr)
    start = time.perf_counter()
    # compile: graphs come from the artifact cache; the ones this run uses and the cache lacks are
    # compiled on first use, during the untimed warm-up call of each measurement.
    engine = Engine.from_pretrained(args.model, config, compile_cache=args.compile_cache, compile_on_demand=True)
    out = {"decode_ms": {}, "throughput_tok_s": {}, "prefill_ms": {}, "load_s": time.perf_counter() - start}
    for i, batch in enumerate(args.batches):
        print(f"[{backend}] decode at batch {batch} ...", file=sys.stderr)
        ms = decode_ms_per_step(engine, batch, args.prompt_len, args.steps, bandwidth.read if i == 0 else None)
        out["decode_ms"][batch], out["throughput_tok_s"][batch] = ms, batch * 1000 / ms
        if i == 0:
            out["bandwidth_gb_s"] = bandwidth.gb_s()
            out["roofline_ms"] = bandwidth.n_bytes / out["bandwidth_gb_s"] / 1e6
    out["prefill_gflop_s"] = {}
    for length in args.prefill_lens:
        print(f"[{backend}] prefill {length} tokens ...", file=sys.stderr)
        out["prefill_ms"][length] = prefill_ms(engine, length, args.repeats)
        out["prefill_gflop_s"][length] = prefill_flops(engine.model_config, length) / out["prefill_ms"][length] / 1e6
    engine.close()
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's flags (shared with `nxserve bench engine`)."""
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument(
        "--backends", nargs="+", default=["eager", "compile"], choices=["eager", "compile"], help="graph backends to measure (default: eager compile)"
    )
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="engine and transformers dtype (default: bfloat16)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="decode batch sizes; the first is the latency one (default: 1 8 32)")
    p.add_argument("--prefill-lens", type=int, nargs="+", default=[128, 512, 2048], help="prompt lengths to time prefill at (default: 128 512 2048)")
    p.add_argument("--prompt-len", type=int, default=128, help="context before decoding (default: 128)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps (default: 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed prefill calls (default: 3)")
    p.add_argument(
        "--compile-cache",
        type=Path,
        default=Path(".cache/compiled"),
        help="compiled-artifact cache for the compile backend; graphs it lacks are compiled on first use (default: .cache/compiled)",
    )
    p.add_argument("--no-hf", action="store_true", help="skip transformers (the baseline column)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")


def main(argv: list[str] | None = None) -> int:
    native.configure_from(os.environ)  # an entry point: NXSERVE_NATIVE* are read here
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    max_len = max([*args.prefill_lens, args.prompt_len + args.steps + 2])
    dtype = getattr(torch, args.dtype)
    with torch.device("meta"):  # shapes only, to count the bytes
        weight_bytes = bytes_read_per_token(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model), dtype=dtype))
    bandwidth = Bandwidth(weight_bytes)
    results = {backend: bench_backend(args, backend, max_len, bandwidth) for backend in args.backends}
    del bandwidth
    print("matmul peak ...", file=sys.stderr)
    peak = matmul_peak(dtype)
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    hf_res = {"decode_ms": {}, "throughput_tok_s": {}, "prefill_ms": {}}
    if not args.no_hf:
        for batch in args.batches:
            print(f"[transformers] decode at batch {batch} ...", file=sys.stderr)
            ms = hf_decode_ms_per_token(hf, batch, args.prompt_len, args.steps)
            hf_res["decode_ms"][batch], hf_res["throughput_tok_s"][batch] = ms, batch * 1000 / ms
        for length in args.prefill_lens:
            hf_res["prefill_ms"][length] = hf_prefill_ms(hf, length, args.repeats)

    b1, big = args.batches[0], args.batches[-1]
    print(
        f"\n{args.model} ({hf.config.model_type}, {args.dtype}); weights read per token {weight_bytes / 1e6:.3g} MB; "
        "roofline = those bytes at the read bandwidth measured between the timed batch-1 decode steps"
    )
    header = f"{'':28}" + "".join(f"{b:>12}" for b in args.backends)
    if not args.no_hf:
        header += f"{'transformers':>14}" + "".join(f"{b + ' speedup':>16}" for b in args.backends)
    print(header)

    def row(label: str, key: str, sub: int, *, higher_is_better: bool = False) -> None:
        cells = "".join(f"{results[b][key][sub]:12.2f}" for b in args.backends)
        if not args.no_hf:
            ref = hf_res[key][sub]
            cells += f"{ref:14.2f}"
            for b in args.backends:  # > 1: faster than transformers
                ours = results[b][key][sub]
                cells += f"{(ours / ref if higher_is_better else ref / ours):15.2f}x"
        print(f"{label:28}{cells}")

    row(f"decode b{b1} (ms/token)", "decode_ms", b1)
    for batch in args.batches:
        row(f"throughput b{batch} (tok/s)", "throughput_tok_s", batch, higher_is_better=True)
    for length in args.prefill_lens:
        row(f"prefill {length} (ms)", "prefill_ms", length)
    best_peak = max(peak.values())
    print(f"matmul peak ({args.dtype}, {torch.get_num_threads()} threads, 2048^3): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items()))
    for b in args.backends:
        cells = ", ".join(f"{n}: {g:.0f} GFLOP/s ({g / best_peak:.0%})" for n, g in results[b]["prefill_gflop_s"].items())
        print(f"{b}: context encoding achieves {cells} of the matmul peak")
    for b in args.backends:
        r = results[b]
        ratio = f", {hf_res['decode_ms'][b1] / r['decode_ms'][b1]:.2f}x transformers" if not args.no_hf else ""
        print(
            f"{b}: decode b{b1} at {r['roofline_ms'] / r['decode_ms'][b1]:.0%} of the roofline "
            f"({r['bandwidth_gb_s']:.1f} GB/s, {r['roofline_ms']:.2f} ms/token){ratio}; engine loaded in {r['load_s']:.1f}s"
        )
    if args.json:
        best = min(args.backends, key=lambda b: results[b]["decode_ms"][b1])
        r = results[best]
        args.json.write_text(
            json.dumps(
                {
                    "model": str(args.model),
                    "dtype": args.dtype,
                    "backend": best,
                    "decode_b1_ms": r["decode_ms"][b1],
                    "roofline_b1_ms": r["roofline_ms"],
                    "hf_decode_b1_ms": hf_res["decode_ms"].get(b1),
                    f"throughput_b{big}_tok_s": r["throughput_tok_s"][big],
                    f"hf_throughput_b{big}_tok_s": hf_res["throughput_tok_s"].get(big),
                    "prefill_ms": r["prefill_ms"],
                    "hf_prefill_ms": hf_res["prefill_ms"],
                    "bandwidth_gb_s": r["bandwidth_gb_s"],
                    "prefill_gflop_s": r["prefill_gflop_s"],
                    "matmul_peak_gflop_s": peak,
                    "backends": results,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
