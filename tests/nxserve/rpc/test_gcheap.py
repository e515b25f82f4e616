"""nxserve.rpc.gcheap: start-up objects frozen out of the collector's walks, long pauses logged."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator

import pytest

from nxserve.rpc import gcheap


@pytest.fixture
def fresh_gc() -> Iterator[None]:
    callbacks = list(gc.callbacks)
    watching = gcheap._watching
    yield
    gc.unfreeze()  # the test process goes on with a normal heap
    gc.callbacks[:] = callbacks
    gcheap._watching = watching


class Node:
    def __init__(self) -> None:
        self.ref: object = self  # a cycle: only the collector frees it


def test_freeze_takes_startup_objects_out_of_collections(fresh_gc: None) -> None:
    before = [Node() for _ in range(1000)]
    frozen = gcheap.freeze_startup_heap()
    assert frozen == gc.get_freeze_count() and frozen >= len(before)
    tracked = {id(o) for o in gc.get_objects()}  # what a collection walks
    assert not any(id(o) in tracked for o in before)
    after = Node()
    assert id(after) in {id(o) for o in gc.get_objects()}  # what serving makes is still collected
    del after
    assert gc.collect() >= 1  # a cycle made after the freeze is freed


def test_pauses_over_the_threshold_are_logged_at_debug(fresh_gc: None, caplog: pytest.LogCaptureFixture) -> None:
    gcheap._watching = False
    with caplog.at_level(logging.INFO, logger=gcheap.__name__):
        gcheap.watch_pauses(threshold_ms=0.0)
        assert not gcheap._watching  # DEBUG off: nothing installed
    with caplog.at_level(logging.DEBUG, logger=gcheap.__name__):
        gcheap.watch_pauses(threshold_ms=0.0)
        gcheap.watch_pauses(threshold_ms=0.0)  # once per process
        assert sum(cb.__qualname__.startswith("watch_pauses") for cb in gc.callbacks) == 1
        gc.collect()
    assert any("garbage collection of generation 2 paused the process" in r.getMessage() for r in caplog.records)
