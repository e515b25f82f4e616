"""A KV snapshot as bounded byte chunks and back, independent of any transport.

A chunk covers layers [layer_start, layer_end) x tokens [token_start, token_end) and carries the
K block then the V block, each `[layers, kv_heads, tokens, head_dim]`, as raw bytes with a CRC-32.
Whole layers are grouped while they fit `max_bytes`; a layer larger than that is split by tokens.

On one host the snapshot can instead travel through shared memory: the sender exports it straight
into a region of its arena (`KVArena.reserve`, one file in a shared-memory directory, mapped once),
or copies a snapshot it holds there (`KVArena.put`), and names the region; the receiver views it
there (`SharedKVReader`) and the engine's import is the only copy out.

Neither side copies more than it must: a sent chunk is a list of views of the snapshot's memory
(one per block when whole layers are grouped, one per KV head when a layer is split by tokens),
its CRC-32 is computed over those views, and the transport joins them once into its message. The
receiving side checks each chunk and copies it once, into the snapshot it preallocated. Both copy
with numpy, never in a torch parallel region: its thread barrier can take milliseconds when the
engine's threads hold the cores.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from isal import isal_zlib

from nxcore.config import DTYPES
from nxcore.kv_cache import KVSnapshot

DEFAULT_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class KVChunk:
    layer_start: int
    layer_end: int
    token_start: int
    token_end: int
    parts: tuple[memoryview, ...]
    """The chunk's bytes (K block then V block) as consecutive runs: views of the sender's snapshot,
    or one run of the received message."""
    crc32: int
    """CRC-32 (zlib's polynomial) of the parts' bytes in order."""

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def data(self) -> bytes:
        """The chunk's bytes joined (a copy)."""
        return b"".join(self.parts)


class KVTransferError(ValueError):
    """A chunk that does not fit the announced layout, or whose checksum does not match."""


class SharedKVUnreadable(KVTransferError):
    """The sender's arena is not there or not readable: the sender does not share the directory."""


def crc32_of(parts: tuple[memoryview, ...]) -> int:
    """CRC-32 of the parts' bytes in order: zlib's checksum, computed by ISA-L (SIMD; zlib's own took
    about 0.25 ms per MiB on each side, ISA-L's 0.02 ms)."""
    crc = 0
    for part in parts:
        crc = isal_zlib.crc32(part, crc)
    return crc


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous tensor's memory as a numpy uint8 array `[..., last_dim * element_size]`, no copy
    (numpy has no bfloat16: the byte view works for every dtype)."""
    return t.contiguous().view(torch.uint8).numpy()


def _spans(shape: torch.Size, element_size: int, max_bytes: int) -> list[tuple[int, int, int, int]]:
    layers, heads, tokens, dim = shape
    token_bytes = 2 * heads * dim * element_size
    layer_bytes = token_bytes * tokens
    if layer_bytes <= max_bytes:
        step = max(1, max_bytes // max(layer_bytes, 1))
        return [(l, min(l + step, layers), 0, tokens) for l in range(0, layers, step)]
    per = max(1, max_bytes // token_bytes)
    return [(l, l + 1, t, min(t + per, tokens)) for l in range(layers) for t in range(0, tokens, per)]


def iter_chunks(kv: KVSnapshot, *, max_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[KVChunk]:
    """The snapshot's chunks; their parts are views of `kv`, valid while it is alive and unchanged."""
    keys, values = _as_bytes(kv.keys), _as_bytes(kv.values)
    whole_tokens = kv.n_tokens
    for l0, l1, t0, t1 in _spans(kv.keys.shape, kv.keys.element_size(), max_bytes):
        if t0 == 0 and t1 == whole_tokens:  # whole layers: each block is one contiguous run
            parts = (memoryview(keys[l0:l1]).cast("B"), memoryview(values[l0:l1]).cast("B"))
        else:  # part of one layer's tokens: one contiguous run per KV head
            parts = tuple(memoryview(block[l0, h, t0:t1]).cast("B") for block in (keys, values) for h in range(block.shape[1]))
        yield KVChunk(layer_start=l0, layer_end=l1, token_start=t0, token_end=t1, parts=parts, crc32=crc32_of(parts))


class KVAssembler:
    """Collects chunks into a snapshot of a known layout, checking ranges, sizes and checksums.

    K and V live in one buffer allocated up front; each chunk is copied into it once."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, n_tokens: int, dtype: str) -> None:
        torch_dtype = Layout(num_layers, num_kv_heads, n_tokens, head_dim, dtype).torch_dtype  # checks it is supported
        buffer = torch.empty((2, num_layers, num_kv_heads, n_tokens, head_dim), dtype=torch_dtype)
        self.keys, self.values = buffer[0], buffer[1]
        self._bytes = buffer.view(torch.uint8).numpy()  # [2, layers, heads, tokens, head_dim * element_size]
        self._filled = np.zeros((num_layers, n_tokens), dtype=bool)
        self.bytes_received = 0

    def add(self, chunk: KVChunk) -> None:
        _, layers, heads, tokens, row = self._bytes.shape
        l0, l1, t0, t1 = chunk.layer_start, chunk.layer_end, chunk.token_start, chunk.token_end
        where = f"chunk layers [{l0}, {l1}) x tokens [{t0}, {t1})"
        if not (0 <= l0 < l1 <= layers and 0 <= t0 < t1 <= tokens):
            raise KVTransferError(f"{where} is outside the layout ({layers} layers, {tokens} tokens)")
        block_shape = (l1 - l0, heads, t1 - t0, row)
        block_bytes = (l1 - l0) * heads * (t1 - t0) * row
        if chunk.nbytes != 2 * block_bytes:
            raise KVTransferError(f"{where} has {chunk.nbytes} bytes, expected {2 * block_bytes}")
        if crc32_of(chunk.parts) != chunk.crc32:
            raise KVTransferError(f"{where} failed its CRC-32 check: the data is corrupted")
        raw = np.frombuffer(chunk.parts[0] if len(chunk.parts) == 1 else chunk.data, dtype=np.uint8)
        self._bytes[:, l0:l1, :, t0:t1] = raw.reshape(2, *block_shape)
        self._filled[l0:l1, t0:t1] = True
        self.bytes_received += chunk.nbytes

    def snapshot(self) -> KVSnapshot:
        if not self._filled.all():
            missing = int((~self._filled).sum())
            raise KVTransferError(f"KV snapshot incomplete at commit: {missing} (layer, token) cells never arrived")
        return KVSnapshot(keys=self.keys, values=self.values)


# ---------------------------------------------------------------- shared memory on one host

ARENA_PREFIX = "nxserve-kv-"
_ARENA_NAME = re.compile(r"nxserve-kv-[0-9a-f]{32}")
PROBE_PREFIX = "nxserve-decode-"
_PROBE_NAME = re.compile(r"nxserve-decode-[0-9a-f]{32}")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _create_locked(path: Path, flags: int, mode: int) -> int:
    """Create `path` (a fresh name) locked for this process's life; returns the fd. On failure
    nothing is left behind.

    The file is created and locked under a hidden name, then renamed to `path`: created under
    `path` itself, it would be there unlocked for a moment, and another service starting at the
    same time (two decode replicas, say) could take it for a crashed one's in `remove_stale` and
    delete it."""
    hidden = path.with_name(f".{path.name}.new")
    fd = os.open(hidden, flags | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(hidden, path)
    except BaseException:
        os.close(fd)
        remove_file(path.parent, hidden.name)
        raise
    return fd


def valid_arena_name(name: str) -> bool:
    """Whether `name` is an arena's file name (and so names nothing outside the shared directory)."""
    return _ARENA_NAME.fullmatch(name) is not None


class Probe:
    """The empty file a receiver advertises: a sender that sees it in its own shared directory shares
    that directory. Locked while this process lives, like an arena, so that `remove_stale` can tell
    a leftover of a receiver that crashed. OSError when the directory is not writable."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.name = PROBE_PREFIX + uuid.uuid4().hex
        self._fd: int | None = _create_locked(self.directory / self.name, os.O_RDONLY, 0o644)

    def close(self) -> None:
        if self._fd is not None:
            remove_file(self.directory, self.name)
            os.close(self._fd)
            self._fd = None


def sees_probe(directory: Path, name: str) -> bool:
    """Whether the receiver's probe `name` is in `directory` (names other than a probe's are refused)."""
    return _PROBE_NAME.fullmatch(name) is not None and (Path(directory) / name).is_file()


def remove_file(directory: Path, name: str) -> None:
    """Remove a file of `directory` if it is still there."""
    try:
        os.unlink(Path(directory) / name)
    except FileNotFoundError:
        pass


@dataclass(frozen=True)
class SharedRegion:
    """Where a sender left snapshots in its arena: every snapshot in order, each K block then V block."""

    name: str
    """The arena's file name in the shared directory."""
    offset: int
    nbytes: int
    crc32: int


