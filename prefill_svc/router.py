"""Decode replica selection: least loaded by GetLoad reports, refreshed in the background. The
reports also tell which replicas share this service's shared-memory directory (KV hand-off on one
host without chunking)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from nxcore.kv_wire import sees_probe
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
    shm: bool = False
    """Whether KV goes to it through this service's shared-memory arena (it advertised a probe file
    this service sees in the arena's directory, and no shared hand-off to it has failed)."""
    shm_probe: str = ""
    shm_failed_probe: str = ""
    """The probe the replica advertised when it could not read the arena: chunks while it still does
    (a restarted replica advertises a new probe and gets another try)."""

    def score(self) -> int:
        return self.free_slots - self.queued - self.picks_since_report


class NoReplica(Exception):
    def __init__(self, message: str, *, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


class DecodeRouter:
    def __init__(self, targets: list[str], *, fingerprint: str, interval_s: float = 0.5, shm_dir: Path | None = None) -> None:
        if not targets:
            raise ValueError("no decode replicas given: pass --decode HOST:PORT[,HOST:PORT...]")
        self.fingerprint = fingerprint
        self.shm_dir = shm_dir
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
        shm = self.shm_dir is not None and load.shm_probe != r.shm_failed_probe and sees_probe(self.shm_dir, load.shm_probe)
        r.shm_probe = load.shm_probe
        if shm != r.shm:
            log.info("KV to decode replica %s: %s", r.target, f"shared memory in {self.shm_dir}" if shm else "chunks over gRPC")
        r.shm = shm
        if r.fingerprint != self.fingerprint:
            error = f"serves model {r.fingerprint}, prefill serves {self.fingerprint}"
            if r.last_error != error:  # logged once, not every report
                log.warning("decode replica %s %s: not routing to it", r.target, error)
            r.last_error = error

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

    def shm_failed(self, replica: Replica, error: str) -> None:
        """Send chunks to this replica while it advertises the same probe: it could not read this
        service's arena."""
        replica.shm, replica.shm_failed_probe = False, replica.shm_probe
        log.warning("KV to decode replica %s: chunks over gRPC until it restarts, the shared-memory hand-off failed: %s", replica.target, error)

    def mark_down(self, replica: Replica, error: str) -> None:
        replica.up, replica.last_error = False, error
        log.warning("decode replica %s failed: %s", replica.target, error)
