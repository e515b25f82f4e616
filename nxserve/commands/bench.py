"""`nxserve bench engine` and `nxserve bench serve`: the benchmarks in bench/, with their own flags.

The benchmarks live in the source checkout's bench/ package (not installed with nxserve); its
modules build the flags and run, this module only mounts them under `nxserve bench`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _bench_module(name: str) -> ModuleType:
    """bench.NAME, importable from any directory when nxserve runs from a source checkout."""
    if (_PROJECT_ROOT / "bench" / "__init__.py").is_file() and str(_PROJECT_ROOT) not in sys.path:
        sys.path.append(str(_PROJECT_ROOT))
    return importlib.import_module(f"bench.{name}")


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks: the engine in-process, or a running server under load",
        description="Benchmarks. `engine` times decode and prefill in-process against transformers and the "
        "memory-bandwidth roofline; `serve` drives a running nxserve with Poisson or fixed-concurrency load "
        "and reports TTFT, TPOT, end-to-end latency and throughput. `nxserve bench BENCHMARK --help` lists its flags.",
    )
    benchmarks = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, summary in (
        ("engine", "decode latency/throughput and prefill time in-process, next to transformers and the roofline"),
        ("serve", "load generator for a running server: latency percentiles and throughput per rate or concurrency"),
    ):
        module = _bench_module(name)
        b = benchmarks.add_parser(name, help=summary, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(b)
        b.set_defaults(func=module.run)
