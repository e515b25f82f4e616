"""A KV snapshot as bounded, CRC-checked byte chunks, and the Decode stream's messages on the wire.

A chunk covers layers [layer_start, layer_end) x tokens [token_start, token_end) and carries the
K block then the V block, each `[layers, kv_heads, tokens, head_dim]`, as raw bytes with a CRC-32.
Whole layers are grouped while they fit `max_bytes`; a layer larger than that is split by tokens.

Neither side copies more than it must. A sent chunk is a list of views of the snapshot's memory
(one per block when whole layers are grouped, one per KV head when a layer is split by tokens),
its CRC-32 is computed over those views, and `encode_chunk` joins them once into the message
bytes; `parse_request` decodes a chunk with no copy (its data is a view of the bytes gRPC handed
over), and `KVAssembler` checks it and copies it once, into the snapshot it preallocated. Building
a protobuf `KvChunk` instead would copy the data into the message, again when serializing, once
more when parsing and at every read of `.data`. The bytes are exactly `DecodeRequest`
(decode.proto): any client or server may use the generated stubs. Both sides copy with numpy,
never in a torch parallel region: its thread barrier can take milliseconds when the engine's
threads hold the cores.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from isal import isal_zlib

from nxcore.config import DTYPES
from nxcore.kv_cache import KVSnapshot
from nxserve.rpc.errors import InvalidRequest, KVCorrupted
from nxserve.rpc.server import add_service
from nxserve.rpc.status import Malformed
from nxserve.v1 import decode_pb2, decode_pb2_grpc

DEFAULT_CHUNK_BYTES = 1 << 20


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
            raise InvalidRequest(f"KV dtype {self.dtype!r} is not supported: allowed {sorted(DTYPES)}")
        return DTYPES[self.dtype]

    @classmethod
    def of(cls, kv: KVSnapshot, dtype: str) -> Layout:
        layers, heads, tokens, dim = kv.keys.shape
        return cls(num_layers=layers, num_kv_heads=heads, n_tokens=tokens, head_dim=dim, dtype=dtype)

    @classmethod
    def from_pb(cls, layout: decode_pb2.KvLayout) -> Layout:
        return cls(
            num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads, n_tokens=layout.n_tokens, head_dim=layout.head_dim, dtype=layout.dtype
        )

    def to_pb(self) -> decode_pb2.KvLayout:
        return decode_pb2.KvLayout(
            num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, n_tokens=self.n_tokens, dtype=self.dtype
        )


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous tensor's memory as a numpy uint8 array `[..., last_dim * element_size]`, no copy
    (numpy has no bfloat16: the byte view works for every dtype)."""
    return t.contiguous().view(torch.uint8).numpy()


def snapshot_parts(kv: KVSnapshot) -> tuple[np.ndarray, np.ndarray]:
    """The K block then the V block as flat byte arrays viewing the snapshot (no copy when contiguous)."""
    return as_bytes(kv.keys).reshape(-1), as_bytes(kv.values).reshape(-1)


def views(raw: torch.Tensor, layouts: Sequence[Layout]) -> list[KVSnapshot]:
    """Snapshots laid out one after the other in the byte tensor `raw`, each K block then V block."""
    snapshots, offset = [], 0
    for layout in layouts:
        half = layout.nbytes // 2
        k, v = (raw[start : start + half].view(layout.torch_dtype).view(layout.shape) for start in (offset, offset + half))
        snapshots.append(KVSnapshot(keys=k, values=v))
        offset += layout.nbytes
    return snapshots


def crc32_of(parts: Sequence[memoryview | np.ndarray]) -> int:
    """CRC-32 of the parts' bytes in order: zlib's checksum, computed by ISA-L (SIMD; zlib's own took
    about 0.25 ms per MiB on each side, ISA-L's 0.02 ms)."""
    crc = 0
    for part in parts:
        crc = isal_zlib.crc32(part, crc)
    return crc


