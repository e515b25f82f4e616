"""What `bench serve` reports: per-run figures from per-request outcomes, a table, PNG plots."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Outcome:
    """One request as the client saw it; `error` is the gRPC status code name of a failed one."""

    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None  # sending to the first generated token
    e2e_s: float  # sending to the end of the stream (or the error)
    finish_reason: str | None = None
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Seconds per output token after the first (None with fewer than two tokens)."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def load_label(load: dict[str, float]) -> str:
    if "rate" in load:
        return f"rate {load['rate']:g}/s" if math.isfinite(load["rate"]) else "all at once"
    return f"concurrency {load['concurrency']:g}"


def _ms_stats(seconds: Sequence[float]) -> dict[str, float | None]:
    """mean and percentiles in milliseconds (None when there are no samples)."""
    keys = ["mean", *(f"p{q}" for q in PERCENTILES)]
    if not seconds:
        return dict.fromkeys(keys)
    ms = np.asarray(seconds) * 1000
    return dict(zip(keys, [float(ms.mean()), *(float(x) for x in np.percentile(ms, PERCENTILES))]))


def summarize(load: dict[str, float], outcomes: Sequence[Outcome], duration_s: float) -> dict[str, Any]:
    """The figures of one run (see bench/serve.py for the keys)."""
    ok = [o for o in outcomes if o.error is None]
    errors = Counter(o.error for o in outcomes if o.error is not None)
    output_tokens = sum(o.output_tokens for o in ok)
    return {
        "load": {k: v if math.isfinite(v) else "inf" for k, v in load.items()},
        "label": load_label(load),
        "requests": len(outcomes),
        "completed": len(ok),
        "errors": sum(errors.values()),
        "errors_by_code": dict(sorted(errors.items())),
        "finish_reasons": dict(sorted(Counter(str(o.finish_reason) for o in ok).items())),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_token_throughput": output_tokens / duration_s if duration_s > 0 else 0.0,
        "prompt_tokens": sum(o.prompt_tokens for o in ok),
        "output_tokens": output_tokens,
        "ttft_ms": _ms_stats([o.ttft_s for o in ok if o.ttft_s is not None]),
        "tpot_ms": _ms_stats([o.tpot_s for o in ok if o.tpot_s is not None]),
        "e2e_ms": _ms_stats([o.e2e_s for o in ok]),
        "per_request": [
            {
                "ttft_ms": None if o.ttft_s is None else o.ttft_s * 1000,
                "tpot_ms": None if o.tpot_s is None else o.tpot_s * 1000,
                "e2e_ms": o.e2e_s * 1000,
                "prompt_tokens": o.prompt_tokens,
                "output_tokens": o.output_tokens,
                "error": o.error,
            }
            for o in outcomes
        ],
    }


def format_table(report: dict[str, Any]) -> str:
    """One row per run: counts, throughputs, and TTFT / TPOT / E2E percentiles in ms."""
    w = report["workload"]
    model = report["model"]
    about = f"{model['model']} ({model['architecture']}, {model['dtype']})" if model else "model unknown"
    lines = [
        f"target {report['target']}: {about}",
        f"{w['requests']} requests per run, prompt {w['prompt_len']} {'tokens' if w['prompt'] == 'ids' else 'words'}, "
        f"output {w['output_len']} tokens, temperature {w['temperature']:g}",
        *([w["description"]] if w["description"] else []),
        "",
        f"{'':18}{'':>9}{'':>8}{'':>10}" + "".join(f"{name + ' (ms)':^24}" for name in ("TTFT", "TPOT", "E2E")),
        f"{'load':18}{'ok/reqs':>9}{'req/s':>8}{'out tok/s':>10}" + "".join(f"{'p' + str(q):>8}" for q in PERCENTILES) * 3,
    ]
    for run in report["runs"]:
        cells = "".join(_cell(run[key][f"p{q}"]) for key in ("ttft_ms", "tpot_ms", "e2e_ms") for q in PERCENTILES)
        lines.append(
            f"{run['label']:18}{run['completed']:>4}/{run['requests']:<4}{run['request_throughput']:8.2f}"
            f"{run['output_token_throughput']:10.1f}{cells}"
        )
    for run in report["runs"]:
        if run["errors"]:
            codes = ", ".join(f"{code} x{n}" for code, n in run["errors_by_code"].items())
            lines.append(f"errors at {run['label']}: {codes}")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return f"{'-':>8}" if value is None else f"{value:8.1f}"


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """latency_cdf.png (TTFT and E2E, a line per run) and, when several loads were run,
    throughput.png (request and output-token throughput against the offered load)."""
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # not its font-cache notes
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "latency_cdf.png"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "ttft_ms", "time to first token"), (axes[1], "e2e_ms", "end-to-end latency")):
        for run in report["runs"]:
            values = np.sort([r[key] for r in run["per_request"] if r["error"] is None and r[key] is not None])
            if len(values):
                ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=run["label"])
        ax.set(title=title, xlabel="ms", ylabel="fraction of requests", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(written[0], dpi=100)
    plt.close(fig)
    points = [(float(r["load"].get("rate", r["load"].get("concurrency"))), r) for r in report["runs"]]
    points = [(x, r) for x, r in points if math.isfinite(x)]
    if len(points) > 1:
        written.append(out_dir / "throughput.png")
        _throughput_plot(points, "rate" in report["runs"][0]["load"], written[-1], plt)
    return written


def _throughput_plot(points: list[tuple[float, dict]], by_rate: bool, path: Path, plt) -> None:
    xs = [x for x, _ in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(xs, [r["request_throughput"] for _, r in points], "o-", label="achieved")
    if by_rate:
        left.plot(xs, xs, "--", color="grey", label="offered")
    right.plot(xs, [r["output_token_throughput"] for _, r in points], "o-")
    xlabel = "offered rate (requests/s)" if by_rate else "concurrency (requests in flight)"
    left.set(title="request throughput", xlabel=xlabel, ylabel="requests/s")
    right.set(title="output token throughput", xlabel=xlabel, ylabel="tokens/s")
    left.legend(fontsize="small")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
