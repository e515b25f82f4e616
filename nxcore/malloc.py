"""glibc's malloc, set up for an engine's large temporaries.

Context encoding of many rows makes activations of tens of MiB a layer: the gate-up projection's
output alone is 32 MiB at 4096 rows (32 prompts of 128 tokens) of intermediate 2048 in bf16. glibc
serves every allocation of 32 MiB or more (its largest mmap threshold) with a fresh `mmap` and
unmaps it on free, and returns freed memory at the top of its heap to the system past a trim
threshold, so such buffers are page-faulted in again at every layer of every call. Measured on the
Intel Xeon of bench/peers (one core, llama 512x8, bf16, 32 prompts of 128 tokens encoded at once,
eager, `NXSERVE_MALLOC=system` and the default alternated): 636-660 ms a call with glibc's defaults,
454 ms set up, the same tokens; the MLP alone at 4096 rows (the same settings given through
GLIBC_TUNABLES) 52.1 -> 30.5 ms on one thread and 27.9 -> 15.4 on two. Prompts encoded alone
(128-2048 tokens) and decode steps measured the same either way: their buffers stay under the
threshold. tests/nxcore/test_malloc.py checks the behaviour (no mmap, nothing returned on free, no
page faults in the next calls).

`retain_freed_memory` sets that (`mallopt`: M_MMAP_MAX 0, M_TRIM_THRESHOLD at its largest), once the
weights are loaded and the loading's temporaries returned (`malloc_trim`): from then on memory a call
frees stays in the process for the next one, so its resident size keeps its peak, as with TCMalloc,
which vLLM's CPU backend preloads for the same reason. `NXSERVE_MALLOC=system` keeps glibc's
defaults; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

ENV = "NXSERVE_MALLOC"
"""`system`: leave the C library's allocator as it is; `retain` (default): `retain_freed_memory`."""

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int: the largest, 2 GiB

_applied: str | None = None


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def retain_freed_memory() -> str:
    """Serve every allocation from the heap and never trim it (see the module); returns what was
    done: "retain", "system" (asked by NXSERVE_MALLOC) or why nothing was. Once per process."""
    global _applied
    if _applied is not None:
        return _applied
    choice = os.environ.get(ENV, "retain").strip().lower()
    if choice not in ("retain", "system"):
        raise ValueError(f"{ENV}={choice!r} is invalid: use 'retain' (the default) or 'system'")
    if choice == "system":
        _applied = "system"
        return _applied
    libc = _glibc()
    if libc is None:
        _applied = "not glibc: the C library's allocator is left as it is"
        return _applied
    libc.malloc_trim(0)  # the loading's temporaries go back first: they would stay otherwise
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, _TRIM_NEVER)):
        _applied = "mallopt refused the settings: glibc's defaults stay"
        log.warning("nxcore.malloc: %s", _applied)
        return _applied
    _applied = "retain"
    log.debug("nxcore.malloc: every allocation from the heap, freed memory kept for reuse")
    return _applied
