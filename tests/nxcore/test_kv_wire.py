"""KV snapshot <-> chunks: zero-copy sending, one preallocated buffer on receipt, integrity checks."""

from __future__ import annotations

import zlib

import pytest
import torch

from nxcore.kv_cache import KVSnapshot
from nxcore.kv_wire import KVAssembler, KVChunk, KVTransferError, iter_chunks

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
