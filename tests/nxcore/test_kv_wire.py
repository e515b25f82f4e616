"""KV snapshot <-> chunks: zero-copy sending, one preallocated buffer on receipt, integrity checks."""

from __future__ import annotations

import fcntl
import zlib
from pathlib import Path

import pytest
import torch

from nxcore.kv_cache import KVSnapshot
from nxcore.kv_wire import (
    PROBE_PREFIX, KVArena, KVAssembler, KVChunk, KVTransferError, Layout, SharedKVReader, SharedKVUnreadable, SharedRegion,
    Probe, crc32_of, iter_chunks, remove_stale, sees_probe, snapshot_parts,
)

LAYERS, HEADS, TOKENS, DIM = 3, 2, 7, 16


def _snapshot(dtype: torch.dtype = torch.float32) -> KVSnapshot:
    g = torch.Generator().manual_seed(0)
    shape = (LAYERS, HEADS, TOKENS, DIM)
    return KVSnapshot(keys=torch.randn(shape, generator=g).to(dtype), values=torch.randn(shape, generator=g).to(dtype))


def _assembler(dtype: str = "float32") -> KVAssembler:
    return KVAssembler(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, n_tokens=TOKENS, dtype=dtype)


def _received(chunk: KVChunk) -> KVChunk:
    """The chunk as a receiver sees it: its bytes in one run."""
    return KVChunk(chunk.layer_start, chunk.layer_end, chunk.token_start, chunk.token_end, (memoryview(chunk.data),), chunk.crc32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("max_bytes", [1 << 20, 2 * HEADS * DIM * 4 * TOKENS, 600])
def test_round_trip_is_exact(dtype: torch.dtype, max_bytes: int) -> None:
    """Whole-layer groups, one layer per chunk, and layers split by tokens all come back bit for bit."""
    kv = _snapshot(dtype)
    assembler = _assembler(str(dtype).removeprefix("torch."))
    chunks = list(iter_chunks(kv, max_bytes=max_bytes))
    for chunk in chunks:
        assert chunk.nbytes <= max(max_bytes, 2 * HEADS * DIM * kv.keys.element_size())
        assembler.add(_received(chunk))
    out = assembler.snapshot()
    assert torch.equal(out.keys.view(torch.uint8), kv.keys.view(torch.uint8))
    assert torch.equal(out.values.view(torch.uint8), kv.values.view(torch.uint8))
    assert assembler.bytes_received == kv.nbytes == sum(c.nbytes for c in chunks)


def test_chunk_layout_and_checksum_are_the_wire_format() -> None:
    """K block then V block, row-major [layers, heads, tokens, head_dim], CRC-32 as zlib computes it."""
    kv = _snapshot()
    split = list(iter_chunks(kv, max_bytes=600))  # one layer is 1792 bytes: split by tokens
    c = split[1]
    assert (c.layer_start, c.layer_end) == (0, 1) and c.token_start > 0
    expected = torch.cat([kv.keys[0:1, :, c.token_start:c.token_end].reshape(-1),
                          kv.values[0:1, :, c.token_start:c.token_end].reshape(-1)]).numpy().tobytes()
    assert c.data == expected and c.crc32 == zlib.crc32(expected)


def test_sent_chunks_are_views_of_the_snapshot() -> None:
    """No copy before the transport: a change to the snapshot shows in an already built chunk."""
    kv = _snapshot()
    [whole] = list(iter_chunks(kv))
    assert len(whole.parts) == 2  # the K block and the V block, each one run
    kv.keys[0, 0, 0, 0] = 1234.5
    kv.values[-1, -1, -1, -1] = -1234.5
    data = whole.data
    assert data[:4] == torch.tensor([1234.5]).numpy().tobytes()
    assert data[-4:] == torch.tensor([-1234.5]).numpy().tobytes()


def test_assembler_fills_one_preallocated_buffer() -> None:
    assembler = _assembler()
    keys_ptr = assembler.keys.data_ptr()
    for chunk in iter_chunks(_snapshot(), max_bytes=600):
        assembler.add(_received(chunk))
    out = assembler.snapshot()
    assert out.keys.data_ptr() == keys_ptr
    assert out.keys.untyped_storage().data_ptr() == out.values.untyped_storage().data_ptr()
    assert out.keys.is_contiguous() and out.values.is_contiguous()


def test_corrupted_resized_misplaced_and_missing_chunks_are_refused() -> None:
    [chunk] = list(iter_chunks(_snapshot()))
    data = bytearray(chunk.data)
    data[100] ^= 1
    corrupted = KVChunk(0, LAYERS, 0, TOKENS, (memoryview(bytes(data)),), chunk.crc32)
    with pytest.raises(KVTransferError, match="CRC-32"):
        _assembler().add(corrupted)
    short = KVChunk(0, LAYERS, 0, TOKENS, (memoryview(chunk.data[:-4]),), zlib.crc32(chunk.data[:-4]))
    with pytest.raises(KVTransferError, match="expected"):
        _assembler().add(short)
    outside = KVChunk(0, LAYERS + 1, 0, TOKENS, chunk.parts, chunk.crc32)
    with pytest.raises(KVTransferError, match="outside the layout"):
        _assembler().add(outside)
    assembler = _assembler()
    assembler.add(_received(next(iter(iter_chunks(_snapshot(), max_bytes=600)))))
    with pytest.raises(KVTransferError, match="incomplete"):
        assembler.snapshot()
    with pytest.raises(KVTransferError, match="not supported"):
        _assembler("int8")


# ---------------------------------------------------------------- shared memory


def _layout(kv: KVSnapshot) -> Layout:
    return Layout(*kv.keys.shape[:2], kv.keys.shape[2], kv.keys.shape[3], str(kv.keys.dtype).removeprefix("torch."))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_arena_region_round_trip_with_a_draft_set_is_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    target = _snapshot(dtype)
    draft = KVSnapshot(keys=target.keys[:1, :, :5].contiguous() * 3, values=target.values[:1, :, :5].contiguous() - 1)
    arena = KVArena(tmp_path, 1 << 16)
    region = arena.put([target, draft])
    assert region.name == arena.name and region.offset == 0
    assert region.nbytes == 2 * target.keys.nbytes + 2 * draft.keys.nbytes
    assert region.crc32 == zlib.crc32(b"".join(bytes(t.contiguous().view(torch.uint8).numpy()) for t in
                                               (target.keys, target.values, draft.keys, draft.values)))
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
    arena.release(b)
    assert arena.put([kv]).offset == 8192
    for r in (a, c):
        arena.release(r)
    again = arena.put([kv])
    assert again.offset == 0  # first fit: the freed span at 0
    for r in (again, SharedRegion(arena.name, 8192, kv.keys.nbytes * 2, 0)):
        arena.release(r)
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
    region = arena.seal(reserved)
    copied = arena.put([target, draft])
    assert copied.offset == 4096 and region.crc32 == copied.crc32  # the page after the reserved region (3584 bytes)
    got = SharedKVReader(tmp_path).snapshots(region, [_layout(target), _layout(draft)])
    assert torch.equal(got[0].keys, target.keys) and torch.equal(got[1].values, draft.values)
    assert arena.reserve([Layout(64, 8, 64, 64, "float32")]) is None  # does not fit: export into new tensors
    arena.release(reserved)
    arena.release(copied)
    assert arena.in_use == 0
    arena.close()  # the views of the reserved region are still alive: closing neither fails nor frees them
    assert list(tmp_path.iterdir()) == [] and torch.equal(reserved.snapshots[0].keys, target.keys)


def test_reader_refuses_bad_names_bounds_sizes_checksums_and_missing_arenas(tmp_path: Path) -> None:
    kv = _snapshot()
    arena = KVArena(tmp_path, 1 << 16)
    region = arena.put([kv])
    reader = SharedKVReader(tmp_path)
    layouts = [_layout(kv)]
    for bad, match in [
        (SharedRegion("../../etc/passwd", 0, region.nbytes, region.crc32), "not nxserve-kv-"),
        (SharedRegion(region.name, 0, region.nbytes - 4, region.crc32), "layouts need"),
        (SharedRegion(region.name, (1 << 16) - 4096, region.nbytes, region.crc32), "outside arena"),
        (SharedRegion(region.name, 0, region.nbytes, region.crc32 ^ 1), "CRC-32"),
    ]:
        with pytest.raises(KVTransferError, match=match):
            reader.snapshots(bad, layouts)
    with pytest.raises(SharedKVUnreadable, match="cannot open"):
        SharedKVReader(tmp_path / "elsewhere").snapshots(region, layouts)
    unchecked = reader.read(SharedRegion(region.name, 0, region.nbytes, region.crc32 ^ 1), layouts)
    assert torch.equal(unchecked.snapshots[0].keys, kv.keys) and torch.equal(unchecked.snapshots[0].values, kv.values)
    with pytest.raises(KVTransferError, match="CRC-32"):  # checked later, by whoever reads them (the decode loop)
        unchecked.verify()
    reader.read(region, layouts).verify()
    arena.close()


def test_reader_drops_the_mappings_of_arenas_that_are_gone(tmp_path: Path) -> None:
    kv = _snapshot()
    reader = SharedKVReader(tmp_path, max_arenas=2)
    first = KVArena(tmp_path, 1 << 14)
    view = reader.snapshots(first.put([kv]), [_layout(kv)])[0]
    first.close()
    assert torch.equal(view.keys, kv.keys)  # a view outlives the sender's arena file
    arenas = [KVArena(tmp_path, 1 << 14) for _ in range(3)]
    for arena in arenas:
        reader.snapshots(arena.put([kv]), [_layout(kv)])
    assert list(reader._maps) == [a.name for a in arenas[1:]]  # the removed one first, then the oldest
    for arena in arenas:
        arena.close()


def test_stale_arenas_and_probes_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    live_arena, live_probe = KVArena(tmp_path, 1 << 14), Probe(tmp_path)
    stale = [tmp_path / ("nxserve-kv-" + "0" * 32), tmp_path / ("nxserve-decode-" + "1" * 32)]
    for path in stale:
        path.write_bytes(b"left by a crashed service")
    other = tmp_path / "nxserve-kv-notes.txt"
    other.write_text("not an arena")
    assert remove_stale(tmp_path) == sorted(p.name for p in stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live_arena.name, live_probe.name, other.name])
    live_arena.close(), live_probe.close()
    assert [p.name for p in tmp_path.iterdir()] == [other.name]


@pytest.mark.parametrize("make", [lambda d: KVArena(d, 1 << 14), Probe])
def test_a_file_being_created_is_never_taken_for_a_stale_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make) -> None:  # noqa: ANN001
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
