"""Decode replica selection: least loaded by GetLoad reports, refreshed in the background. The
reports also tell which replicas share this service's shared-memory directory (KV hand-off on one
host without chunking)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

import grpc

from nxserve.kv import DecodeStub
from nxserve.rpc.discovery import DiscoveryError, DnsName, resolve
from nxserve.rpc.errors import ModelMismatch, NoReplica
from nxserve.rpc.security import ChannelTLS, secure_or_insecure_channel
from nxserve.rpc.server import DECODE_MAX_MESSAGE_BYTES, channel_options
from nxserve.v1 import decode_pb2

log = logging.getLogger(__name__)

RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 500),
]
"""gRPC's default reconnect backoff grows to 2 minutes: a replica back after an outage of 120 s was
sent nothing for another 56.5 s (the issue's figure). Capped at 0.5 s, a replica that answers again
is seen by the next load report after its channel reconnects: within ~1 s of SERVING (measured in
the closing note of issue 20). Trying a loopback or pod address twice a second costs nothing."""


DRAIN_S = 600.0
"""A replica whose address left DNS keeps its channel this long for the streams still on it (its
pod is shutting down: it finishes them or hands them back within its own grace)."""


@dataclass
class Replica:
    target: str
    stub: DecodeStub
    channel: grpc.aio.Channel
    source: str = ""
    """The DNS name it was found under (empty: listed in --decode itself)."""
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

    @property
    def name(self) -> str:
        """How errors and logs name it."""
        return f"decode replica {self.target}"

    def score(self) -> int:
        return self.free_slots - self.queued - self.picks_since_report


class DecodeRouter:
    """The decode replicas prefill hands requests to: polls each one's GetLoad every `interval_s`,
    keeps those that are up and serve this model (`usable`), and picks the least loaded (`pick`).
    `shares_memory(probe)` says whether a replica advertising that probe file sees this service's
    shared-memory arena."""

    def __init__(
        self,
        targets: list[str],
        *,
        fingerprint: str,
        names: Collection[DnsName] = (),
        interval_s: float = 0.5,
        resolve_interval_s: float = 5.0,
        shares_memory: Callable[[str], bool] = lambda probe: False,
        tls: ChannelTLS | None = None,
    ) -> None:
        if not targets and not names:
            raise ValueError("no decode replicas given: pass --decode HOST:PORT[,HOST:PORT...] or dns:///NAME:PORT")
        self.fingerprint = fingerprint
        self.shares_memory = shares_memory
        self.interval_s = interval_s
        self.names = list(names)
        """DNS names whose addresses are replicas (`nxserve.rpc.discovery`), resolved every
        `resolve_interval_s` and soon after a replica fails or none can take a request."""
        self.resolve_interval_s = resolve_interval_s
        self._next_resolve = 0.0
        self.tls = tls
        """How to dial the replicas (None: plaintext); new channels are made when its files change."""
        self._tls_stamp = tls.stamp() if tls else ()
        self.replicas: list[Replica] = []
        for target in dict.fromkeys(targets):
            self._add(target, source="")
        self._task: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()

    def _add(self, target: str, *, source: str) -> None:
        channel = self._channel(target)
        self.replicas.append(Replica(target=target, stub=DecodeStub(channel), channel=channel, source=source))

    def _close_later(self, channel: grpc.aio.Channel, grace: float) -> None:
        """Close `channel` once its calls end (at most `grace` seconds), without waiting here."""
        task = asyncio.create_task(channel.close(grace=grace))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _channel(self, target: str) -> grpc.aio.Channel:
        return secure_or_insecure_channel(
            target, self.tls, [*channel_options(max_receive=4 << 20, max_send=DECODE_MAX_MESSAGE_BYTES), *RECONNECT_OPTIONS]
        )

    def _renew_channels(self) -> None:
        """New channels to every replica when the TLS files changed (gRPC fixes a channel's
        credentials when it is made); the old ones close once their calls end (up to 10 minutes)."""
        if self.tls is None:
            return
        try:
            stamp = self.tls.stamp()
        except OSError as exc:  # a file missing for a moment while it is replaced: next round
            log.warning("TLS to decode replicas: cannot read the certificate files yet: %s", exc)
            return
        if stamp == self._tls_stamp:
            return
        self._tls_stamp = stamp
        log.info("TLS to decode replicas: certificate files changed, new channels")
        for r in self.replicas:
            old, r.channel = r.channel, self._channel(r.target)
            r.stub = DecodeStub(r.channel)
            self._close_later(old, grace=DRAIN_S)

    async def start(self) -> None:
        await self.discover()
        await self.refresh()
        self._task = asyncio.create_task(self._poll())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        for r in self.replicas:
            await r.channel.close()
        for task in list(self._closing):
            task.cancel()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self._renew_channels()
            if self.names and asyncio.get_running_loop().time() >= self._next_resolve:
                await self.discover()
            await self.refresh()

    def resolve_soon(self) -> None:
        """Resolve the DNS names at the next poll (a replica failed, or none could take a request:
        the Deployment may have rolled)."""
        self._next_resolve = 0.0

    async def discover(self) -> None:
        """Resolve every DNS name: replicas at new addresses are added (routed to once their load
        report says they serve this model), those whose address left every name are dropped from
        routing and their channels closed once their streams end (`DRAIN_S`). A name whose resolver
        fails keeps its replicas."""
        if not self.names:
            return
        self._next_resolve = asyncio.get_running_loop().time() + self.resolve_interval_s
        found: dict[str, str] = {}  # target -> name
        failed: set[str] = set()
        for name, result in zip(self.names, await asyncio.gather(*(resolve(n) for n in self.names), return_exceptions=True), strict=True):
            if isinstance(result, DiscoveryError):
                log.warning("decode replicas: %s; keeping the %d known under %s", result, sum(r.source == str(name) for r in self.replicas), name)
                failed.add(str(name))
            elif isinstance(result, BaseException):
                raise result
            else:
                found.update(dict.fromkeys(sorted(result), str(name)))
        known = {r.target for r in self.replicas}
        for target, source in found.items():
            if target not in known:
                self._add(target, source=source)
                log.info("decode replicas: %s appeared under %s", target, source)
        for r in [r for r in self.replicas if r.source and r.source not in failed and r.target not in found]:
            self.replicas.remove(r)
            r.up, r.last_error = False, f"its address left {r.source}"
            log.info("decode replicas: %s left %s; its streams finish on the open channel", r.target, r.source)
            self._close_later(r.channel, grace=DRAIN_S)

    async def refresh(self) -> None:
        await asyncio.gather(*(self._refresh_one(r) for r in self.replicas))

    async def _refresh_one(self, r: Replica) -> None:
        try:
            load = await r.stub.GetLoad(decode_pb2.GetLoadRequest(), timeout=max(self.interval_s, 1.0))
        except grpc.aio.AioRpcError as exc:
            if r.up:
                log.warning("%s is down: %s", r.name, exc.code().name)
            r.up, r.last_error = False, f"{exc.code().name}: {exc.details()}"
            return
        if not r.up:
            log.info("%s is up: %d/%d slots free", r.name, load.free_slots, load.total_slots)
        r.up, r.free_slots, r.total_slots, r.queued, r.fingerprint = True, load.free_slots, load.total_slots, load.queued_requests, load.fingerprint
        r.picks_since_report = 0
        shm = load.shm_probe != r.shm_failed_probe and self.shares_memory(load.shm_probe)
        r.shm_probe = load.shm_probe
        if shm != r.shm:
            log.info("KV to %s: %s", r.name, "shared memory in this service's arena" if shm else "chunks over gRPC")
        r.shm = shm
        if r.fingerprint != self.fingerprint:
            error = f"serves model {r.fingerprint}, prefill serves {self.fingerprint}"
            if r.last_error != error:  # logged once, not every report
                log.warning("%s %s: not routing to it", r.name, error)
            r.last_error = error

    def usable(self) -> list[Replica]:
        return [r for r in self.replicas if r.up and r.fingerprint == self.fingerprint]

    def pick(self, exclude: Collection[str] = frozenset()) -> Replica:
        """The least-loaded usable replica not in `exclude` (targets). ModelMismatch when every
        replica that is up serves another model, else NoReplica when there is none."""
        candidates = [r for r in self.usable() if r.target not in exclude]
        if not candidates:
            states = "; ".join(f"{r.target}: {'tried' if r.target in exclude else r.last_error}" for r in self.replicas)
            message = f"no decode replica can take the request ({states or 'none found yet: ' + ', '.join(map(str, self.names))})"
            self.resolve_soon()
            if any(r.up and r.fingerprint != self.fingerprint for r in self.replicas) and not self.usable():
                raise ModelMismatch(message)
            raise NoReplica(message)
        best = max(candidates, key=lambda r: (r.score(), -self.replicas.index(r)))
        best.picks_since_report += 1
        return best

    def shm_failed(self, replica: Replica, error: str) -> None:
        """Send chunks to this replica while it advertises the same probe: it could not read this
        service's arena."""
        replica.shm, replica.shm_failed_probe = False, replica.shm_probe
        log.warning("KV to %s: chunks over gRPC until it restarts, the shared-memory hand-off failed: %s", replica.name, error)

    def mark_down(self, replica: Replica, error: str) -> None:
        replica.up, replica.last_error = False, error
        log.warning("%s failed: %s", replica.name, error)
        self.resolve_soon()
