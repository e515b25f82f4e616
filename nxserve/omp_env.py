"""OpenMP settings for engine processes that share a host's cores (`LocalCluster`: `nxserve up`,
`make run`, the benchmarks and tests). libgomp reads them once, when torch loads it, so they go
into the environment a process starts with.

GOMP_SPINCOUNT: how long an OpenMP thread spins after a parallel region before it sleeps. Spinning
makes back-to-back regions cheap for a process that has the cores to itself, so a service on
cores of its own (a Kubernetes pod whose CPU limit matches --threads) keeps libgomp's default.
Prefill and decode processes whose threads together outnumber the cores steal them from each
other that way, and every barrier then waits for a thread that was descheduled. Measured on this
project's 2-core VM with the 125M llama in bf16 (`nxserve up --decode-replicas 1 --dtype bfloat16
--batch-size 8 --seq-len 512`, then `nxserve bench serve --requests 24 --prompt-len 128
--output-len 32 --concurrency 1,8`), requests/s at concurrency 1 / 8:

    libgomp's default (300000)   1.75 / 1.06
    100000                       1.44 / 1.31
    10000                        1.66-1.89 / 3.14-3.56
    3000                         1.21-1.86 / 3.82-4.66
    1000                         1.08-1.61 / 3.60-4.31
    100                          1.38 / 4.53

3000 keeps most of the single-request speed and most of the throughput under load. A process
alone on the cores pays for it: in-process decode of the same model ran at 53-57 tokens/s against
70 with libgomp's default, which is why only oversubscribed launches get it.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SHARED_CORES_SPINCOUNT = "3000"


def share_cores(environ: MutableMapping[str, str], *, threads: int, cores: int | None = None) -> bool:
    """Set GOMP_SPINCOUNT in `environ` (a child's environment) when `threads` OpenMP threads in all,
    across the processes launched together, outnumber the cores; unless the user chose a spin policy
    (GOMP_SPINCOUNT or OMP_WAIT_POLICY already set). Returns whether it set it."""
    cores = cores or os.cpu_count() or 1
    if threads <= cores or "GOMP_SPINCOUNT" in environ or "OMP_WAIT_POLICY" in environ:
        return False
    environ["GOMP_SPINCOUNT"] = SHARED_CORES_SPINCOUNT
    return True
