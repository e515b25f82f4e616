"""One request's KV cache from prefill to a decode replica: the interface both services use.

    prefill (sender)                                        decode (receiver)
    kv = OutboundKV.reserve(arena, layouts)
    kv.export(0, engine, slot); kv.seal()
    await sender.send(call, header, kv, ...)  ── Decode ──▶  kv = await receiver.receive(header, requests)
                                              ◀── ack ───   kv.import_into(slot, engine)  (then the ack)
    kv.release()

Two transports sit behind it. On one host the KV is exported straight into a region of the
sender's shared-memory arena (`nxserve.kv.shm`) and the header names it; otherwise it travels as
CRC-checked chunks on the same stream (`nxserve.kv.codec`). A faster transport (NIXL/UCX, RDMA)
would be a third branch of `KVSender.send` and `KVReceiver.receive`; the services would not change.

A region has one owner, the request's `OutboundKV`, and goes back to the arena in one place,
`OutboundKV.release` (called after the ack, and again, harmlessly, when the request ends).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from nxcore import Engine
from nxcore.kv_cache import KVSnapshot
from nxserve.kv.codec import DecodeRequests, KVAssembler, Layout, encode_chunk, iter_chunks
from nxserve.kv.shm import KVArena, Probe, Region, SharedKV, SharedKVReader, SharedRegion, remove_stale, sees_probe
from nxserve.rpc.errors import KVCorrupted, LeaseExpired, Overloaded, ReplicaFailed, SharedMemoryUnreadable
from nxserve.rpc.status import error_of_call
from nxserve.v1 import decode_pb2

log = logging.getLogger(__name__)

SHM, CHUNKS = "shm", "chunks"
"""The transports, as traces and load reports name them."""


LEASE_MARGIN_MS = 1000
"""A receiver refuses a shared region whose lease ends within this: the import (a few ms) finishes
well before the sender can take the region back, so the region has one owner at any time."""


def now_ms() -> int:
    """Wall-clock Unix time in milliseconds: leases are compared across the two processes of one host."""
    return time.time_ns() // 1_000_000


def check_lease(expires_ms: int) -> None:
    """LeaseExpired when the sender's lease on a shared region ends within LEASE_MARGIN_MS (0: no lease)."""
    if expires_ms and now_ms() + LEASE_MARGIN_MS >= expires_ms:
        raise LeaseExpired(
            f"the sender's lease on the shared KV region ended, or ends within {LEASE_MARGIN_MS} ms: it may hold another request's KV now"
        )


def engine_layout(engine: Engine, n_tokens: int) -> Layout:
    """The layout of `n_tokens` of the engine's KV, as exported."""
    cfg = engine.model_config
    return Layout(cfg.num_layers, cfg.num_kv_heads, n_tokens, cfg.head_dim, engine.config.dtype)


# ---------------------------------------------------------------- the sending side


@dataclass(eq=False)
class OutboundKV:
    """One request's KV on the sending side: one snapshot per KV set (the target model's, then the
    draft's), exported into a region of the arena when one was free, else into new tensors."""

    layouts: tuple[Layout, ...]
    region: Region | None = None
    snapshots: list[KVSnapshot | None] = field(default_factory=list)

    @classmethod
    def reserve(cls, arena: KVArena | None, layouts: Sequence[Layout]) -> OutboundKV:
        """Room for KV of these layouts: a region of `arena` when one is free."""
        region = arena.reserve(layouts) if arena is not None else None
        return cls(layouts=tuple(layouts), region=region, snapshots=[None] * len(layouts))

    def export(self, index: int, engine: Engine, slot: int) -> None:
        """Copy KV set `index` out of the engine's slot (into the region when there is one)."""
        out = self.region.snapshots[index] if self.region is not None else None
        self.snapshots[index] = engine.export_kv(slot, self.layouts[index].n_tokens, out=out)

    def seal(self) -> None:
        """Name the region for a receiver once every set is exported (its CRC-32 is taken now,
        while the bytes are still in this core's cache)."""
        if self.region is not None:
            self.region.seal()

    @property
    def nbytes(self) -> int:
        return sum(layout.nbytes for layout in self.layouts)

    @property
    def released(self) -> bool:
        return not self.snapshots

    def release(self) -> None:
        """Drop the KV (the replica holds its own copy, or the request is over) and give its region
        back. Idempotent."""
        self.snapshots = []
        if self.region is not None:
            self.region.release()
            self.region = None


@dataclass(frozen=True)
class Transfer:
    """One KV hand-off, as the sender saw it."""

    bytes_sent: int
    seconds: float
    """From the header to the ack, less the time decode queued the request for a slot."""
    queue_ms: float
    slot: int
    transport: str
    """SHM or CHUNKS."""


