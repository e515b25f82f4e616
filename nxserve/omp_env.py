"""OpenMP settings for engine processes that share a host's cores. libgomp reads them once, when
torch loads it, so they go into the environment a process starts with.

GOMP_SPINCOUNT: how long an OpenMP thread spins after a parallel region before it sleeps. Spinning
makes back-to-back regions cheap for a process that has the cores to itself. Processes whose
threads together outnumber the cores and compute at once steal them from each other that way, and
every barrier then waits for a thread that was descheduled. Measured on this project's 2-core VM
with the 125M llama in bf16 (`nxserve up --decode-replicas 1 --dtype bfloat16 --batch-size 8
--seq-len 512`, then `nxserve bench serve --requests 24 --prompt-len 128 --output-len 32
--concurrency 1,8`), requests/s at concurrency 1 / 8:

    libgomp's default (300000)   1.75 / 1.06
    100000                       1.44 / 1.31
    10000                        1.66-1.89 / 3.14-3.56
    3000                         1.21-1.86 / 3.82-4.66
    1000                         1.08-1.61 / 3.60-4.31
    100                          1.38 / 4.53

Services started together (`LocalCluster`: `nxserve up`, `make run`, the benchmarks and tests) now
take turns computing instead (`nxserve.rpc.turns`): each computes alone, so they keep libgomp's
default, which decodes ~20% faster than 3000. With turns, on an Intel Xeon 2-core VM (the 125M
llama, bf16, `--batch-size 32 --seq-len 512`, `nxserve bench serve --rate 1,inf --requests 48
--prompt-len 128 --output-len 64`): TTFT p50/p99 at 1 request/s, TPOT p50, output tokens/s at once:

    no turns, 3000 (before)      75.8 / 146.5 ms, 23.5 ms, 492
    turns, 300                   70.0 / 134.3 ms, 27.0 ms, 464
    turns, 3000                  65.7 / 123.6 ms, 25.1 ms, 494
    turns, 30000                 52.5 / 98.3 ms,  19.0 ms, 579
    turns, 100000                49.5 / 105.6 ms, 18.6 ms, 612
    turns, libgomp's default     50.6 / 100.8 ms, 19.3 ms, 610

`share_cores` still sets 3000 for processes that compute at once: one engine whose own threads
(--threads times its --tp ranks) outnumber the cores, and launches without turns.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SHARED_CORES_SPINCOUNT = "3000"


def oversubscribed(threads: int, cores: int | None = None) -> bool:
    """Whether `threads` OpenMP threads in all outnumber the host's cores (or `cores`)."""
    return threads > (cores or os.cpu_count() or 1)


def share_cores(environ: MutableMapping[str, str], *, threads: int, cores: int | None = None) -> bool:
    """Set GOMP_SPINCOUNT in `environ` (a child's environment) when `threads` OpenMP threads in all,
    across the processes launched together, outnumber the cores; unless the user chose a spin policy
    (GOMP_SPINCOUNT or OMP_WAIT_POLICY already set). Returns whether it set it."""
    if not oversubscribed(threads, cores) or "GOMP_SPINCOUNT" in environ or "OMP_WAIT_POLICY" in environ:
        return False
    environ["GOMP_SPINCOUNT"] = SHARED_CORES_SPINCOUNT
    return True