@dataclass(frozen=True)
class Reserved:
    """A region of an arena handed out empty (`KVArena.reserve`): `snapshots` are views of it, one
    per layout asked for, to export KV into in place; `KVArena.seal` then names it to a receiver."""

    offset: int
    nbytes: int
    snapshots: tuple[KVSnapshot, ...]


@dataclass(frozen=True)
class Layout:
    """One KV set's shape and dtype: K and V are each [num_layers, num_kv_heads, n_tokens, head_dim]."""

    num_layers: int
    num_kv_heads: int
    n_tokens: int
    head_dim: int
    dtype: str

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.num_layers, self.num_kv_heads, self.n_tokens, self.head_dim)

    @property
    def nbytes(self) -> int:
        """K and V together."""
        return 2 * math.prod(self.shape) * self.torch_dtype.itemsize

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in DTYPES:
            raise KVTransferError(f"KV dtype {self.dtype!r} is not supported: allowed {sorted(DTYPES)}")
        return DTYPES[self.dtype]


def _views(raw: torch.Tensor, layouts: Sequence[Layout]) -> list[KVSnapshot]:
    """Snapshots laid out one after the other in the byte tensor `raw`, each K block then V block."""
    snapshots, offset = [], 0
    for layout in layouts:
        half = layout.nbytes // 2
        k, v = (raw[start:start + half].view(layout.torch_dtype).view(layout.shape) for start in (offset, offset + half))
        snapshots.append(KVSnapshot(keys=k, values=v))
        offset += layout.nbytes
    return snapshots


