"""Engine processes on the same cores take turns computing (`--core-turns FILE`).

A prefill service and decode replicas started together on one host (`nxserve up`, `make run`, a
pod that runs both) each run torch with one OpenMP thread per core. Computing at once, their
threads outnumber the cores and each barrier of one waits for a thread the other has descheduled:
on 2 cores a 128-token context encoding of the 125M llama took 71 ms on average while decode ran,
against 30 ms alone. Taking turns, each computes alone on every core, as one scheduler that
interleaves prefill and decode steps (vLLM's) does. Measured: the table in nxserve.omp_env.

The turn is two `flock(2)` locks on files next to FILE, shared by every process given the same
FILE: `work`, held while computing, and `gate`, which orders who gets `work` next.

- `priority()` (prefill's context encoding): take the gate, then work (so it waits only for the
  step in progress), release the gate, compute, release work.
- `turn()` (a decode step): pass through the gate, then take work. While a prompt waits for its
  turn it holds the gate, so the next step waits behind it; a step that was already waiting for
  work may go first, so prompts arriving back to back alternate with steps and neither starves.

The kernel releases a dead process's locks, so a killed service never blocks the others. Without
FILE (`CoreTurns(None)`) both are no-ops: a service with cores of its own never waits.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class CoreTurns:
    """Turns on the cores shared by the processes given the same `path` (None: no turns). One
    engine thread per process takes them; `priority` and `turn` are not reentrant."""

    def __init__(self, path: Path | str | None) -> None:
        self.path = Path(path) if path is not None else None
        self._gate = self._work = -1
        self._local = threading.Lock()  # flock is per open file: threads of one process would share it
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._gate = os.open(f"{self.path}.gate", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._work = os.open(f"{self.path}.work", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    @contextmanager
    def priority(self) -> Iterator[None]:
        """Compute next: wait only for the turn in progress, and hold off the ones that arrive meanwhile."""
        if self.path is None:
            yield
            return
        with self._local:
            fcntl.flock(self._gate, fcntl.LOCK_EX)
            try:
                fcntl.flock(self._work, fcntl.LOCK_EX)
            finally:
                fcntl.flock(self._gate, fcntl.LOCK_UN)
            try:
                yield
            finally:
                fcntl.flock(self._work, fcntl.LOCK_UN)

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Compute after any `priority` turn already waiting."""
        if self.path is None:
            yield
            return
        with self._local:
            fcntl.flock(self._gate, fcntl.LOCK_EX)
            fcntl.flock(self._gate, fcntl.LOCK_UN)
            fcntl.flock(self._work, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._work, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in (self._gate, self._work):
            if fd >= 0:
                os.close(fd)
        self._gate = self._work = -1
        self.path = None
