"""Keep the garbage collector off the objects a process made at start-up.

A service holds a few hundred thousand gc-tracked objects once it has started (torch, Inductor's
and sympy's modules, grpc, the tokenizer, transformers in the gateway): 345k in a decode replica of
the small llama, 224k in the OpenAI gateway. CPython's full (generation 2) collection walks all of
them every time enough new objects survived, about once a minute at a request a second, and holds
the GIL meanwhile: 171-313 ms on the 2-core VM (Intel Xeon), measured by a gc callback in the
prefill service and in a decode replica while `bench.peers.vllm_serve` sent a request a second. A
pause in a decode replica stalls every stream it runs; one in a process that shares the cores with
another's compute takes a core from it (the other engine's OpenMP threads then wait for each other
at every barrier).

`freeze_startup_heap()` runs one full collection and moves everything left into the permanent
generation (`gc.freeze()`), so later collections only walk what serving made since; vLLM does the
same after its server and engine start (`vllm.utils.gc_utils.freeze_gc_heap`). The objects stay
alive; they were alive anyway (modules, the model, caches).

With --log-level DEBUG, `watch_pauses()` logs every collection that paused the process for more
than PAUSE_LOG_MS.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

PAUSE_LOG_MS = 10.0
"""Collections that took longer are logged at DEBUG (`watch_pauses`)."""


def freeze_startup_heap() -> int:
    """Collect every generation, then freeze what is left; returns how many objects are frozen.
    Call it once start-up (loading, warm-up) is done, just before serving: it takes as long as
    one full collection (~0.1-0.3 s here) on the calling thread."""
    start = time.perf_counter()
    for generation in (0, 1, 2):  # survivors move down to the oldest generation before the freeze
        gc.collect(generation)
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("froze %d start-up objects out of the garbage collector's walks (%.0f ms)", frozen, (time.perf_counter() - start) * 1000)
    watch_pauses()
    return frozen


_watching = False


def watch_pauses(threshold_ms: float = PAUSE_LOG_MS) -> None:
    """With DEBUG logging on for this module, log each collection that took over `threshold_ms`
    (once per process; nothing is installed when DEBUG is off)."""
    global _watching
    if _watching or not log.isEnabledFor(logging.DEBUG):
        return
    _watching = True
    started = [0.0]

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - started[0]) * 1000
        if ms > threshold_ms:
            log.debug("garbage collection of generation %s paused the process %.1f ms", info.get("generation"), ms)

    gc.callbacks.append(callback)
