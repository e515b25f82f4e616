"""One OS thread for every torch call of a process's engines: loading, warm-up and serving.

PyTorch's CPU kernels parallelise with OpenMP, and libgomp keeps a separate thread team for each OS
thread that starts a parallel region. A service that loads its engine in one thread (say an
asyncio executor thread) and serves from another ends up with two teams. Their threads together
outnumber the cores, so libgomp stops spinning between parallel regions and puts its threads to
sleep after each one: every region then pays for waking them. Measured on 2 cores, a 128-token
context encoding of the 125M llama took 65 ms when one thread loaded and ran the engine, and 80-90
ms when the model was loaded in one thread and run in another (elementwise ops 3-5x slower each).

`EngineThread` is that one thread: a daemon thread running the callables given to `submit` in
order (a serving loop is one long callable, given last). It is a daemon so that a loop nobody
stopped does not hold the interpreter open at exit, which `concurrent.futures.ThreadPoolExecutor`
would.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class EngineThread:
    def __init__(self, name: str = "nxcore-engine") -> None:
        self._calls: queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple, dict] | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        """The thread's identifier (`threading.get_ident()` inside it)."""
        return self._thread.ident

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run `fn(*args, **kwargs)` on the thread after every call submitted before it."""
        if self._closed:
            raise RuntimeError(f"engine thread {self._thread.name} is closed")
        future: Future[T] = Future()
        self._calls.put((future, fn, args, kwargs))
        return future

    def start_loop(self, loop: Callable[[], None], *, what: str) -> Future[None]:
        """Submit a serving loop (it returns when told to stop); an exception that ends it is logged
        as "the {what} stopped on an error", since nobody waits on its future until shutdown."""
        future = self.submit(loop)
        future.add_done_callback(
            lambda f: None if f.cancelled() or f.exception() is None else log.error("the %s stopped on an error", what, exc_info=f.exception())
        )
        return future

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`submit`, awaited from asyncio."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def close(self, timeout: float | None = None) -> None:
        """Run what was submitted, then end the thread (waits up to `timeout` seconds for it)."""
        if not self._closed:
            self._closed = True
            self._calls.put(None)
        if threading.get_ident() != self._thread.ident:
            self._thread.join(timeout)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args, kwargs = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)
            else:
                future.set_result(result)
