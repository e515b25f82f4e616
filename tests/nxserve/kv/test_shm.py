"""Shared memory on one host: arena regions written in place or copied, read back exactly, checked,
released once; probes and stale files."""

from __future__ import annotations

import fcntl
import stat
import zlib
from pathlib import Path

import pytest
import torch

from nxcore.kv_cache import KVSnapshot
from nxserve.kv.codec import Layout, crc32_of, snapshot_parts
from nxserve.kv.shm import PROBE_PREFIX, KVArena, Probe, SharedKVReader, SharedRegion, remove_stale, sees_probe
from nxserve.rpc.errors import InvalidRequest, KVCorrupted, SharedMemoryUnreadable

LAYERS, HEADS, TOKENS, DIM = 3, 2, 7, 16


def _snapshot(dtype: torch.dtype = torch.float32) -> KVSnapshot:
    g = torch.Generator().manual_seed(0)
    shape = (LAYERS, HEADS, TOKENS, DIM)
    return KVSnapshot(keys=torch.randn(shape, generator=g).to(dtype), values=torch.randn(shape, generator=g).to(dtype))


def _layout(kv: KVSnapshot) -> Layout:
    return Layout(*kv.keys.shape[:2], kv.keys.shape[2], kv.keys.shape[3], str(kv.keys.dtype).removeprefix("torch."))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_arena_region_round_trip_with_a_draft_set_is_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    target = _snapshot(dtype)
    draft = KVSnapshot(keys=target.keys[:1, :, :5].contiguous() * 3, values=target.values[:1, :, :5].contiguous() - 1)
    arena = KVArena(tmp_path, 1 << 16)
    region = arena.put([target, draft]).sealed
    assert region.name == arena.name and region.offset == 0
    assert region.nbytes == 2 * target.keys.nbytes + 2 * draft.keys.nbytes
    assert region.crc32 == zlib.crc32(
        b"".join(bytes(t.contiguous().view(torch.uint8).numpy()) for t in (target.keys, target.values, draft.keys, draft.values))
    )
    got = SharedKVReader(tmp_path).snapshots(region, [_layout(target), _layout(draft)])
    for snapshots in (got, [target, draft]):  # the region's CRC-32 is its snapshots' bytes, in order
        assert crc32_of(tuple(memoryview(part) for kv in snapshots for part in snapshot_parts(kv))) == region.crc32
    for mine, theirs in zip([target, draft], got):
        assert theirs.keys.dtype == dtype and torch.equal(theirs.keys, mine.keys) and torch.equal(theirs.values, mine.values)
    arena.close()
    assert list(tmp_path.iterdir()) == []


def test_arena_reuses_released_regions_and_refuses_what_does_not_fit(tmp_path: Path) -> None:
    kv = _snapshot()  # 5376 bytes: two 4 KiB pages
    arena = KVArena(tmp_path, 6 * 4096)
    a, b, c = (arena.put([kv]) for _ in range(3))
    assert [r.offset for r in (a, b, c)] == [0, 8192, 16384] and arena.in_use == 6 * 4096
    assert arena.put([kv]) is None  # full: the sender sends chunks
    b.release()
    b.release()  # a region goes back once, however often it is released
    assert arena.in_use == 4 * 4096
    refilled = arena.put([kv])
    assert refilled.offset == 8192
    for r in (a, c):
        r.release()
    again = arena.put([kv])
    assert again.offset == 0  # first fit: the freed span at 0
    again.release()
    refilled.release()
    assert arena.in_use == 0 and arena._free == [(0, 6 * 4096)]  # merged back into one span
    with pytest.raises(ValueError, match="at least"):
        KVArena(tmp_path, 100)
    arena.close()


def test_reserved_regions_are_written_in_place_then_sealed(tmp_path: Path) -> None:
    """`reserve` hands out views of the arena to export into; `seal` names the region as it then
    holds (the same bytes and CRC-32 as `put` of the same snapshots); both share the free list."""
    target = _snapshot(torch.bfloat16)
    draft = KVSnapshot(keys=target.keys[:1].contiguous() * 3, values=target.values[:1].contiguous() - 1)
    arena = KVArena(tmp_path, 1 << 16)
    reserved = arena.reserve([_layout(target), _layout(draft)])
    assert reserved.offset == 0 and reserved.nbytes == 2 * target.keys.nbytes + 2 * draft.keys.nbytes
    for view, kv in zip(reserved.snapshots, (target, draft)):
        assert view.keys.shape == kv.keys.shape and view.keys.dtype == kv.keys.dtype and view.keys.is_contiguous()
        view.keys.copy_(kv.keys)
        view.values.copy_(kv.values)
    region = reserved.seal()
    copied = arena.put([target, draft])
    assert copied.offset == 4096 and region.crc32 == copied.sealed.crc32  # the page after the reserved region (3584 bytes)
    got = SharedKVReader(tmp_path).snapshots(region, [_layout(target), _layout(draft)])
    assert torch.equal(got[0].keys, target.keys) and torch.equal(got[1].values, draft.values)
    assert arena.reserve([Layout(64, 8, 64, 64, "float32")]) is None  # does not fit: export into new tensors
    views = reserved.snapshots
    reserved.release()
    copied.release()
    assert arena.in_use == 0 and reserved.snapshots == ()
    arena.close()  # the views of the reserved region are still alive: closing neither fails nor frees them
    assert list(tmp_path.iterdir()) == [] and torch.equal(views[0].keys, target.keys)


