"""Turns on shared cores (nxserve.rpc.turns): one holder at a time across processes, a priority
turn goes before steps that arrive while it waits, a killed holder frees the cores, a stopped one
stalls the others for at most the wait, and a service without a turns file never waits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from nxserve.rpc.turns import CoreTurns

WAIT_S = 10.0


def test_without_a_file_turns_never_wait() -> None:
    turns = CoreTurns(None)
    assert not turns.enabled
    with turns.priority(), turns.turn(), turns.priority():  # not even on itself
        pass


def test_free_cores_are_taken_on_the_callers_thread(tmp_path: Path, monkeypatch) -> None:
    """With no one holding or waiting, a turn takes the locks at once on the calling thread (no
    hand-off to the locker thread, which would need the GIL); a held turn still goes through the
    locker, and the other process's turn waits for it either way."""
    import fcntl

    from nxserve.rpc import turns as turns_module

    path = tmp_path / "turns"
    mine, other = CoreTurns(path), CoreTurns(path)
    callers: list[str] = []
    flock = fcntl.flock

    def recorded(fd: int, op: int) -> None:
        callers.append(threading.current_thread().name)
        flock(fd, op)

    monkeypatch.setattr(turns_module.fcntl, "flock", recorded)
    for take in (mine.turn, mine.priority):
        callers.clear()
        with take():
            assert mine._pending is None
            assert turns_module._holder(mine._work) == os.getpid()
        assert set(callers) == {threading.current_thread().name}, callers
    with other.turn():  # held: this process's turn is handed to its locker thread and waits
        waiter = threading.Thread(target=lambda: mine.turn().__enter__())
        callers.clear()
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive() and mine._pending is not None
        assert "core-turns" in callers
    waiter.join(WAIT_S)
    assert not waiter.is_alive()
    for t in (mine, other):
        t.close()


def test_one_holder_at_a_time_in_the_order_priority_then_steps(tmp_path: Path) -> None:
    """While a decode step holds the cores, a prompt waits for it; a step asked for after the prompt
    began waiting goes after the prompt. Each CoreTurns is its own open file, as separate processes' are."""
    path = tmp_path / "turns"
    holder, prefill, decode = CoreTurns(path), CoreTurns(path), CoreTurns(path)
    order: list[str] = []
    inside = threading.Semaphore(0)
    active = []  # who is inside a turn now; never two

    def run(turns_cm, name: str, hold_s: float) -> None:
        with turns_cm():
            active.append(name)
            assert len(active) == 1, active
            order.append(name)
            inside.release()
            time.sleep(hold_s)
            active.remove(name)

    first = threading.Thread(target=run, args=(holder.turn, "step 1", 0.5))
    first.start()
    assert inside.acquire(timeout=WAIT_S)
    prompt = threading.Thread(target=run, args=(prefill.priority, "prompt", 0.1))
    prompt.start()
    time.sleep(0.2)  # the prompt now holds the gate and waits for the step in progress
    second = threading.Thread(target=run, args=(decode.turn, "step 2", 0.0))
    second.start()
    for t in (first, prompt, second):
        t.join(WAIT_S)
        assert not t.is_alive()
    assert order == ["step 1", "prompt", "step 2"]
    for t in (holder, prefill, decode):
        t.close()


def test_back_to_back_prompts_and_steps_alternate(tmp_path: Path) -> None:
    """Neither side starves: a step waiting for the cores runs between two prompts that keep coming."""
    path = tmp_path / "turns"
    prefill, decode = CoreTurns(path), CoreTurns(path)
    log: list[str] = []
    stop = threading.Event()

    def prompts() -> None:
        while not stop.is_set():
            with prefill.priority():
                log.append("p")
                time.sleep(0.01)

    def steps() -> None:
        for _ in range(10):
            with decode.turn():
                log.append("d")
                time.sleep(0.01)

    p = threading.Thread(target=prompts)
    p.start()
    time.sleep(0.05)
    d = threading.Thread(target=steps)
    d.start()
    d.join(WAIT_S)
    stop.set()
    p.join(WAIT_S)
    assert not d.is_alive() and not p.is_alive()
    assert log.count("d") == 10


def _holder(path: Path, *, hold_s: float) -> subprocess.Popen[bytes]:
    """Another process that takes a priority turn, says so, and holds it `hold_s` seconds."""
    code = (
        "import time\n"
        "from nxserve.rpc.turns import CoreTurns\n"
        f"t = CoreTurns({str(path)!r})\n"
        "with t.priority():\n"
        "    print('holding', flush=True)\n"
        f"    time.sleep({hold_s})\n"
        "print('released', flush=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[3]), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    assert child.stdout is not None and child.stdout.readline().strip() == b"holding"
    return child


def test_a_killed_holder_frees_the_cores(tmp_path: Path) -> None:
    path = tmp_path / "turns"
    child = _holder(path, hold_s=600)
    try:
        turns = CoreTurns(path, wait_s=60)
        got = threading.Event()

        def take() -> None:
            with turns.turn():
                got.set()

        waiter = threading.Thread(target=take, daemon=True)
        waiter.start()
        assert not got.wait(0.3), "a turn was given while another process held it"
        child.send_signal(signal.SIGKILL)
        assert got.wait(WAIT_S), "the killed process's turn was not released"
        waiter.join(WAIT_S)
        assert turns.skipped == 0
        turns.close()
    finally:
        child.kill()
        child.wait()


def test_a_running_holder_is_waited_for_at_most_the_wait(tmp_path: Path) -> None:
    path = tmp_path / "turns"
    child = _holder(path, hold_s=600)
    turns = CoreTurns(path, wait_s=0.6)
    try:
        start = time.monotonic()
        with turns.turn():
            pass
        assert 0.6 <= time.monotonic() - start < 0.6 + WAIT_S / 2 and turns.skipped == 1
    finally:
        child.kill()
        child.wait()
        turns.close()


def test_a_stopped_holder_stalls_the_others_only_until_it_is_seen_stopped(tmp_path: Path) -> None:
    """SIGSTOP keeps the locks: a waiter sees the holder stopped (its PID in the lock's file) and
    computes without the turn; the next turns do not wait while that late turn is pending; once the
    holder goes on and lets go, turns resume."""
    path = tmp_path / "turns"
    child = _holder(path, hold_s=0.5)
    child.send_signal(signal.SIGSTOP)
    turns = CoreTurns(path, wait_s=60)
    try:
        start = time.monotonic()
        with turns.turn():
            pass
        assert time.monotonic() - start < WAIT_S / 2 and turns.skipped == 1
        start = time.monotonic()
        for _ in range(3):
            with turns.priority():  # the late turn is still pending: no wait at all
                pass
        assert time.monotonic() - start < 0.25 and turns.skipped == 4
        child.send_signal(signal.SIGCONT)
        assert child.stdout is not None and child.stdout.readline().strip() == b"released"
        deadline = time.monotonic() + WAIT_S
        while turns._pending is not None and time.monotonic() < deadline:  # the late turn comes and is handed back
            time.sleep(0.01)
        other = CoreTurns(path, wait_s=60)
        got = threading.Event()

        def take() -> None:
            with other.turn():
                got.set()

        with turns.turn():  # taken again, and it excludes the others
            waiter = threading.Thread(target=take, daemon=True)
            waiter.start()
            assert not got.wait(0.3)
        assert got.wait(WAIT_S)
        waiter.join(WAIT_S)
        assert turns.skipped == 4 and other.skipped == 0
        other.close()
    finally:
        child.send_signal(signal.SIGCONT)
        child.kill()
        child.wait()
        turns.close()