_CORRUPT_REGION = "shared KV region failed its CRC-32 check: the data is corrupted"


def snapshot_parts(kv: KVSnapshot) -> tuple[np.ndarray, np.ndarray]:
    """The K block then the V block as flat byte arrays viewing the snapshot (no copy when contiguous)."""
    return _as_bytes(kv.keys).reshape(-1), _as_bytes(kv.values).reshape(-1)


class KVArena:
    """The sender's side: one file in a shared-memory directory, reserved and mapped once, whose
    regions hold the snapshots in flight. A region is written with one copy and stays unchanged
    until `release`, which the sender calls when the receiver has acknowledged (it copies before
    acknowledging) or the request is over. A region is filled either in place (`reserve`: the
    engine exports into its views, the one copy of the KV out of the cache) or by copying a
    snapshot (`put`); `seal` or `put` then gives the `SharedRegion` a receiver is told.

    Reserving the whole file up front (posix_fallocate) makes a directory that is too small fail
    here, not with SIGBUS on a later write; reusing its pages skips the page allocation and
    zeroing a new file would pay on every transfer. The file stays locked (flock) while this process
    lives, so a later sender can tell a leftover of a crashed one (`remove_stale`).
    Thread-safe: a service's engine thread reserves and seals regions, its event loop puts and
    releases them.
    """

    ALIGN = 4096

    def __init__(self, directory: Path, nbytes: int) -> None:
        if nbytes < self.ALIGN:
            raise ValueError(f"a KV arena needs at least {self.ALIGN} bytes, got {nbytes}")
        self.directory = Path(directory)
        self.name = ARENA_PREFIX + uuid.uuid4().hex
        self.nbytes = nbytes
        fd = _create_locked(self.directory / self.name, os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)
            self._map = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            remove_file(self.directory, self.name)
            raise
        self._fd = fd  # holds the lock
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)
        self._free: list[tuple[int, int]] = [(0, nbytes)]  # (offset, size), sorted, never adjacent
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        """Bytes held by regions not yet released."""
        with self._lock:
            return self.nbytes - sum(length for _, length in self._free)

    def reserve(self, layouts: Sequence[Layout]) -> Reserved | None:
        """A free region for snapshots of these layouts, in order, as writable views of it (their
        contents undefined until written); None when no free region is large enough."""
        size = sum(layout.nbytes for layout in layouts)
        offset = self._allocate(size)
        if offset is None:
            return None
        raw = torch.from_numpy(self._bytes[offset:offset + size])
        return Reserved(offset=offset, nbytes=size, snapshots=tuple(_views(raw, layouts)))

    def seal(self, reserved: Reserved) -> SharedRegion:
        """The region naming `reserved` as it holds now (its CRC-32 taken here): write it first."""
        return self._region(reserved.offset, reserved.nbytes)

    def put(self, snapshots: Sequence[KVSnapshot]) -> SharedRegion | None:
        """Copy the snapshots into a free region; None when no free region is large enough."""
        parts = [p for kv in snapshots for p in snapshot_parts(kv)]
        size = sum(p.nbytes for p in parts)
        offset = self._allocate(size)
        if offset is None:
            return None
        pos = offset
        for part in parts:  # numpy, not torch: no OpenMP team on the calling thread
            self._bytes[pos:pos + part.nbytes] = part
            pos += part.nbytes
        return self._region(offset, size)

    def _region(self, offset: int, size: int) -> SharedRegion:
        return SharedRegion(name=self.name, offset=offset, nbytes=size,
                            crc32=isal_zlib.crc32(memoryview(self._bytes[offset:offset + size])))

    def release(self, region: SharedRegion | Reserved) -> None:
        """Make a region `put` or `reserve` returned free again (once)."""
        size = _aligned(max(region.nbytes, 1), self.ALIGN)
        with self._lock:
            spans = sorted([*self._free, (region.offset, size)])
            merged = [spans[0]]
            for offset, length in spans[1:]:
                last_offset, last_length = merged[-1]
                if last_offset + last_length == offset:
                    merged[-1] = (last_offset, last_length + length)
                else:
                    merged.append((offset, length))
            self._free = merged

    def _allocate(self, nbytes: int) -> int | None:
        size = _aligned(max(nbytes, 1), self.ALIGN)
        with self._lock:
            for i, (offset, length) in enumerate(self._free):
                if length >= size:
                    self._free[i:i + 1] = [(offset + size, length - size)] if length > size else []
                    return offset
        return None

    def close(self) -> None:
        """Unmap and remove the file (a receiver's mapping stays valid until it drops it, and this
        side's until the last view of a reserved region is gone)."""
        if self._fd is None:
            return
        del self._bytes
        try:
            self._map.close()
        except BufferError:  # a reserved region's views are alive: the mapping goes with them
            pass
        os.close(self._fd)
        self._fd = None
        remove_file(self.directory, self.name)


