"""The KV hand-off moves on to another decode replica when one fails it, whatever the failure's
kind: a replica whose process dies mid-stream can end the call with INTERNAL (the transport's
RST_STREAM, no status of ours) as well as UNAVAILABLE, and the client must not see either."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from nxserve.kv.transfer import Transfer
from nxserve.rpc.errors import EngineFailure, Internal, InvalidRequest, NotReady, ReplicaFailed, ServiceError
from nxserve.v1 import decode_pb2
from prefill_svc.server import GenerationServicer, Request


@dataclass
class _Replica:
    target: str
    name: str
    shm: Any = None
    up: bool = True
    stub: Any = None


@dataclass
class _Router:
    replicas: list[_Replica]
    down: list[str] = field(default_factory=list)

    def usable(self) -> list[_Replica]:
        return [r for r in self.replicas if r.up]

    def pick(self, exclude: Any = frozenset()) -> _Replica:
        from nxserve.rpc.errors import NoReplica

        for r in self.usable():
            if r.target not in exclude:
                return r
        raise NoReplica("none left")

    def mark_down(self, replica: _Replica, error: str) -> None:
        replica.up = False
        self.down.append(replica.target)


class _Call:
    def cancel(self) -> None:
        pass


class _Stub:
    def Decode(self, **_: Any) -> _Call:
        return _Call()


class _Sender:
    """Fails the KV on the replicas in `failures` with that error; acknowledges it on the others."""

    def __init__(self, failures: dict[str, ServiceError]) -> None:
        self.failures = failures

    async def send(self, call: Any, header: Any, kv: Any, *, shared_memory: Any, peer: str) -> Transfer:
        if peer in self.failures:
            raise self.failures[peer]
        return Transfer(bytes_sent=10, seconds=0.001, queue_ms=0, slot=0, transport="chunks")


def _hand_off(failure: ServiceError) -> tuple[str, list[str]]:
    servicer = GenerationServicer(model_name="m")
    router = _Router([_Replica("a:1", "a", stub=_Stub()), _Replica("b:1", "b", stub=_Stub())])
    servicer.router = router  # type: ignore[assignment]
    servicer.kv = _Sender({"a": failure})  # type: ignore[assignment]
    servicer._header = lambda req: decode_pb2.DecodeHeader()  # type: ignore[method-assign]
    req = Request.__new__(Request)
    req.ctx, req.timeout = None, None
    prefill = SimpleNamespace(kv=None)  # the sender above never reads it
    replica, _ = asyncio.run(servicer._hand_off(req, prefill=prefill, opened=None))  # type: ignore[arg-type]
    return replica.target, router.down


@pytest.mark.parametrize(
    "failure",
    [
        ReplicaFailed("a: Socket closed"),
        NotReady("a: draining"),
        EngineFailure("a: a step raised"),
        Internal("a: Received RST_STREAM with error code 2"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_replica_failing_the_hand_off_sends_the_request_to_the_next(failure: ServiceError) -> None:
    assert _hand_off(failure) == ("b:1", ["a:1"])


def test_the_requests_own_fault_is_not_retried_elsewhere() -> None:
    with pytest.raises(InvalidRequest):
        _hand_off(InvalidRequest("a: the header is malformed"))