# ---------------------------------------------------------------- chunks


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
    keys, values = as_bytes(kv.keys), as_bytes(kv.values)
    whole_tokens = kv.n_tokens
    for l0, l1, t0, t1 in _spans(kv.keys.shape, kv.keys.element_size(), max_bytes):
        if t0 == 0 and t1 == whole_tokens:  # whole layers: each block is one contiguous run
            parts: tuple[memoryview, ...] = (keys[l0:l1].data.cast("B"), values[l0:l1].data.cast("B"))
        else:  # part of one layer's tokens: one contiguous run per KV head
            parts = tuple(block[l0, h, t0:t1].data.cast("B") for block in (keys, values) for h in range(block.shape[1]))
        yield KVChunk(layer_start=l0, layer_end=l1, token_start=t0, token_end=t1, parts=parts, crc32=crc32_of(parts))


class KVAssembler:
    """Collects chunks into a snapshot of a known layout, checking ranges, sizes and checksums.

    K and V live in one buffer allocated up front; each chunk is copied into it once."""

    def __init__(self, layout: Layout) -> None:
        buffer = torch.empty((2, *layout.shape), dtype=layout.torch_dtype)
        self.keys, self.values = buffer[0], buffer[1]
        self._bytes = buffer.view(torch.uint8).numpy()  # [2, layers, heads, tokens, head_dim * element_size]
        self._filled = np.zeros((layout.num_layers, layout.n_tokens), dtype=bool)
        self.bytes_received = 0

    def add(self, chunk: KVChunk) -> None:
        _, layers, heads, tokens, row = self._bytes.shape
        l0, l1, t0, t1 = chunk.layer_start, chunk.layer_end, chunk.token_start, chunk.token_end
        where = f"chunk layers [{l0}, {l1}) x tokens [{t0}, {t1})"
        if not (0 <= l0 < l1 <= layers and 0 <= t0 < t1 <= tokens):
            raise KVCorrupted(f"{where} is outside the layout ({layers} layers, {tokens} tokens)")
        block_shape = (l1 - l0, heads, t1 - t0, row)
        block_bytes = (l1 - l0) * heads * (t1 - t0) * row
        if chunk.nbytes != 2 * block_bytes:
            raise KVCorrupted(f"{where} has {chunk.nbytes} bytes, expected {2 * block_bytes}")
        if crc32_of(chunk.parts) != chunk.crc32:
            raise KVCorrupted(f"{where} failed its CRC-32 check: the data is corrupted")
        raw = np.frombuffer(chunk.parts[0] if len(chunk.parts) == 1 else chunk.data, dtype=np.uint8)
        self._bytes[:, l0:l1, :, t0:t1] = raw.reshape(2, *block_shape)
        self._filled[l0:l1, t0:t1] = True
        self.bytes_received += chunk.nbytes

    def snapshot(self) -> KVSnapshot:
        if not self._filled.all():
            missing = int((~self._filled).sum())
            raise KVCorrupted(f"KV snapshot incomplete at commit: {missing} (layer, token) cells never arrived")
        return KVSnapshot(keys=self.keys, values=self.values)


# ---------------------------------------------------------------- the Decode stream's requests on the wire

SERVICE = "nxserve.v1.Decode"
DECODE_METHOD = f"/{SERVICE}/Decode"

# Protobuf wire types and the tags (field number << 3 | wire type) this module writes and reads.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_CHUNK_FIELD = 2  # DecodeRequest.chunk
_CHUNK_TAG = _CHUNK_FIELD << 3 | _LEN
_DATA_FIELD = 5  # KvChunk.data
_UINT32_FIELDS = {1: "layer_start", 2: "layer_end", 3: "token_start", 4: "token_end", 6: "crc32", 7: "kv_set"}


@dataclass(frozen=True)
class ChunkMessage:
    """A `DecodeRequest` whose kind is `chunk`, decoded without copying its data."""

    chunk: KVChunk
    kv_set: int
    """0 the target model's KV, 1 the draft model's."""


DecodeMessage = decode_pb2.DecodeRequest | ChunkMessage | Malformed
"""What the Decode stream's reader gets: a message, a chunk, or bytes that were neither."""


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
    head = decode_pb2.KvChunk(
        layer_start=chunk.layer_start,
        layer_end=chunk.layer_end,
        token_start=chunk.token_start,
        token_end=chunk.token_end,
        crc32=chunk.crc32,
        kv_set=kv_set,
    ).SerializeToString()
    head += _varint(_DATA_FIELD << 3 | _LEN) + _varint(chunk.nbytes)
    prefix = _varint(_CHUNK_TAG) + _varint(len(head) + chunk.nbytes) + head
    return b"".join((prefix, *chunk.parts))