class KVSender:
    """Prefill's side: the shared-memory arena (None: chunks only) and the sending of each request's KV."""

    def __init__(self, *, arena: KVArena | None, chunk_bytes: int, lease_s: float = 30.0) -> None:
        self.arena = arena
        self.chunk_bytes = chunk_bytes
        self.lease_s = lease_s
        """How long a replica may hold a shared region unacknowledged (--kv-lease-s)."""

    @classmethod
    def open(cls, shm_dir: Path | None, *, arena_bytes: int, chunk_bytes: int, lease_s: float = 30.0) -> KVSender:
        """A sender with an arena of `arena_bytes` in `shm_dir`, after removing arenas and probes that
        services which crashed left there; chunks only without a directory, or when the arena
        cannot be reserved there (a warning says what to do)."""
        if shm_dir is None:
            return cls(arena=None, chunk_bytes=chunk_bytes, lease_s=lease_s)
        try:
            for name in remove_stale(shm_dir):
                log.info("removed %s from %s: the service that made it is gone", name, shm_dir)
            arena = KVArena(shm_dir, arena_bytes)
        except OSError as exc:
            log.warning(
                "KV through shared memory is off: cannot reserve a %d-byte arena in --kv-shm-dir %s (%s); "
                "give the directory more room or lower --kv-shm-bytes",
                arena_bytes,
                shm_dir,
                exc.strerror or exc,
            )
            return cls(arena=None, chunk_bytes=chunk_bytes, lease_s=lease_s)
        log.info("KV arena %s/%s: %d MiB for decode replicas that share the directory", shm_dir, arena.name, arena_bytes >> 20)
        return cls(arena=arena, chunk_bytes=chunk_bytes, lease_s=lease_s)

    def shares_memory_with(self, probe: str) -> bool:
        """Whether a replica advertising `probe` (GetLoad's shm_probe) sees this sender's arena directory."""
        return self.arena is not None and sees_probe(self.arena.directory, probe)

    async def send(
        self, call: grpc.aio.StreamStreamCall, header: decode_pb2.DecodeHeader, kv: OutboundKV, *, shared_memory: bool, peer: str
    ) -> Transfer:
        """Send `header` (its layouts filled in here) and the KV on `call`, a Decode stream of
        `nxserve.kv.codec.DecodeStub`, and wait for the ack. Through the arena when `shared_memory`
        (the replica sees the arena's directory) and the KV is in a region or fits in a free one
        now; as chunks otherwise. Raises the replica's error (`nxserve.rpc.errors`) when the call
        fails: SharedMemoryUnreadable means send again with `shared_memory=False`."""
        start = time.perf_counter()
        message = decode_pb2.DecodeRequest()
        message.header.CopyFrom(header)
        message.header.layout.CopyFrom(kv.layouts[0].to_pb())
        if len(kv.layouts) > 1:
            message.header.draft_layout.CopyFrom(kv.layouts[1].to_pb())
        region = self._region(kv) if shared_memory else None
        if region is not None:
            message.header.shared_kv.CopyFrom(
                decode_pb2.SharedKv(
                    name=region.name,
                    offset=region.offset,
                    nbytes=region.nbytes,
                    crc32=region.crc32,
                    lease_expires_unix_ms=now_ms() + int(self.lease_s * 1000),
                )
            )
        try:
            await call.write(message)
            if region is None:
                sent = await self._write_chunks(call, kv)
            else:
                sent = region.nbytes
            # A region is lent for the lease: no ack by then, the region is this side's again (the
            # replica refuses it from a second before) and the request goes elsewhere.
            ack = await (asyncio.wait_for(call.read(), self.lease_s) if region is not None else call.read())
        except TimeoutError:
            call.cancel()
            raise Overloaded(f"{peer}: no ack within the KV lease ({self.lease_s:g} s, --kv-lease-s)") from None
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # A write to a call that already failed raises InvalidStateError; the status says why.
            raise await error_of_call(call, peer=peer) from None
        if ack is grpc.aio.EOF:
            if await call.code() != grpc.StatusCode.OK:
                raise await error_of_call(call, peer=peer)
            raise ReplicaFailed(f"{peer}: the decode replica ended the stream without acknowledging the KV")
        if ack.WhichOneof("kind") != "ack":
            raise ReplicaFailed(f"{peer}: the decode replica answered the KV with a {ack.WhichOneof('kind')}, not an ack")
        seconds = time.perf_counter() - start - ack.ack.queue_ms / 1000
        await call.done_writing()
        return Transfer(
            bytes_sent=sent, seconds=seconds, queue_ms=ack.ack.queue_ms, slot=ack.ack.slot, transport=SHM if region is not None else CHUNKS
        )

    def _region(self, kv: OutboundKV) -> SharedRegion | None:
        """The sealed region holding the KV: the one it was exported into, else a copy into a free
        one (which `kv` then owns); None when the arena has no room."""
        if kv.region is None and self.arena is not None:
            kv.region = self.arena.put([s for s in kv.snapshots if s is not None])
        return kv.region.sealed if kv.region is not None else None

    async def _write_chunks(self, call: grpc.aio.StreamStreamCall, kv: OutboundKV) -> int:
        sent = 0
        for kv_set, snapshot in enumerate(kv.snapshots):
            assert snapshot is not None, "KV released before it was sent"
            for c in iter_chunks(snapshot, max_bytes=self.chunk_bytes):
                sent += c.nbytes
                await call.write(encode_chunk(c, kv_set=kv_set))
        await call.write(decode_pb2.DecodeRequest(commit=decode_pb2.Commit()))
        return sent

    def close(self) -> None:
        if self.arena is not None:
            self.arena.close()


