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

The kernel releases a dead process's locks, so a killed service never blocks the others. A holder
that stops without dying (SIGSTOP, a debugger) would: each holder writes its PID into the lock's
file, and a waiter that finds the holder stopped (state T or t in /proc) stops waiting within
POLL_S; any other holder is waited for at most `wait_s` (a frozen cgroup, another PID namespace).
(The other replicas' streams must not stall for as long as prefill's --stall-timeout-s, or prefill
would take them for lost too.) A turn given up on computes without the cores' lock, and so does
the process until that late turn comes and is handed straight back. Free locks are taken at
once on the caller's thread; locks someone holds are waited for on a thread of their own, so
waiting costs nothing while the kernel hands them over. A holder in another
PID namespace (containers that share the file but not /proc) is only waited for up to `wait_s`.
Without FILE (`CoreTurns(None)`) both are no-ops: a service with cores of its own never waits.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEFAULT_WAIT_S = 10.0
"""How long a turn held by a running process is waited for before computing without it
(`--core-turns-wait-s`): longer than a context-encoding call (one of 32 128-token prompts of the
125M llama takes ~0.7 s on 2 cores: a 0.5 s wait measured 473 instead of 618 tokens/s all at once),
shorter than prefill's default --stall-timeout-s (15 s)."""

POLL_S = 0.2
"""How often a waiter looks whether the holder is stopped."""

log = logging.getLogger(__name__)


class _Request:
    def __init__(self, priority: bool) -> None:
        self.priority = priority
        self.granted = threading.Event()
        self.abandoned = False


class CoreTurns:
    """Turns on the cores shared by the processes given the same `path` (None: no turns). One
    engine thread per process takes them; `priority` and `turn` are not reentrant."""

    def __init__(self, path: Path | str | None, *, wait_s: float = DEFAULT_WAIT_S) -> None:
        if wait_s <= 0:
            raise ValueError(f"wait_s={wait_s} is invalid: a turn is waited for a positive number of seconds")
        self.path = Path(path) if path is not None else None
        self.wait_s = wait_s
        self.skipped = 0
        """Turns computed without the cores' lock: waited for in vain, or while one late turn was pending."""
        self._gate = self._work = -1
        self._cond = threading.Condition()
        self._pending: _Request | None = None
        self._closed = False
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._gate = os.open(f"{self.path}.gate", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._work = os.open(f"{self.path}.work", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            threading.Thread(target=self._locker, name="core-turns", daemon=True).start()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    @contextmanager
    def priority(self) -> Iterator[None]:
        """Compute next: wait only for the turn in progress, and hold off the ones that arrive meanwhile."""
        with self._turn(priority=True):
            yield

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Compute after any `priority` turn already waiting."""
        with self._turn(priority=False):
            yield

    @contextmanager
    def _turn(self, *, priority: bool) -> Iterator[None]:
        held = self._acquire(priority)
        try:
            yield
        finally:
            if held and self._work >= 0:  # (closed meanwhile: the locks went with the file)
                _mark(self._work, 0)
                fcntl.flock(self._work, fcntl.LOCK_UN)

    def _acquire(self, priority: bool) -> bool:
        """Whether this process now holds the cores (their work lock)."""
        if self.path is None:
            return False
        with self._cond:
            if self._closed:
                return False
            if self._pending is not None:  # a late turn is still on its way: do not wait again
                self.skipped += 1
                return False
            if self._try_now():
                return True
            self._pending = request = _Request(priority)
            self._cond.notify()
        deadline = time.monotonic() + self.wait_s
        while not request.granted.wait(min(POLL_S, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline or any(_stopped(_holder(fd)) for fd in (self._gate, self._work)):
                break
        else:
            return True
        with self._cond:
            if request.granted.is_set():  # granted just now
                return True
            request.abandoned = True
        self.skipped += 1
        log.warning(
            "no turn on the shared cores (%s): the process holding them is stopped, or has held them over %.1f s; "
            "computing without it until it comes",
            self.path,
            self.wait_s,
        )
        return False

    def _try_now(self) -> bool:
        """Take the turn on this thread if no one holds or waits for it (the usual case between two
        steps): without waking the locker thread, which would need the GIL, held meanwhile by the
        event loop relaying the last step's tokens (measured: 1-2 ms a step, 6-8 ms in some).
        Called under `_cond` with no request pending; the locks are left as found when it fails."""
        try:
            fcntl.flock(self._gate, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a prompt waits for the cores: queue behind it
            return False
        try:
            fcntl.flock(self._work, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # someone computes: wait on the locker thread
            return False
        finally:
            fcntl.flock(self._gate, fcntl.LOCK_UN)
        _mark(self._work, os.getpid())
        return True

    def _locker(self) -> None:
        """Takes the locks for each request, blocking in the kernel; hands back those no one waits for any more."""
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                request = self._pending
            assert request is not None
            try:
                fcntl.flock(self._gate, fcntl.LOCK_EX)
                if request.priority:  # hold the gate while waiting for work: the next steps wait behind
                    _mark(self._gate, os.getpid())
                    try:
                        fcntl.flock(self._work, fcntl.LOCK_EX)
                    finally:
                        _mark(self._gate, 0)
                        fcntl.flock(self._gate, fcntl.LOCK_UN)
                else:
                    fcntl.flock(self._gate, fcntl.LOCK_UN)
                    fcntl.flock(self._work, fcntl.LOCK_EX)
                _mark(self._work, os.getpid())
            except OSError:  # closed under it
                return
            with self._cond:
                self._pending = None
                if request.abandoned:
                    _mark(self._work, 0)
                    fcntl.flock(self._work, fcntl.LOCK_UN)
                    log.info("the shared cores' turn came back (%s): taking turns again", self.path)
                else:
                    request.granted.set()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            if self._pending is not None:  # the locker is blocked on them: they close with the process
                return
        for fd in (self._gate, self._work):
            if fd >= 0:
                os.close(fd)
        self._gate = self._work = -1


def _mark(fd: int, pid: int) -> None:
    """Write the holder's PID (0: none) into a lock's file, for waiters to look at."""
    os.pwrite(fd, struct.pack("<q", pid), 0)


def _holder(fd: int) -> int:
    if fd < 0:
        return 0
    data = os.pread(fd, 8, 0)
    return struct.unpack("<q", data)[0] if len(data) == 8 else 0


def _stopped(pid: int) -> bool:
    """Whether process `pid` (of this PID namespace) is stopped: SIGSTOP, or a debugger's stop."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in (b"T", b"t")