def serialize_request(message: DecodeMessage | bytes) -> bytes:
    """Request serializer of the Decode stream: messages, or chunks already encoded by `encode_chunk`."""
    if isinstance(message, bytes):
        return message
    if isinstance(message, ChunkMessage | Malformed):
        raise TypeError(f"a {type(message).__name__} is not sent: chunks go as the bytes encode_chunk makes")
    return message.SerializeToString()


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
    chunk = KVChunk(
        layer_start=c.layer_start, layer_end=c.layer_end, token_start=c.token_start, token_end=c.token_end, parts=(memoryview(c.data),), crc32=c.crc32
    )
    return ChunkMessage(chunk=chunk, kv_set=c.kv_set)


def message_kind(message: DecodeMessage) -> str | None:
    """One of header, chunk, commit, malformed; None for an empty request."""
    if isinstance(message, ChunkMessage):
        return "chunk"
    if isinstance(message, Malformed):
        return "malformed"
    return message.WhichOneof("kind")


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
                    payload = view[pos : pos + size]
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
            DECODE_METHOD,
            request_serializer=serialize_request,
            response_deserializer=decode_pb2.DecodeResponse.FromString,
            _registered_method=True,
        )


def add_decode_servicer(servicer: decode_pb2_grpc.DecodeServicer, server: grpc.aio.Server) -> None:
    """`decode_pb2_grpc.add_DecodeServicer_to_server`, with Decode's requests decoded by `parse_request`."""
    add_service(server, servicer, decode_pb2.DESCRIPTOR.services_by_name["Decode"], deserializers={"Decode": parse_request})


class EmptyStream(InvalidRequest):
    """A Decode stream that ended without a message: prefill opens one ahead of each request
    (`prefill_svc.server`) and closes it unused when the request ends at prefill. Not an error
    of the replica's: it ends the stream at once, without counting a request."""


class DecodeRequests:
    """The request side of one Decode stream, as the replica reads it: the header, then chunks up
    to the commit (none after a header naming a shared-memory region, which is the whole request).

    `drain` reads and drops what the sender still writes. A replica that refuses a request must
    call it before ending the call: aborting while the sender still writes loses the status on its
    side (grpc aio replaces it with INTERNAL "Internal error from Core" when a write fails after the
    status arrived, grpc/grpc#36066), so a full replica would look broken instead of busy. The
    cost is receiving a refused request's chunks, dropped without being assembled or checksummed.
    """

    def __init__(self, messages: AsyncIterator[DecodeMessage]) -> None:
        self._messages = aiter(messages)
        self.sender_done = False
        """Whether the sender has nothing more to write (its commit or the end of its stream was
        read, or its header named a shared-memory region)."""

    async def header(self) -> decode_pb2.DecodeHeader:
        """The stream's first message, which must be a header."""
        first = await anext(self._messages, None)
        if first is None:
            self.sender_done = True
            raise EmptyStream("a Decode stream must start with a header: it was empty")
        if isinstance(first, Malformed):
            raise first.refusal()
        kind = message_kind(first)
        if kind != "header":
            self.sender_done = kind == "commit"
            raise InvalidRequest(f"a Decode stream must start with a header, not a {kind}")
        assert isinstance(first, decode_pb2.DecodeRequest)
        if first.header.HasField("shared_kv"):
            self.sender_done = True
        return first.header

    async def chunks(self) -> AsyncIterator[ChunkMessage]:
        """Chunks up to the commit; KVCorrupted for anything else, or an end before the commit."""
        async for message in self._messages:
            kind = message_kind(message)
            if kind == "commit":
                self.sender_done = True
                return
            if isinstance(message, Malformed):
                raise message.refusal()
            if not isinstance(message, ChunkMessage):
                raise KVCorrupted(f"unexpected {kind} message after the header")
            yield message
        self.sender_done = True
        raise KVCorrupted("the stream ended before the commit message")

    async def drain(self) -> None:
        """Read and drop messages up to the commit or the end of the stream, unless the sender is done."""
        if self.sender_done:
            return
        async for message in self._messages:
            if message_kind(message) == "commit":
                break
        self.sender_done = True
