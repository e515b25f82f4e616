"""KV through shared memory on one host: the sender's arena, the receiver's reader, probe files.

The sender keeps one file in a shared-memory directory, reserved and mapped once (`KVArena`); a
request's KV is exported straight into a `Region` of it (the one copy out of the cache) or copied
there, and the receiver is told the region's name, offset, size and CRC-32 (`SharedRegion`). The
receiver maps the arena once (`SharedKVReader`) and the engine's import is the only copy out.

A receiver advertises a `Probe`: a sender that sees it in its own directory shares that directory.
Each arena and probe is a folder of its own (mode 0700) holding one file (0600): only the user
that made it can open it, so prefill and decode share memory only when they run as the same user
(one pod), and nothing else on the host can read or plant KV. The file stays locked (flock) while
its process lives, so the next service that starts in the directory can tell a leftover of a
crashed one and remove it (`remove_stale`).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from isal import isal_zlib

from nxcore.kv_cache import KVSnapshot
from nxserve.kv.codec import Layout, snapshot_parts, views
from nxserve.rpc.errors import InvalidRequest, KVCorrupted, SharedMemoryUnreadable

ARENA_PREFIX = "nxserve-kv-"
_ARENA_NAME = re.compile(r"nxserve-kv-[0-9a-f]{32}")
PROBE_PREFIX = "nxserve-decode-"
_PROBE_NAME = re.compile(r"nxserve-decode-[0-9a-f]{32}")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


ARENA_FILE = "arena"
PROBE_FILE = "probe"


def _create_locked(directory: Path, name: str, file: str, flags: int) -> int:
    """Create the folder `directory/name` (a fresh name, mode 0700) holding `file` (mode 0600), the
    file locked for this process's life; returns the file's fd. On failure nothing is left behind.

    Only this user can look into the folder or open the file, so a sender and a receiver that share
    memory must run as the same user (one pod). The folder is made and its file locked under a
    hidden name, then renamed into place: made under its own name, it would be there unlocked for a
    moment, and another service starting at the same time (two decode replicas, say) could take it
    for a crashed one's in `remove_stale` and delete it."""
    hidden = Path(directory) / f".{name}.new"
    os.mkdir(hidden, 0o700)
    try:
        fd = os.open(hidden / file, flags | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    except BaseException:
        os.rmdir(hidden)
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(hidden, Path(directory) / name)
    except BaseException:
        os.close(fd)
        _remove(Path(directory), hidden.name, file)
        raise
    return fd


def valid_arena_name(name: str) -> bool:
    """Whether `name` is an arena's folder name (and so names nothing outside the shared directory)."""
    return _ARENA_NAME.fullmatch(name) is not None


def _remove(directory: Path, name: str, file: str) -> None:
    """Remove the folder `directory/name` and its `file`, if they are still there."""
    try:
        os.unlink(directory / name / file)
    except FileNotFoundError:
        pass
    try:
        os.rmdir(directory / name)
    except FileNotFoundError:
        pass


def remove_stale(directory: Path) -> list[str]:
    """Remove the arenas and probes in `directory` whose process no longer runs (their lock is
    free); returns their names. A live process's folders, and any this user may not lock, stay."""
    removed = []
    for path in sorted(Path(directory).glob("nxserve-*")):
        file = ARENA_FILE if valid_arena_name(path.name) else PROBE_FILE if _PROBE_NAME.fullmatch(path.name) else None
        if file is None or path.is_symlink() or not path.is_dir():
            continue
        try:
            fd = os.open(path / file, os.O_RDONLY | _NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live process holds it
        finally:
            os.close(fd)
        _remove(Path(directory), path.name, file)
        removed.append(path.name)
    return removed


class Probe:
    """The empty file a receiver advertises: a sender that sees it in its own shared directory shares
    that directory. Locked while this process lives, like an arena, so that `remove_stale` can tell
    a leftover of a receiver that crashed. OSError when the directory is not writable."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.name = PROBE_PREFIX + uuid.uuid4().hex
        self._fd: int | None = _create_locked(self.directory, self.name, PROBE_FILE, os.O_RDONLY)

    def close(self) -> None:
        if self._fd is not None:
            _remove(self.directory, self.name, PROBE_FILE)
            os.close(self._fd)
            self._fd = None


def sees_probe(directory: Path, name: str) -> bool:
    """Whether the receiver's probe `name` is in `directory` (names other than a probe's are refused)."""
    return _PROBE_NAME.fullmatch(name) is not None and (Path(directory) / name / PROBE_FILE).is_file()


@dataclass(frozen=True)
class SharedRegion:
    """Where a sender left snapshots in its arena, as a receiver is told: every snapshot in order,
    each K block then V block."""

    name: str
    """The arena's file name in the shared directory."""
    offset: int
    nbytes: int
    crc32: int


class Region:
    """A region of an arena, held from `KVArena.reserve` (or `put`) until `release`, which gives it
    back exactly once, whoever calls it and how often. `snapshots` view it; `seal` names it to a
    receiver, with the CRC-32 of what it holds then."""

    def __init__(self, arena: KVArena, offset: int, nbytes: int, snapshots: Sequence[KVSnapshot]) -> None:
        self.arena = arena
        self.offset = offset
        self.nbytes = nbytes
        self.snapshots = tuple(snapshots)
        self.sealed: SharedRegion | None = None
        self._released = False

    def seal(self) -> SharedRegion:
        """The region as it holds now (write it first), named for a receiver."""
        self.sealed = self.arena.describe(self.offset, self.nbytes)
        return self.sealed

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Give the region back to its arena (after the receiver's ack, or when the request is over;
        a receiver still reading would only serve a request nobody waits for). Idempotent."""
        if not self._released:
            self._released = True
            self.snapshots = ()
            self.arena.free(self.offset, self.nbytes)


class KVArena:
    """The sender's side: one file in a shared-memory directory, reserved and mapped once, whose
    regions hold the snapshots in flight. A region is written with one copy and stays unchanged
    until it is released. It is filled either in place (`reserve`: the engine exports into its
    views, the one copy of the KV out of the cache) or by copying snapshots (`put`).

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
        fd = _create_locked(self.directory, self.name, ARENA_FILE, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, nbytes)
            self._map = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            _remove(self.directory, self.name, ARENA_FILE)
            raise
        self._fd: int | None = fd  # holds the lock
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)
        self._free: list[tuple[int, int]] = [(0, nbytes)]  # (offset, size), sorted, never adjacent
        self._held = 0
        self._lock = threading.Lock()

    @property
    def regions_held(self) -> int:
        """Regions handed out and not released yet."""
        with self._lock:
            return self._held

    @property
    def in_use(self) -> int:
        """Bytes held by regions not yet released."""
        with self._lock:
            return self.nbytes - sum(length for _, length in self._free)

    def reserve(self, layouts: Sequence[Layout]) -> Region | None:
        """A free region for snapshots of these layouts, in order, as writable views of it (their
        contents undefined until written); None when no free region is large enough."""
        size = sum(layout.nbytes for layout in layouts)
        offset = self._allocate(size)
        if offset is None:
            return None
        raw = torch.from_numpy(self._bytes[offset : offset + size])
        return Region(self, offset, size, views(raw, layouts))

    def put(self, snapshots: Sequence[KVSnapshot]) -> Region | None:
        """A sealed region holding a copy of the snapshots; None when no free region is large enough."""
        parts = [p for kv in snapshots for p in snapshot_parts(kv)]
        size = sum(p.nbytes for p in parts)
        offset = self._allocate(size)
        if offset is None:
            return None
        pos = offset
        for part in parts:  # numpy, not torch: no OpenMP team on the calling thread
            self._bytes[pos : pos + part.nbytes] = part
            pos += part.nbytes
        region = Region(self, offset, size, ())
        region.seal()
        return region

    def describe(self, offset: int, size: int) -> SharedRegion:
        """The region [offset, offset + size) as a receiver is told of it, with its CRC-32 now."""
        return SharedRegion(name=self.name, offset=offset, nbytes=size, crc32=isal_zlib.crc32(self._bytes[offset : offset + size].data))

    def free(self, offset: int, nbytes: int) -> None:
        """Make [offset, offset + nbytes) free again: `Region.release`, which calls it once per region."""
        size = _aligned(max(nbytes, 1), self.ALIGN)
        with self._lock:
            spans = sorted([*self._free, (offset, size)])
            merged = [spans[0]]
            for start, length in spans[1:]:
                last_start, last_length = merged[-1]
                if last_start + last_length == start:
                    merged[-1] = (last_start, last_length + length)
                else:
                    merged.append((start, length))
            self._free = merged
            self._held -= 1

    def _allocate(self, nbytes: int) -> int | None:
        size = _aligned(max(nbytes, 1), self.ALIGN)
        with self._lock:
            for i, (offset, length) in enumerate(self._free):
                if length >= size:
                    self._free[i : i + 1] = [(offset + size, length - size)] if length > size else []
                    self._held += 1
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
        _remove(self.directory, self.name, ARENA_FILE)


