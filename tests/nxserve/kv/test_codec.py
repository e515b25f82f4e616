"""KV snapshot <-> chunks (zero-copy sending, one preallocated buffer on receipt, integrity checks),
and the Decode stream's requests encoded and decoded outside protobuf objects, byte-compatible with it."""

from __future__ import annotations

import zlib

import pytest
import torch
from google.protobuf.message import DecodeError

from nxcore.kv_cache import KVSnapshot
from nxserve.kv.codec import (
    ChunkMessage,
    KVAssembler,
    KVChunk,
    Layout,
    encode_chunk,
    iter_chunks,
    message_kind,
    parse_request,
    serialize_request,
)
from nxserve.rpc.errors import InvalidRequest, KVCorrupted
from nxserve.v1 import decode_pb2


def _chunks(max_bytes: int = 1 << 20):
    g = torch.Generator().manual_seed(1)
    kv = KVSnapshot(keys=torch.randn(2, 2, 5, 8, generator=g), values=torch.randn(2, 2, 5, 8, generator=g))
    return list(iter_chunks(kv, max_bytes=max_bytes))


def _fields(c: decode_pb2.KvChunk) -> tuple:
    return (c.layer_start, c.layer_end, c.token_start, c.token_end, bytes(c.data), c.crc32, c.kv_set)


def _message_fields(m: ChunkMessage) -> tuple:
    c = m.chunk
    return (c.layer_start, c.layer_end, c.token_start, c.token_end, c.data, c.crc32, m.kv_set)


@pytest.mark.parametrize("kv_set", [0, 1])
def test_encoded_chunk_is_a_decode_request(kv_set: int) -> None:
    for chunk in _chunks(max_bytes=200):  # several chunks, some starting at layer or token 0
        parsed = decode_pb2.DecodeRequest.FromString(encode_chunk(chunk, kv_set=kv_set))
        assert parsed.WhichOneof("kind") == "chunk"
        assert _fields(parsed.chunk) == (chunk.layer_start, chunk.layer_end, chunk.token_start, chunk.token_end, chunk.data, chunk.crc32, kv_set)


def test_parsed_chunk_is_a_view_of_the_message() -> None:
    [chunk] = _chunks()
    pb = decode_pb2.DecodeRequest(chunk=decode_pb2.KvChunk(layer_start=0, layer_end=2, token_end=5, data=chunk.data, crc32=chunk.crc32, kv_set=1))
    wire = pb.SerializeToString()
    message = parse_request(wire)
    assert isinstance(message, ChunkMessage) and message_kind(message) == "chunk"
    assert _message_fields(message) == _fields(pb.chunk)
    [part] = message.chunk.parts
    assert part.obj is wire  # no copy of the data


def test_other_requests_stay_protobuf_messages() -> None:
    header = decode_pb2.DecodeRequest(header=decode_pb2.DecodeHeader(request_id="r", prompt_token_ids=[1, 2]))
    commit = decode_pb2.DecodeRequest(commit=decode_pb2.Commit())
    for request, kind in ((header, "header"), (commit, "commit"), (decode_pb2.DecodeRequest(), None)):
        parsed = parse_request(request.SerializeToString())
        assert parsed == request and message_kind(parsed) == kind
    assert serialize_request(header) == header.SerializeToString()
    encoded = encode_chunk(_chunks()[0], kv_set=0)
    assert serialize_request(encoded) is encoded


def test_unusual_encodings_decode_as_protobuf_does() -> None:
    """Unknown fields, repeated fields, fields out of order, and a chunk merged from two messages."""
    [chunk] = _chunks()
    pb = decode_pb2.KvChunk(layer_start=1, layer_end=2, token_start=3, token_end=5, data=chunk.data, crc32=chunk.crc32, kv_set=1)
    body = pb.SerializeToString()
    unknown = bytes([11 << 3 | 0, 42, 12 << 3 | 2, 3]) + b"abc" + bytes([13 << 3 | 5]) + b"\x00" * 4 + bytes([14 << 3 | 1]) + b"\x00" * 8
    repeated = bytes([2 << 3 | 0, 9])  # layer_end again: the last value wins
    ints = ((7, 1), (6, chunk.crc32), (4, 5), (3, 3), (2, 2), (1, 1))
    out_of_order = bytes([5 << 3 | 2]) + _varint(len(chunk.data)) + chunk.data + b"".join(bytes([n << 3 | 0]) + _varint(v) for n, v in ints)
    bodies = [unknown + body, body + unknown, body + repeated, out_of_order]
    merged = (
        decode_pb2.DecodeRequest(chunk=pb).SerializeToString() + decode_pb2.DecodeRequest(chunk=decode_pb2.KvChunk(token_end=6)).SerializeToString()
    )
    wires = [_wrap(b) for b in bodies] + [merged]
    for wire in wires:
        expected = decode_pb2.DecodeRequest.FromString(wire).chunk
        assert _message_fields(parse_request(wire)) == _fields(expected)


def test_malformed_requests_are_rejected() -> None:
    wire = encode_chunk(_chunks()[0], kv_set=0)
    for bad in (wire[:-1], wire[:3], b"\x12\xff"):
        with pytest.raises(DecodeError):
            parse_request(bad)


def _wrap(body: bytes) -> bytes:
    """DecodeRequest{chunk: body} on the wire."""
    return bytes([2 << 3 | 2]) + _varint(len(body)) + body


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


# ---------------------------------------------------------------- chunks

LAYERS, HEADS, TOKENS, DIM = 3, 2, 7, 16


def _snapshot(dtype: torch.dtype = torch.float32) -> KVSnapshot:
    g = torch.Generator().manual_seed(0)
    shape = (LAYERS, HEADS, TOKENS, DIM)
    return KVSnapshot(keys=torch.randn(shape, generator=g).to(dtype), values=torch.randn(shape, generator=g).to(dtype))


def _assembler(dtype: str = "float32") -> KVAssembler:
    return KVAssembler(Layout(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, n_tokens=TOKENS, dtype=dtype))


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
    expected = (
        torch.cat([kv.keys[0:1, :, c.token_start : c.token_end].reshape(-1), kv.values[0:1, :, c.token_start : c.token_end].reshape(-1)])
        .numpy()
        .tobytes()
    )
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
    with pytest.raises(KVCorrupted, match="CRC-32"):
        _assembler().add(corrupted)
    short = KVChunk(0, LAYERS, 0, TOKENS, (memoryview(chunk.data[:-4]),), zlib.crc32(chunk.data[:-4]))
    with pytest.raises(KVCorrupted, match="expected"):
        _assembler().add(short)
    outside = KVChunk(0, LAYERS + 1, 0, TOKENS, chunk.parts, chunk.crc32)
    with pytest.raises(KVCorrupted, match="outside the layout"):
        _assembler().add(outside)
    assembler = _assembler()
    assembler.add(_received(next(iter(iter_chunks(_snapshot(), max_bytes=600)))))
    with pytest.raises(KVCorrupted, match="incomplete"):
        assembler.snapshot()
    with pytest.raises(InvalidRequest, match="not supported"):
        _assembler("int8")
