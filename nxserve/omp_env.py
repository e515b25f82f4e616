"""OpenMP settings the services apply before torch loads libgomp (which reads them once, at load).

GOMP_SPINCOUNT: how long an OpenMP thread spins after a parallel region before it sleeps. libgomp's
default, 300000 spins (several milliseconds on this project's 2-core AMD VM), suits a process that
has the cores to itself. Prefill and decode services that share cores (one host, `nxserve up`,
`make run`) steal them from each other that way: a context encoding that starts just after a
decode step ran 10-20 ms slower while the decode process's threads still spun. Measured with
`python -m bench.services --model SMALL --dtype bfloat16` (services TTFT over in-process TTFT):
1.12-1.30 at the default, 0.88-1.03 at 100000, 1.01-1.06 at 10000 and 1000; but at 1000 decode
itself slowed (58-63 tokens/s in-process against 71-77), its threads sleeping between steps. A
GOMP_SPINCOUNT (or OMP_WAIT_POLICY) already in the environment is left as it is.
"""

from __future__ import annotations

import os

SERVICE_SPINCOUNT = "100000"


def apply_service_defaults(environ: dict[str, str] | None = None) -> None:
    """Set GOMP_SPINCOUNT for a service process unless the user chose a spin policy; call before
    anything imports torch."""
    env = os.environ if environ is None else environ
    if "GOMP_SPINCOUNT" not in env and "OMP_WAIT_POLICY" not in env:
        env["GOMP_SPINCOUNT"] = SERVICE_SPINCOUNT