# ---------------------------------------------------------------- the receiving side


@dataclass(eq=False)
class ReceivedKV:
    """One request's KV on the receiving side, until it is imported into a slot. Through shared
    memory the snapshots view the sender's arena, which the sender reuses once it has the ack:
    import before acknowledging."""

    snapshots: list[KVSnapshot]
    transport: str
    nbytes: int
    shared: SharedKV | None = None
    lease_expires_ms: int = 0
    """When the sender takes its shared region back (Unix ms; 0: no lease)."""

    @property
    def has_draft(self) -> bool:
        return len(self.snapshots) > 1

    def import_into(self, slot: int, engine: Engine, draft: Engine | None = None) -> bool:
        """Check the KV (a shared region's CRC-32, just before the import, which then reads bytes the
        check has just brought into this core's cache) and import it into `slot` of `engine`, and of
        `draft` when a draft set came; returns whether it did. KVCorrupted takes no slot. Nothing
        views the sender's memory afterwards."""
        if self.shared is not None:
            check_lease(self.lease_expires_ms)
            self.shared.verify()
        snapshots, self.snapshots, self.shared = self.snapshots, [], None
        engine.import_kv(slot, snapshots[0])
        if draft is not None and len(snapshots) > 1:
            draft.import_kv(slot, snapshots[1])
            return True
        return False


class KVReceiver:
    """Decode's side: the probe it advertises in the shared-memory directory (None: chunks only)
    and the receiving of each request's KV."""

    def __init__(self, shm_dir: Path | None) -> None:
        self.reader = SharedKVReader(shm_dir) if shm_dir is not None else None
        self.probe: Probe | None = None
        self.received = {SHM: 0, CHUNKS: 0}
        """Requests whose KV came by each transport."""

    @property
    def probe_name(self) -> str:
        """The probe file GetLoad advertises ("" without one: chunks only)."""
        return self.probe.name if self.probe is not None else ""

    def advertise(self) -> None:
        """Create the probe file, after removing files of services that crashed, so prefill services
        on this host can tell that they share the directory; without it (no directory, or not
        writable) KV arrives as chunks only."""
        if self.reader is None:
            return
        directory = self.reader.directory
        try:
            for name in remove_stale(directory):
                log.info("removed %s from %s: the service that made it is gone", name, directory)
            self.probe = Probe(directory)
        except OSError as exc:
            log.warning("KV through shared memory is off: cannot create a file in --kv-shm-dir %s (%s)", directory, exc.strerror)
            self.reader = None
            return
        log.info("taking KV through shared memory in %s from prefill services that see %s there", directory, self.probe.name)

    async def receive(self, header: decode_pb2.DecodeHeader, requests: DecodeRequests) -> ReceivedKV:
        """The KV the header announces: out of the sender's arena at once when the header names a
        region (its views; `ReceivedKV.import_into` checks its CRC-32), else the chunks up to the
        commit, assembled and checked."""
        layouts = [Layout.from_pb(header.layout)]
        if header.HasField("draft_layout"):
            layouts.append(Layout.from_pb(header.draft_layout))
        if header.HasField("shared_kv"):
            ref = header.shared_kv
            if self.reader is None:
                raise SharedMemoryUnreadable("this decode replica takes KV as chunks only (no --kv-shm-dir, or not writable)")
            region = SharedRegion(name=ref.name, offset=ref.offset, nbytes=ref.nbytes, crc32=ref.crc32)
            try:
                shared = self.reader.read(region, layouts)
            except SharedMemoryUnreadable as exc:
                raise SharedMemoryUnreadable(
                    f"{exc}: the sender does not share this replica's --kv-shm-dir ({self.reader.directory}), send chunks"
                ) from None
            self.received[SHM] += 1
            check_lease(ref.lease_expires_unix_ms)
            return ReceivedKV(
                snapshots=shared.snapshots, transport=SHM, nbytes=region.nbytes, shared=shared, lease_expires_ms=ref.lease_expires_unix_ms
            )
        assemblers = [KVAssembler(layout) for layout in layouts]
        async for message in requests.chunks():
            if message.kv_set >= len(assemblers):
                raise KVCorrupted(f"chunk for KV set {message.kv_set}, but the header announced {len(assemblers)} set(s)")
            assemblers[message.kv_set].add(message.chunk)
        snapshots = [a.snapshot() for a in assemblers]
        self.received[CHUNKS] += 1
        return ReceivedKV(snapshots=snapshots, transport=CHUNKS, nbytes=sum(a.bytes_received for a in assemblers))

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()
            self.probe = None