def test_reader_refuses_bad_names_bounds_sizes_checksums_and_missing_arenas(tmp_path: Path) -> None:
    kv = _snapshot()
    arena = KVArena(tmp_path, 1 << 16)
    region = arena.put([kv]).sealed
    reader = SharedKVReader(tmp_path)
    layouts = [_layout(kv)]
    with pytest.raises(InvalidRequest, match="not nxserve-kv-"):
        reader.snapshots(SharedRegion("../../etc/passwd", 0, region.nbytes, region.crc32), layouts)
    for bad, match in [
        (SharedRegion(region.name, 0, region.nbytes - 4, region.crc32), "layouts need"),
        (SharedRegion(region.name, (1 << 16) - 4096, region.nbytes, region.crc32), "outside arena"),
        (SharedRegion(region.name, 0, region.nbytes, region.crc32 ^ 1), "CRC-32"),
    ]:
        with pytest.raises(KVCorrupted, match=match):
            reader.snapshots(bad, layouts)
    with pytest.raises(SharedMemoryUnreadable, match="cannot open"):
        SharedKVReader(tmp_path / "elsewhere").snapshots(region, layouts)
    unchecked = reader.read(SharedRegion(region.name, 0, region.nbytes, region.crc32 ^ 1), layouts)
    assert torch.equal(unchecked.snapshots[0].keys, kv.keys) and torch.equal(unchecked.snapshots[0].values, kv.values)
    with pytest.raises(KVCorrupted, match="CRC-32"):  # checked later, by whoever reads them (the decode loop)
        unchecked.verify()
    reader.read(region, layouts).verify()
    arena.close()


def test_reader_drops_the_mappings_of_arenas_that_are_gone(tmp_path: Path) -> None:
    kv = _snapshot()
    reader = SharedKVReader(tmp_path, max_arenas=2)
    first = KVArena(tmp_path, 1 << 14)
    view = reader.snapshots(first.put([kv]).sealed, [_layout(kv)])[0]
    first.close()
    assert torch.equal(view.keys, kv.keys)  # a view outlives the sender's arena file
    arenas = [KVArena(tmp_path, 1 << 14) for _ in range(3)]
    for arena in arenas:
        reader.snapshots(arena.put([kv]).sealed, [_layout(kv)])
    assert list(reader._maps) == [a.name for a in arenas[1:]]  # the removed one first, then the oldest
    for arena in arenas:
        arena.close()


def test_stale_arenas_and_probes_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    live_arena, live_probe = KVArena(tmp_path, 1 << 14), Probe(tmp_path)
    stale = [(tmp_path / ("nxserve-kv-" + "0" * 32), "arena"), (tmp_path / ("nxserve-decode-" + "1" * 32), "probe")]
    for folder, file in stale:
        folder.mkdir(mode=0o700)
        (folder / file).write_bytes(b"left by a crashed service")
    other = tmp_path / "nxserve-kv-notes.txt"
    other.write_text("not an arena")
    planted = tmp_path / ("nxserve-kv-" + "2" * 32)  # a link in place of a folder is never followed, nor removed
    planted.symlink_to(tmp_path / "elsewhere")
    assert remove_stale(tmp_path) == sorted(folder.name for folder, _ in stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live_arena.name, live_probe.name, other.name, planted.name])
    live_arena.close(), live_probe.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, planted.name])


def test_arenas_and_probes_are_private_to_their_user(tmp_path: Path) -> None:
    arena, probe = KVArena(tmp_path, 1 << 14), Probe(tmp_path)
    for folder, file in ((tmp_path / arena.name, "arena"), (tmp_path / probe.name, "probe")):
        assert stat.S_IMODE(folder.lstat().st_mode) == 0o700 and stat.S_IMODE((folder / file).lstat().st_mode) == 0o600
    (tmp_path / "nxserve-kv-linked").mkdir()
    target = tmp_path / ("nxserve-kv-" + "3" * 32)
    target.symlink_to(tmp_path / arena.name)  # a name that leads to a real arena through a link is refused
    region = arena.put([_snapshot()]).sealed
    with pytest.raises(SharedMemoryUnreadable, match="cannot open"):
        SharedKVReader(tmp_path).read(SharedRegion(target.name, region.offset, region.nbytes, region.crc32), [_layout(_snapshot())])
    arena.close(), probe.close()


@pytest.mark.parametrize("make", [lambda d: KVArena(d, 1 << 14), Probe])
def test_a_file_being_created_is_never_taken_for_a_stale_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make) -> None:
    """Another service's `remove_stale` running between the creation of a file and its lock (here:
    just before the lock) finds nothing of it to remove."""
    flock = fcntl.flock
    removed: list[list[str]] = []

    def racing_flock(fd: int, operation: int) -> None:
        if not removed:  # the creator's lock: the other service's sweep comes first (its own locks pass)
            removed.append(remove_stale(tmp_path))
        flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", racing_flock)
    made = make(tmp_path)
    monkeypatch.setattr(fcntl, "flock", flock)
    assert removed == [[]] and [p.name for p in tmp_path.iterdir()] == [made.name]
    assert remove_stale(tmp_path) == []  # locked under its name
    made.close()
    assert list(tmp_path.iterdir()) == []


def test_probe_files_tell_who_shares_the_directory(tmp_path: Path) -> None:
    probe = Probe(tmp_path)
    assert probe.name.startswith(PROBE_PREFIX) and sees_probe(tmp_path, probe.name)
    assert not sees_probe(tmp_path / "other", probe.name)
    (tmp_path / "passwd").write_text("")
    assert not sees_probe(tmp_path, "passwd") and not sees_probe(tmp_path, "../" + tmp_path.name + "/" + probe.name)
    probe.close()
    assert not sees_probe(tmp_path, probe.name)
