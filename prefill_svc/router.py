"""Decode replica selection: least loaded by GetLoad reports, refreshed in the background."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from nxserve.decode_codec import DecodeStub
from nxserve.grpc_common import server_options
from nxserve.v1 import decode_pb2

log = logging.getLogger(__name__)


@dataclass
class Replica:
    target: str
    stub: DecodeStub
    channel: grpc.aio.Channel
    up: bool = False
    free_slots: int = 0
    total_slots: int = 0
    queued: int = 0
    fingerprint: str = ""
    picks_since_report: int = 0
    last_error: str = "no load report yet"

    def score(self) -> int:
        return self.free_slots - self.queued - self.picks_since_report


class NoReplica(Exception):
    def __init__(self, message: str, *, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


class DecodeRouter:
    def __init__(self, targets: list[str], *, fingerprint: str, interval_s: float = 0.5) -> None:
        if not targets:
            raise ValueError("no decode replicas given: pass --decode HOST:PORT[,HOST:PORT...]")
        self.fingerprint = fingerprint
        self.interval_s = interval_s
        self.replicas: list[Replica] = []
        for target in targets:
            channel = grpc.aio.insecure_channel(target, options=server_options())
            self.replicas.append(Replica(target=target, stub=DecodeStub(channel), channel=channel))
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._poll())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        for r in self.replicas:
            await r.channel.close()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.refresh()

    async def refresh(self) -> None:
        await asyncio.gather(*(self._refresh_one(r) for r in self.replicas))

    async def _refresh_one(self, r: Replica) -> None:
        try:
            load = await r.stub.GetLoad(decode_pb2.GetLoadRequest(), timeout=max(self.interval_s, 1.0))
        except grpc.aio.AioRpcError as exc:
            if r.up:
                log.warning("decode replica %s is down: %s", r.target, exc.code().name)
            r.up, r.last_error = False, f"{exc.code().name}: {exc.details()}"
            return
        if not r.up:
            log.info("decode replica %s is up: %d/%d slots free", r.target, load.free_slots, load.total_slots)
        r.up, r.free_slots, r.total_slots, r.queued, r.fingerprint = True, load.free_slots, load.total_slots, load.queued_requests, load.fingerprint
        r.picks_since_report = 0
        if r.fingerprint != self.fingerprint:
            r.last_error = f"serves model {r.fingerprint}, prefill serves {self.fingerprint}"

    def usable(self) -> list[Replica]:
        return [r for r in self.replicas if r.up and r.fingerprint == self.fingerprint]

    def pick(self, exclude: set[str] = frozenset()) -> Replica:
        """The least-loaded usable replica not in `exclude`."""
        candidates = [r for r in self.usable() if r.target not in exclude]
        if not candidates:
            states = "; ".join(f"{r.target}: {'tried' if r.target in exclude else r.last_error}" for r in self.replicas)
            wrong_model = any(r.up and r.fingerprint != self.fingerprint for r in self.replicas)
            code = grpc.StatusCode.FAILED_PRECONDITION if wrong_model and not self.usable() else grpc.StatusCode.UNAVAILABLE
            raise NoReplica(f"no decode replica can take the request ({states})", code=code)
        best = max(candidates, key=lambda r: (r.score(), -self.replicas.index(r)))
        best.picks_since_report += 1
        return best

    def mark_down(self, replica: Replica, error: str) -> None:
        replica.up, replica.last_error = False, error
        log.warning("decode replica %s failed: %s", replica.target, error)
