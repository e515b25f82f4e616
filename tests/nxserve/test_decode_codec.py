"""Decode stream requests: chunks encoded and decoded outside protobuf objects, byte-compatible with it."""

from __future__ import annotations

import pytest
import torch
from google.protobuf.message import DecodeError

from nxcore.kv_cache import KVSnapshot
from nxcore.kv_wire import iter_chunks
from nxserve.decode_codec import ChunkMessage, encode_chunk, message_kind, parse_request, serialize_request
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
        assert _fields(parsed.chunk) == (chunk.layer_start, chunk.layer_end, chunk.token_start, chunk.token_end,
                                         chunk.data, chunk.crc32, kv_set)


def test_parsed_chunk_is_a_view_of_the_message() -> None:
    [chunk] = _chunks()
    pb = decode_pb2.DecodeRequest(chunk=decode_pb2.KvChunk(layer_start=0, layer_end=2, token_end=5, data=chunk.data,
                                                           crc32=chunk.crc32, kv_set=1))
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
    out_of_order = bytes([5 << 3 | 2]) + _varint(len(chunk.data)) + chunk.data + b"".join(
        bytes([n << 3 | 0]) + _varint(v) for n, v in ints)
    bodies = [unknown + body, body + unknown, body + repeated, out_of_order]
    merged = decode_pb2.DecodeRequest(chunk=pb).SerializeToString() + decode_pb2.DecodeRequest(
        chunk=decode_pb2.KvChunk(token_end=6)).SerializeToString()
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

