"""Serving benchmark: a load generator for a running nxserve (the public gRPC API).

    nxserve bench serve --target HOST:PORT --rate 1,2,4 --requests 64 --prompt-len 32..512 --output-len 128
    nxserve bench serve --target HOST:PORT --workload bench/workloads/small-batch32.json --json out.json
    python -m bench.serve ...                       (the same)

Each rate (Poisson arrivals) or concurrency (requests kept in flight) is one run over the same
requests. Per run: TTFT, TPOT (time per output token after the first) and end-to-end latency at
p50/p90/p99, request and output-token throughput, errors by gRPC status code. Prints a table;
--json writes everything (per-request samples included), --plot-dir writes latency_cdf.png and,
for a sweep, throughput.png. Exits 2 when no request completed.

A workload file (bench/workloads/*.json) is one JSON object; every key is optional and flags
given on the command line win (a --rate or --concurrency flag replaces both keys):

    description   text printed with the results
    requests      requests per run (default 100)
    prompt_len    prompt tokens: 128 (fixed), "32..512" (uniform), "256+-64" (normal, clipped to
                  3 std) (default 128); for text prompts, words
    output_len    max_new_tokens per request, same forms (default 128)
    prompt        "ids" (random token ids 4..vocab) or "text" (random English words) (default "ids")
    rate          Poisson arrival rate(s) in requests/s: 2 or [1, 2, 4]; "inf" sends all at once
    concurrency   or requests kept in flight: 32 or [1, 8, 32] (neither key: concurrency 1)
    temperature, top_k, top_p   sampling (default 0 = greedy, 0, 1)
    ignore_eos    generate exactly max_new_tokens (default true)
    seed          prompts, lengths, arrival times, sampling seeds (default 0)
    warmup        requests sent one by one before the runs, not measured (default 1)
    timeout       deadline per request in seconds (default null: none)
    stream_interval   generated tokens per streamed message at least (default 0: the server's)

JSON output: {"target", "model" (ModelInfo fields or null), "workload" (the values used),
"runs": [{"load": {"rate": R} | {"concurrency": N}, "label", "requests", "completed", "errors",
"errors_by_code": {CODE: n}, "finish_reasons", "duration_s", "request_throughput" (completed/s),
"output_token_throughput" (tokens/s), "prompt_tokens", "output_tokens", "ttft_ms", "tpot_ms",
"e2e_ms" (each {"mean", "p50", "p90", "p99"}, null without samples), "per_request": [...]}]}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from bench.serve_report import Outcome, format_table, load_label, summarize, write_plots
from bench.workload import FALLBACK_VOCAB, Lengths, Request, Workload
from nxserve.client import AsyncClient

DEFAULTS = Workload()


def _list_of(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s such as 1,2,4, got {text!r}") from None

    return parse


def _lengths(text: str) -> Lengths:
    try:
        return Lengths.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's flags (shared with `nxserve bench serve`); workload flags default to None (unset)."""
    p.add_argument("--target", default="127.0.0.1:50051", metavar="HOST:PORT", help="public (prefill) address (default: 127.0.0.1:50051)")
    p.add_argument("--workload", type=Path, metavar="FILE", help="workload JSON file (bench/workloads/); flags override its keys")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every figure (and per-request samples) to this file")
    p.add_argument("--plot-dir", type=Path, metavar="DIR", help="write latency_cdf.png and, for a sweep, throughput.png here")
    g = p.add_argument_group("workload (defaults: the workload file's, else these)")
    g.add_argument("--requests", type=int, help=f"requests per run (default: {DEFAULTS.requests})")
    g.add_argument(
        "--prompt-len",
        type=_lengths,
        metavar="N|LO..HI|MEAN+-STD",
        help=f"prompt tokens per request: fixed, uniform or normal (default: {DEFAULTS.prompt_len})",
    )
    g.add_argument(
        "--output-len", type=_lengths, metavar="N|LO..HI|MEAN+-STD", help=f"max new tokens per request, same forms (default: {DEFAULTS.output_len})"
    )
    g.add_argument("--prompt", choices=["ids", "text"], help="random token ids, or random words the server tokenizes (default: ids)")
    g.add_argument(
        "--rate", type=_list_of(float), metavar="R[,R...]", help="Poisson arrival rates in requests/s, one run each; inf sends all at once"
    )
    g.add_argument(
        "--concurrency", type=_list_of(int), metavar="N[,N...]", help="or: requests kept in flight, one run each (default without --rate: 1)"
    )
    g.add_argument("--temperature", type=float, help="0 is greedy (default: 0)")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens; 0 = the server's width (default: 0)")
    g.add_argument("--top-p", type=float, help="nucleus threshold in (0, 1] (default: 1)")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, help="generate exactly the output length (default: yes)")
    g.add_argument("--seed", type=int, help="prompts, lengths, arrivals and sampling seeds (default: 0)")
    g.add_argument("--warmup", type=int, help=f"unmeasured requests sent first, one by one (default: {DEFAULTS.warmup})")
    g.add_argument("--timeout", type=float, help="deadline per request in seconds (default: none)")
    g.add_argument(
        "--stream-interval",
        type=int,
        metavar="N",
        help="generated tokens per streamed message at least; TTFT is still the first token's (default: 0, the server's)",
    )


