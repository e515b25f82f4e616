"""`make xla-check`: nxcore's xla backend (nxcore/xla.py) on torch-xla's CPU device, against eager.

    PJRT_DEVICE=CPU NXSERVE_NATIVE=0 .cache/xla-venv/bin/python -m bench.xla_check [--archs llama ...] [--json FILE]

It runs in torch-xla's own virtualenv (`make xla-check` builds it: torch 2.9.0 + torch-xla 2.9.0),
on tiny random checkpoints of every architecture (nxserve/testing/model_factory.py), fp32, and
exits non-zero when a check fails:

1. parity, per architecture: eager greedy equals transformers (nxcore on this torch), then the xla
   engine's tokens equal the eager engine's for greedy, seeded sampling (top-k, top-p) and
   speculation with n-gram proposals (greedy and sampled: the speculation graph);
2. static shapes: a continuous-batching workload of 100+ token-generation steps (prompts of
   random lengths, greedy and sampled rows in one batch, 1 to 4 rows, every KV bucket) on which
   torch-xla's metrics show exactly one compilation per graph shape, and, over every run, no
   `aten::` fallback counter;
3. benchmark: median ms per call of each graph shape (steady state, inputs in and tokens out
   included) on the xla backend, on torch-xla's lazy tensors, and eager, all on this CPU.

NXSERVE_NATIVE=0: eager runs the same pure-torch code the XLA programs are traced from (the C++
ops are CPU kernels the xla path never calls).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nxcore import Engine, RequestRng, RuntimeConfig, SamplingParams, SequenceRequest, generate, native, xla
from nxcore.graphs import GraphInputs, GraphKey
from nxcore.speculation import NgramProposer
from nxcore.stopping import StoppingCriteria

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen3_moe")
WINDOWED = {"qwen2": dict(use_sliding_window=True, sliding_window=12, max_window_layers=1), "mistral": dict(sliding_window=12)}
"""Overrides over model_factory's tiny preset so that the sliding-window masks run too (as in tests/conftest.py)."""

PARITY_CONFIG = RuntimeConfig(batch_size=2, ctx_batch_size=1, seq_len=64, buckets=(16,), dtype="float32", max_topk=64, speculation_length=3)
"""Few shapes per architecture (each XLA compilation takes ~5 s here, mostly dynamo's tracing)."""
STATIC_CONFIG = RuntimeConfig(batch_size=4, ctx_batch_size=2, seq_len=128, buckets=(16, 32), dtype="float32", max_topk=64)
"""Context graphs of 1 and 2 rows x 2 buckets, token generation of 1, 2, 4 rows x 3 KV buckets."""
SAMPLED = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=11)


@dataclass
class Recorder:
    """Every graph call of one engine: seconds and XLA compilations during it, by graph shape."""

    count_compilations: bool
    calls: dict[GraphKey, list[tuple[float, int]]] = field(default_factory=lambda: defaultdict(list))

    def attach(self, engine: Engine) -> Engine:
        run = engine.executor.run

        def recorded(key: GraphKey, inputs: GraphInputs) -> tuple[torch.Tensor, ...]:
            before = xla.metrics().compilations if self.count_compilations else 0
            start = time.perf_counter()
            outputs = run(key, inputs)
            elapsed = time.perf_counter() - start
            after = xla.metrics().compilations if self.count_compilations else 0
            self.calls[key].append((elapsed, after - before))
            return outputs

        engine.executor.run = recorded  # type: ignore[method-assign]
        return engine

    def compilations(self) -> dict[str, int]:
        return {str(key): sum(c for _, c in calls) for key, calls in sorted(self.calls.items())}

    def steady_ms(self) -> dict[GraphKey, float]:
        """Median ms per call after each shape's first (compiling) call."""
        return {key: statistics.median(t for t, _ in calls[1:]) * 1000 for key, calls in self.calls.items() if len(calls) > 1}


def load(path: Path, config: RuntimeConfig, backend: str, *, mode: str = "dynamo") -> Engine:
    engine = Engine.from_pretrained(path, config.replace(backend=backend))
    if backend == "xla" and mode != "dynamo":
        executor = engine.executor
        executor.runner = xla.XlaGraphRunner(executor.model, engine.config, mode=mode)  # type: ignore[attr-defined]
    return engine


def make_checkpoint(arch: str, root: Path) -> Path:
    from nxserve.testing.model_factory import make_model

    out = root / arch
    if not (out / "config.json").exists():
        make_model(arch=arch, preset="tiny", out=out, overrides=WINDOWED.get(arch))
    return out


