"""EngineThread runs every call on one thread, and the services' loops run on the thread that loaded
their engines."""

from __future__ import annotations

import asyncio
import threading

import pytest

from nxcore.engine_thread import EngineThread


def test_calls_run_in_order_on_one_thread_with_results_and_errors() -> None:
    thread = EngineThread("test-engine")
    seen: list[tuple[int, int]] = []
    futures = [thread.submit(lambda i=i: seen.append((i, threading.get_ident())) or i * i) for i in range(5)]
    assert [f.result(timeout=5) for f in futures] == [0, 1, 4, 9, 16]
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert {ident for _, ident in seen} == {thread.ident} and thread.ident != threading.get_ident()

    failing = thread.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=5)
    assert thread.submit(lambda: "still serving").result(timeout=5) == "still serving"

    async def from_asyncio() -> int:
        return await thread.run(lambda x, *, y: x + y, 2, y=3)

    assert asyncio.run(from_asyncio()) == 5

    last = thread.submit(lambda: "ran before close")
    thread.close(timeout=5)
    assert last.result(timeout=0) == "ran before close"
    with pytest.raises(RuntimeError, match="closed"):
        thread.submit(lambda: None)


def test_a_loop_that_ends_on_an_error_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    thread = EngineThread("test-engine")
    with caplog.at_level("ERROR", logger="nxcore.engine_thread"):
        ended = thread.start_loop(lambda: 1 / 0, what="test loop")
        with pytest.raises(ZeroDivisionError):
            ended.result(timeout=5)
        assert thread.start_loop(lambda: None, what="quiet loop").result(timeout=5) is None
    thread.close(timeout=5)
    assert [r.getMessage() for r in caplog.records] == ["the test loop stopped on an error"]