def workload_from_args(args: argparse.Namespace) -> Workload:
    """The workload file's values (if any) with the flags that were given on top."""
    values = json.loads(args.workload.read_text()) if args.workload else {}
    if not isinstance(values, dict):
        raise ValueError(f"{args.workload}: a workload file holds one JSON object")
    keys = (
        "requests",
        "prompt_len",
        "output_len",
        "prompt",
        "rate",
        "concurrency",
        "temperature",
        "top_k",
        "top_p",
        "ignore_eos",
        "seed",
        "warmup",
        "timeout",
        "stream_interval",
    )
    flags = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if "rate" in flags or "concurrency" in flags:
        values.pop("rate", None)
        values.pop("concurrency", None)
    return Workload.from_dict({**values, **flags})


async def _send(client: AsyncClient, request: Request, w: Workload) -> Outcome:
    start = time.perf_counter()
    try:
        r = await client.generate_text(
            request.prompt,
            max_new_tokens=request.max_new_tokens,
            temperature=w.temperature,
            top_k=w.top_k,
            top_p=w.top_p,
            seed=request.seed,
            ignore_eos=w.ignore_eos,
            stream_interval=w.stream_interval,
        )
    except grpc.RpcError as exc:
        return Outcome(prompt_tokens=0, output_tokens=0, ttft_s=None, e2e_s=time.perf_counter() - start, error=exc.code().name)
    prompt_tokens = r.usage.prompt_tokens if r.usage else len(r.prompt_ids)
    return Outcome(prompt_tokens=prompt_tokens, output_tokens=len(r.output_ids), ttft_s=r.ttft_s, e2e_s=r.elapsed_s, finish_reason=r.finish_reason)


class _Progress:
    """A tqdm bar on a terminal; otherwise a line on stderr every `every_s` seconds."""

    def __init__(self, label: str, total: int, every_s: float = 10.0) -> None:
        from tqdm import tqdm

        self.label, self.total, self.done, self.every_s = label, total, 0, every_s
        self.last = time.monotonic()
        self.bar = tqdm(total=total, desc=label, unit="req", leave=False) if sys.stderr.isatty() else None

    def update(self, outcome: Outcome) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif time.monotonic() - self.last >= self.every_s and self.done < self.total:
            self.last = time.monotonic()
            print(f"[{self.label}] {self.done}/{self.total} requests done", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def _run_at_rate(
    client: AsyncClient, requests: Sequence[Request], offsets: Sequence[float], w: Workload, done: Callable[[Outcome], None]
) -> list[Outcome]:
    async def one(request: Request) -> Outcome:
        outcome = await _send(client, request, w)
        done(outcome)
        return outcome

    start, tasks = time.perf_counter(), []
    for request, at in zip(requests, offsets):
        if (delay := start + at - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(request)))
    return list(await asyncio.gather(*tasks))


async def _run_at_concurrency(
    client: AsyncClient, requests: Sequence[Request], n: int, w: Workload, done: Callable[[Outcome], None]
) -> list[Outcome]:
    outcomes: list[Outcome | None] = [None] * len(requests)
    pending = iter(enumerate(requests))  # shared by the workers: each takes the next request

    async def worker() -> None:
        for i, request in pending:
            outcomes[i] = await _send(client, request, w)
            done(outcomes[i])

    await asyncio.gather(*(worker() for _ in range(min(n, len(requests)))))
    return outcomes


async def _model_info(client: AsyncClient) -> dict[str, Any] | None:
    try:
        return await client.model_info(timeout=30)
    except grpc.RpcError as exc:
        print(
            f"bench serve: warning: ModelInfo on {client.target} failed ({exc.code().name}: {exc.details()}); "
            f"token ids are drawn below {FALLBACK_VOCAB}",
            file=sys.stderr,
        )
        return None


async def bench(target: str, w: Workload) -> dict[str, Any]:
    """Run every load of the workload against `target`; the report that --json writes."""
    async with AsyncClient(target, timeout=w.timeout) as client:
        info = await _model_info(client)
        requests = w.make_requests(info["vocab_size"] if info else FALLBACK_VOCAB)
        for request in requests[: w.warmup]:
            warm = await _send(client, Request(request.prompt, min(request.max_new_tokens, 4), request.seed), w)
            if warm.error:
                print(f"bench serve: warning: warm-up request failed: {warm.error}", file=sys.stderr)
        runs = []
        for load in w.loads:
            label = load_label(load)
            progress = _Progress(label, len(requests))
            start = time.perf_counter()
            if "rate" in load:
                outcomes = await _run_at_rate(client, requests, w.arrival_offsets(load["rate"]), w, progress.update)
            else:
                outcomes = await _run_at_concurrency(client, requests, int(load["concurrency"]), w, progress.update)
            duration = time.perf_counter() - start
            progress.close()
            runs.append(summarize(load, outcomes, duration))
            print(f"[{label}] {runs[-1]['completed']} of {len(requests)} requests completed in {duration:.1f}s", file=sys.stderr, flush=True)
    return {"target": target, "model": info, "workload": w.to_dict(), "runs": runs}


def run(args: argparse.Namespace) -> int:
    workload = workload_from_args(args)
    report = asyncio.run(bench(args.target, workload))
    print(format_table(report), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot_dir:
        for path in write_plots(report, args.plot_dir):
            print(f"wrote {path}", file=sys.stderr)
    if not any(r["completed"] for r in report["runs"]):
        print(f"bench serve: error: no request completed against {args.target}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"bench serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