def _aligned(n: int, align: int) -> int:
    return -(-n // align) * align


_CORRUPT_REGION = "shared KV region failed its CRC-32 check: the data is corrupted"


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
        """KVCorrupted unless the region's bytes have the CRC-32 the sender gave."""
        if isal_zlib.crc32(self.raw) != self.crc32:
            raise KVCorrupted(_CORRUPT_REGION)


class SharedKVReader:
    """The receiver's side: maps each sender's arena once and reads snapshots out of its regions.

    The snapshots are views of the sender's memory, valid only until the sender releases the
    region: the receiver must copy them (the engine's `import_kv`) before it acknowledges. Mappings
    of arenas whose file is gone (a stopped sender) are dropped when a new arena shows up; at most
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
        that core's cache). SharedMemoryUnreadable when the arena cannot be opened here."""
        if not valid_arena_name(region.name):
            raise InvalidRequest(f"shared KV arena name {region.name!r} is not {ARENA_PREFIX}<32 hex digits>")
        expected = sum(layout.nbytes for layout in layouts)
        if region.nbytes != expected:
            raise KVCorrupted(f"shared KV region of {region.nbytes} bytes, the layouts need {expected}")
        mapping = self._mapping(region.name)
        if region.offset < 0 or region.offset + region.nbytes > len(mapping):
            raise KVCorrupted(
                f"shared KV region [{region.offset}, {region.offset + region.nbytes}) is outside arena {region.name} of {len(mapping)} bytes"
            )
        raw = memoryview(mapping)[region.offset : region.offset + region.nbytes]
        snapshots = views(torch.frombuffer(mapping, dtype=torch.uint8, count=region.nbytes, offset=region.offset), layouts)
        return SharedKV(raw=raw, crc32=region.crc32, snapshots=snapshots)

    def _mapping(self, name: str) -> mmap.mmap:
        mapping = self._maps.get(name)
        if mapping is not None:
            self._maps.move_to_end(name)
            return mapping
        for old in [n for n in self._maps if not (self.directory / n).exists()]:
            del self._maps[old]  # unmapped once no snapshot views it any more
        path = self.directory / name / ARENA_FILE
        try:  # neither the folder nor the file may be a symbolic link
            folder = os.open(self.directory / name, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
            try:
                fd = os.open(ARENA_FILE, os.O_RDWR | _NOFOLLOW, dir_fd=folder)
            finally:
                os.close(folder)
        except OSError as exc:
            raise SharedMemoryUnreadable(f"cannot open the shared KV arena {path}: {exc.strerror}") from None
        try:
            # Writable only because torch.frombuffer wants a writable buffer; nothing writes to it.
            mapping = mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as exc:
            raise SharedMemoryUnreadable(f"cannot map the shared KV arena {path}: {exc}") from None
        finally:
            os.close(fd)
        self._maps[name] = mapping
        while len(self._maps) > self.max_arenas:
            self._maps.popitem(last=False)
        return mapping
