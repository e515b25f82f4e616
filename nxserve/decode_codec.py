"""The Decode stream's requests on the wire, with KV chunks kept out of protobuf objects.

The bytes are exactly `DecodeRequest` (decode.proto): any client or server may use the generated
stubs. Ours take a faster path for chunks, the only large messages. Building a `KvChunk` message
copies its data into the message and serializing copies it again; parsing one copies it once more
and every read of `.data` once more. Here a chunk is encoded with one copy (the views of the
snapshot joined into the message bytes) and decoded with none (its data is a view of the message
bytes gRPC handed over).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from nxcore.kv_wire import KVChunk
from nxserve.v1 import decode_pb2, decode_pb2_grpc

SERVICE = "nxserve.v1.Decode"
DECODE_METHOD = f"/{SERVICE}/Decode"

# Protobuf wire types and the tags (field number << 3 | wire type) this module writes and reads.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_CHUNK_FIELD = 2  # DecodeRequest.chunk
_CHUNK_TAG = _CHUNK_FIELD << 3 | _LEN
_DATA_FIELD = 5  # KvChunk.data
_UINT32_FIELDS = {1: "layer_start", 2: "layer_end", 3: "token_start", 4: "token_end", 6: "crc32", 7: "kv_set"}


SHM_UNREADABLE = (("nxserve-kv", "shm-unreadable"),)
"""Trailing metadata of a replica's FAILED_PRECONDITION for a shared KV region it cannot read (the
sender's arena is not in its --kv-shm-dir, or it has none): the sender should send chunks instead.
Other FAILED_PRECONDITIONs (another model) are final."""


def is_shm_unreadable(trailing_metadata) -> bool:  # noqa: ANN001
    """Whether a call's trailing metadata carries SHM_UNREADABLE."""
    return any(tuple(item) == SHM_UNREADABLE[0] for item in trailing_metadata or ())


@dataclass(frozen=True)
class ChunkMessage:
    """A `DecodeRequest` whose kind is `chunk`, decoded without copying its data."""

    chunk: KVChunk
    kv_set: int
    """0 the target model's KV, 1 the draft model's."""


DecodeMessage = decode_pb2.DecodeRequest | ChunkMessage


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_chunk(chunk: KVChunk, *, kv_set: int) -> bytes:
    """`DecodeRequest(chunk=KvChunk(...))` serialized; the chunk's parts are copied once, into it.
    Protobuf encodes the small fields; the data field follows them (parsers take fields in any order)."""
    head = decode_pb2.KvChunk(layer_start=chunk.layer_start, layer_end=chunk.layer_end, token_start=chunk.token_start,
                              token_end=chunk.token_end, crc32=chunk.crc32, kv_set=kv_set).SerializeToString()
    head += _varint(_DATA_FIELD << 3 | _LEN) + _varint(chunk.nbytes)
    prefix = _varint(_CHUNK_TAG) + _varint(len(head) + chunk.nbytes) + head
    return b"".join((prefix, *chunk.parts))


def serialize_request(message: DecodeMessage | bytes) -> bytes:
    """Request serializer of the Decode stream: messages, or chunks already encoded by `encode_chunk`."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def parse_request(data: bytes) -> DecodeMessage:
    """Request deserializer of the Decode stream: a chunk as a `ChunkMessage` whose data is a view of
    `data`, any other message as a `DecodeRequest`."""
    fast = _parse_chunk(data)
    if fast is not None:
        return fast
    message = decode_pb2.DecodeRequest.FromString(data)
    if message.WhichOneof("kind") != "chunk":
        return message
    c = message.chunk
    chunk = KVChunk(layer_start=c.layer_start, layer_end=c.layer_end, token_start=c.token_start, token_end=c.token_end,
                    parts=(memoryview(c.data),), crc32=c.crc32)
    return ChunkMessage(chunk=chunk, kv_set=c.kv_set)


def message_kind(message: DecodeMessage) -> str | None:
    """"header", "chunk", "commit", or None for an empty request."""
    return "chunk" if isinstance(message, ChunkMessage) else message.WhichOneof("kind")


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]  # IndexError when truncated
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _parse_chunk(data: bytes) -> ChunkMessage | None:
    """The fast path: a request that is one chunk field and nothing else. None for anything else,
    including malformed input, which the protobuf parser then decodes (or rejects) as usual."""
    view = memoryview(data)
    try:
        tag, pos = _read_varint(view, 0)
        if tag != _CHUNK_TAG:
            return None
        length, pos = _read_varint(view, pos)
        if pos + length != len(view):
            return None
        fields = dict.fromkeys(_UINT32_FIELDS.values(), 0)
        payload = view[pos:pos]
        while pos < len(view):
            key, pos = _read_varint(view, pos)
            number, wire = key >> 3, key & 7
            if wire == _VARINT:
                value, pos = _read_varint(view, pos)
                if number in _UINT32_FIELDS:
                    fields[_UINT32_FIELDS[number]] = value & 0xFFFFFFFF
                elif number == _DATA_FIELD:
                    return None
            elif wire == _LEN:
                size, pos = _read_varint(view, pos)
                if pos + size > len(view) or number in _UINT32_FIELDS:
                    return None
                if number == _DATA_FIELD:
                    payload = view[pos:pos + size]
                pos += size
            elif wire in (_I64, _I32) and number not in _UINT32_FIELDS and number != _DATA_FIELD:
                pos += 8 if wire == _I64 else 4
            else:
                return None
        if pos != len(view):
            return None
    except (IndexError, ValueError):
        return None
    kv_set = fields.pop("kv_set")
    return ChunkMessage(chunk=KVChunk(**fields, parts=(payload,)), kv_set=kv_set)


class DecodeStub(decode_pb2_grpc.DecodeStub):
    """The generated stub, whose Decode stream also takes chunks encoded by `encode_chunk`."""

    def __init__(self, channel: grpc.aio.Channel | grpc.Channel) -> None:
        super().__init__(channel)
        self.Decode = channel.stream_stream(
            DECODE_METHOD, request_serializer=serialize_request,
            response_deserializer=decode_pb2.DecodeResponse.FromString, _registered_method=True,
        )


def add_decode_servicer(servicer: decode_pb2_grpc.DecodeServicer, server: grpc.aio.Server) -> None:
    """`decode_pb2_grpc.add_DecodeServicer_to_server`, with Decode's requests decoded by `parse_request`."""
    handlers = {
        "Decode": grpc.stream_stream_rpc_method_handler(
            servicer.Decode, request_deserializer=parse_request,
            response_serializer=decode_pb2.DecodeResponse.SerializeToString),
        "GetLoad": grpc.unary_unary_rpc_method_handler(
            servicer.GetLoad, request_deserializer=decode_pb2.GetLoadRequest.FromString,
            response_serializer=decode_pb2.GetLoadResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