def hf_greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def prompts_of(n: int, *, seed: int, lengths: tuple[int, int], vocab: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def outputs(engine: Engine, prompts: list[list[int]], sampling: Any, max_new: int, proposer: NgramProposer | None = None) -> list[list[int]]:
    stopping = StoppingCriteria(max_new_tokens=max_new, ignore_eos=True)
    return [r.output_ids for r in generate(engine, prompts, sampling=sampling, stopping=stopping, proposer=proposer)]


def parity(arch: str, path: Path) -> dict[str, Any]:
    """Eager against transformers, then xla against eager on greedy, sampled and speculative runs."""
    prompts = prompts_of(2, seed=1, lengths=(5, 12))
    k = PARITY_CONFIG.speculation_length
    runs: dict[str, tuple[Any, NgramProposer | None]] = {
        "greedy": (SamplingParams(), None),
        "sampled": (SAMPLED, None),
        "speculation_greedy": (SamplingParams(), NgramProposer(k)),
        "speculation_sampled": (SAMPLED, NgramProposer(k)),
    }
    tokens: dict[str, dict[str, list[list[int]]]] = {}
    recorders, engines = {}, {}
    for backend in ("eager", "xla"):
        engine = engines[backend] = load(path, PARITY_CONFIG, backend)
        xla.clear_metrics()
        recorders[backend] = Recorder(count_compilations=backend == "xla")
        recorders[backend].attach(engine)
        for name, (sampling, proposer) in runs.items():
            if proposer is not None:
                proposer = NgramProposer(k)  # fresh counters per backend
            tokens.setdefault(name, {})[backend] = outputs(engine, prompts, sampling, 40, proposer)
    handoff = kv_handoff(engines["eager"], engines["xla"], prompts[1])
    hf = hf_greedy(path, prompts[0], 40)
    metrics = xla.metrics()
    result = {
        "eager_equals_transformers": tokens["greedy"]["eager"][0] == hf,
        "kv_handoff_equal": handoff,
        **{f"{name}_equal": pair["xla"] == pair["eager"] for name, pair in tokens.items()},
        "compilations": recorders["xla"].compilations(),
        "compilations_total": metrics.compilations,
        "fallbacks": metrics.fallbacks,
        "graph_calls": sum(len(c) for c in recorders["xla"].calls.values()),
    }
    result["ok"] = _ok(result)
    return result


def kv_handoff(eager: Engine, device: Engine, prompt: list[int], steps: int = 8) -> bool:
    """A prompt encoded on eager, its KV imported into the xla engine (and exported back): the xla
    engine then decodes the tokens eager does, and the exported KV is the imported one."""
    first = eager.context_encode([SequenceRequest(slot=0, token_ids=prompt, sampling=SamplingParams(), rng=RequestRng(0))])[0]
    kv = eager.export_kv(0, len(prompt))
    device.import_kv(1, kv)
    back = device.export_kv(1, len(prompt))
    tokens = {}
    for name, engine, slot in (("eager", eager, 0), ("xla", device, 1)):
        token, tokens[name] = first, []
        for _ in range(steps):
            token = engine.token_generate([SequenceRequest(slot=slot, token_ids=[token], sampling=SamplingParams(), rng=RequestRng(0))])[0]
            tokens[name].append(token)
        engine.free(slot)
    return tokens["xla"] == tokens["eager"] and torch.equal(back.keys, kv.keys) and torch.equal(back.values, kv.values)


def _ok(result: dict[str, Any]) -> bool:
    equal = all(v for k, v in result.items() if k.endswith("_equal") or k.endswith("_transformers"))
    once = all(c == 1 for c in result["compilations"].values()) and result["compilations_total"] == len(result["compilations"])
    return equal and once and not result["fallbacks"]


STATIC_ROUNDS = ((6, 40), (3, 70), (1, 96), (4, 24))
"""(prompts, new tokens each) per `generate` call: 6 prompts in 4 slots, then part-filled batches."""


def static_shapes(path: Path) -> tuple[dict[str, Any], dict[str, Recorder]]:
    """The continuous-batching workload on xla and eager: equal tokens, one compilation per shape."""
    recorders = {}
    tokens = {}
    for backend in ("eager", "xla"):
        engine = load(path, STATIC_CONFIG, backend)
        xla.clear_metrics()
        recorder = recorders[backend] = Recorder(count_compilations=backend == "xla")
        recorder.attach(engine)
        tokens[backend] = []
        for i, (n, max_new) in enumerate(STATIC_ROUNDS):
            prompts = prompts_of(n, seed=100 + i, lengths=(3, 30))
            sampling = [SamplingParams() if j % 2 == 0 else SamplingParams(temperature=0.7, top_k=10 * j, top_p=0.95, seed=j) for j in range(n)]
            tokens[backend].append(outputs(engine, prompts, sampling, max_new))
    metrics = xla.metrics()
    calls = recorders["xla"].calls
    result = {
        "tokens_equal": tokens["xla"] == tokens["eager"],
        "token_generation_steps": sum(len(c) for key, c in calls.items() if key.kind == "token_generation"),
        "compilations": recorders["xla"].compilations(),
        "compilations_total": metrics.compilations,
        "fallbacks": metrics.fallbacks,
    }
    result["ok"] = _ok(result) and result["token_generation_steps"] >= 100
    return result, recorders


def lazy_steady_ms(path: Path) -> dict[GraphKey, float]:
    """The same graphs on torch-xla's lazy tensors (a shorter run: every shape costs a compilation)."""
    engine = load(path, STATIC_CONFIG, "xla", mode="lazy")
    recorder = Recorder(count_compilations=False)
    recorder.attach(engine)
    outputs(engine, prompts_of(4, seed=100, lengths=(3, 30)), SamplingParams(), 40)
    return recorder.steady_ms()


def benchmark(recorders: dict[str, Recorder], lazy: dict[GraphKey, float]) -> list[dict[str, Any]]:
    eager, dynamo = recorders["eager"].steady_ms(), recorders["xla"].steady_ms()
    rows = []
    for key in sorted(dynamo):
        rows.append(
            {
                "graph": str(key),
                "calls": len(recorders["xla"].calls[key]),
                "xla_ms": dynamo[key],
                "lazy_ms": lazy.get(key),
                "eager_ms": eager.get(key),
            }
        )
    return rows


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{report['versions']}")
    print(f"\n{'arch':12}{'greedy':>8}{'sampled':>9}{'spec':>6}{'spec_s':>8}{'kv':>4}{'=hf':>5}{'graphs':>8}{'compiles':>10}  fallbacks")
    for arch, r in report["parity"].items():
        names = (
            "greedy_equal",
            "sampled_equal",
            "speculation_greedy_equal",
            "speculation_sampled_equal",
            "kv_handoff_equal",
            "eager_equals_transformers",
        )
        cells = "".join(f"{'ok' if r[name] else 'FAIL':>{w}}" for name, w in zip(names, (8, 9, 6, 8, 4, 5)))
        print(f"{arch:12}{cells}{len(r['compilations']):>8}{r['compilations_total']:>10}  {r['fallbacks'] or 'none'}")
    s = report["static_shapes"]
    shapes, total = len(s["compilations"]), s["compilations_total"]
    print(f"\nstatic shapes: {s['token_generation_steps']} token-generation steps, {shapes} graph shapes, {total} compilations")
    print(f"  per shape: {s['compilations']}\n  tokens equal to eager: {s['tokens_equal']}, fallbacks: {s['fallbacks'] or 'none'}")
    print(f"\n{'graph (ms per call, median)':44}{'calls':>6}{'xla':>8}{'lazy':>8}{'eager':>8}")
    for row in report["benchmark"]:
        cells = "".join("       -" if row[k] is None else f"{row[k]:8.2f}" for k in ("xla_ms", "lazy_ms", "eager_ms"))
        print(f"{row['graph']:44}{row['calls']:>6}{cells}")
    print(f"\nxla-check: {'PASSED' if report['ok'] else 'FAILED'} in {report['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS, help="architectures of the parity check (default: all)")
    parser.add_argument("--models", type=Path, default=Path(".cache/xla-check/models"), help="where the tiny checkpoints are written once")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads for eager (default: 1; see below)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    native.configure(native.Settings(enabled=False))
    # One thread: on the 2-core machines this was written on, shared with other jobs, eager's
    # OpenMP regions waited on descheduled threads (tiny llama decode 67-160 ms per step at 2
    # threads against 1.5 ms at 1). XLA's CPU runtime keeps its own thread pool.
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report: dict[str, Any] = {"versions": {**xla.describe(), "torch_threads": str(torch.get_num_threads())}}
    report["parity"] = {}
    for arch in args.archs:
        print(f"[xla-check] parity: {arch} ...", file=sys.stderr, flush=True)
        report["parity"][arch] = parity(arch, make_checkpoint(arch, args.models))
    print("[xla-check] static shapes: llama ...", file=sys.stderr, flush=True)
    llama = make_checkpoint("llama", args.models)
    report["static_shapes"], recorders = static_shapes(llama)
    print("[xla-check] lazy tensors ...", file=sys.stderr, flush=True)
    report["benchmark"] = benchmark(recorders, lazy_steady_ms(llama))
    report["ok"] = all(r["ok"] for r in report["parity"].values()) and report["static_shapes"]["ok"]
    report["seconds"] = time.perf_counter() - start
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