def _aligned(n: int, align: int) -> int:
    return -(-n // align) * align


def remove_stale(directory: Path) -> list[str]:
    """Remove the arenas and probes in `directory` whose process no longer runs (their lock is
    free); returns their names. A live process's files, and any this user may not lock, stay."""
    removed = []
    for path in sorted(Path(directory).glob("nxserve-*")):
        if not (valid_arena_name(path.name) or _PROBE_NAME.fullmatch(path.name)):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live process holds it
        finally:
            os.close(fd)
        remove_file(directory, path.name)
        removed.append(path.name)
    return removed


@dataclass(frozen=True)
class SharedKV:
    """Snapshots read out of a region of another process's arena (`SharedKVReader.read`): views of
    its memory, valid until that process releases the region."""

    raw: memoryview
    """The region's bytes."""
    crc32: int
    """What the sender says `raw`'s CRC-32 is."""
    snapshots: list[KVSnapshot]

    def verify(self) -> None:
        """KVTransferError unless the region's bytes have the CRC-32 the sender gave."""
        if isal_zlib.crc32(self.raw) != self.crc32:
            raise KVTransferError(_CORRUPT_REGION)


class SharedKVReader:
    """The receiver's side: maps each sender's arena once and reads snapshots out of its regions.

    The snapshots are views of the sender's memory, valid only until the sender's `release`: the
    receiver must copy them (the engine's `import_kv`) before it acknowledges. Mappings of arenas
    whose file is gone (a stopped sender) are dropped when a new arena shows up; at most
    `max_arenas` stay mapped."""

    def __init__(self, directory: Path, *, max_arenas: int = 8) -> None:
        self.directory = Path(directory)
        self.max_arenas = max_arenas
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()

    def snapshots(self, region: SharedRegion, layouts: Sequence[Layout]) -> list[KVSnapshot]:
        """The snapshots (one per layout, in order) in the region, once its CRC-32 checks out (see
        `read` for the rest)."""
        shared = self.read(region, layouts)
        shared.verify()
        return shared.snapshots

    def read(self, region: SharedRegion, layouts: Sequence[Layout]) -> SharedKV:
        """The region and its snapshots (one per layout, in order), after checking its name, bounds
        and size but not its CRC-32: `SharedKV.verify` must pass before they are read (the decode
        loop runs it just before its import, which then reads bytes the check has just brought into
        that core's cache). SharedKVUnreadable when the arena cannot be opened here."""
        if not valid_arena_name(region.name):
            raise KVTransferError(f"shared KV arena name {region.name!r} is not {ARENA_PREFIX}<32 hex digits>")
        expected = sum(layout.nbytes for layout in layouts)
        if region.nbytes != expected:
            raise KVTransferError(f"shared KV region of {region.nbytes} bytes, the layouts need {expected}")
        mapping = self._mapping(region.name)
        if region.offset < 0 or region.offset + region.nbytes > len(mapping):
            raise KVTransferError(f"shared KV region [{region.offset}, {region.offset + region.nbytes}) is outside "
                                  f"arena {region.name} of {len(mapping)} bytes")
        raw = memoryview(mapping)[region.offset:region.offset + region.nbytes]
        snapshots = _views(torch.frombuffer(mapping, dtype=torch.uint8, count=region.nbytes, offset=region.offset), layouts)
        return SharedKV(raw=raw, crc32=region.crc32, snapshots=snapshots)

    def _mapping(self, name: str) -> mmap.mmap:
        mapping = self._maps.get(name)
        if mapping is not None:
            self._maps.move_to_end(name)
            return mapping
        for old in [n for n in self._maps if not (self.directory / n).exists()]:
            del self._maps[old]  # unmapped once no snapshot views it any more
        path = self.directory / name
        try:
            fd = os.open(path, os.O_RDWR | _NOFOLLOW)
        except OSError as exc:
            raise SharedKVUnreadable(f"cannot open the shared KV arena {path}: {exc.strerror}") from None
        try:
            # Writable only because torch.frombuffer wants a writable buffer; nothing writes to it.
            mapping = mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as exc:
            raise SharedKVUnreadable(f"cannot map the shared KV arena {path}: {exc}") from None
        finally:
            os.close(fd)
        self._maps[name] = mapping
        while len(self._maps) > self.max_arenas:
            self._maps.popitem(last=False)
        return mapping
