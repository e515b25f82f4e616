"""Sending one request's KV snapshot on a Decode stream: header, CRC-checked chunks, commit, ack; or,
when the replica shares this service's shared-memory directory, a header naming a region of this
service's arena (the one the KV was exported into, or one it is copied into now), ack.

The call must come from `nxserve.decode_codec.DecodeStub`: chunks are written as encoded bytes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from nxcore import Engine, SamplingParams, StoppingCriteria
from nxcore.kv_cache import KVSnapshot
from nxcore.kv_wire import KVArena, SharedRegion, iter_chunks
from nxserve.decode_codec import encode_chunk
from nxserve.grpc_common import sampling_to_pb, stopping_to_pb
from nxserve.v1 import decode_pb2


def decode_header(
    engine: Engine,
    kv: KVSnapshot,
    *,
    request_id: str,
    prompt_ids: Sequence[int],
    sampling: SamplingParams,
    stopping: StoppingCriteria,
    stop_strings: Sequence[str],
    first_token: int,
    rng_offset: int,
    draft: tuple[Engine, KVSnapshot] | None = None,
    disable_speculation: bool = False,
) -> decode_pb2.DecodeRequest:
    dtype = engine.config.dtype
    header = decode_pb2.DecodeRequest(header=decode_pb2.DecodeHeader(
        request_id=request_id,
        sampling=sampling_to_pb(sampling),
        stopping=stopping_to_pb(stopping, stop_strings),
        prompt_token_ids=list(prompt_ids),
        first_token=first_token,
        rng_offset=rng_offset,
        fingerprint=decode_pb2.ModelFingerprint(digest=engine.fingerprint, architecture=engine.model_config.model_type, dtype=dtype),
        layout=_layout(kv, dtype),
        disable_speculation=disable_speculation,
    ))
    if draft is not None:
        header.header.draft_layout.CopyFrom(_layout(draft[1], draft[0].config.dtype))
    return header


def _layout(kv: KVSnapshot, dtype: str) -> decode_pb2.KvLayout:
    layers, heads, tokens, dim = kv.keys.shape
    return decode_pb2.KvLayout(num_layers=layers, num_kv_heads=heads, head_dim=dim, n_tokens=tokens, dtype=dtype)


@dataclass(frozen=True)
class Transfer:
    bytes_sent: int
    seconds: float
    """From the header to the ack, less the time decode queued the request for a slot."""
    queue_ms: float
    slot: int
    shared: bool = False
    """Sent through the shared-memory arena rather than as chunks."""


class NoAck(Exception):
    pass


async def send_kv(call: grpc.aio.StreamStreamCall, header: decode_pb2.DecodeRequest, kv: KVSnapshot, *, chunk_bytes: int,
                  draft_kv: KVSnapshot | None = None, arena: KVArena | None = None, shared: SharedRegion | None = None) -> Transfer:
    """Write header, chunks (target KV, then the draft's when given) and commit, read the ack, then
    close the request side (after the ack: the replica does not wait for it). With `arena`, whose
    directory the replica shares, the region of it named in the header is all there is to send:
    `shared`, the region of it `kv` and `draft_kv` were exported into and sealed (the caller's to
    release), else one they are copied into now and released when this returns (chunks still when
    no region is free). gRPC errors propagate."""
    start = time.perf_counter()
    snapshots = [kv] if draft_kv is None else [kv, draft_kv]
    owned = arena is not None and shared is None  # a region put here is released here
    region = None if arena is None else shared if shared is not None else arena.put(snapshots)
    try:
        message = header
        if region is not None:
            message = decode_pb2.DecodeRequest()
            message.CopyFrom(header)  # the caller's header stays as it was, for a retry with chunks
            message.header.shared_kv.CopyFrom(decode_pb2.SharedKv(name=region.name, offset=region.offset,
                                                                  nbytes=region.nbytes, crc32=region.crc32))
        await call.write(message)
        if region is None:
            sent = 0
            for kv_set, snapshot in enumerate(snapshots):
                for c in iter_chunks(snapshot, max_bytes=chunk_bytes):
                    sent += c.nbytes
                    await call.write(encode_chunk(c, kv_set=kv_set))
            await call.write(decode_pb2.DecodeRequest(commit=decode_pb2.Commit()))
        else:
            sent = region.nbytes
        ack = await call.read()
    finally:
        if owned and region is not None:
            # After the ack the replica holds its own copy. Without one the call is over (failed or
            # cancelled): a replica still reading would only serve a request nobody waits for.
            arena.release(region)
    if ack is grpc.aio.EOF or ack.WhichOneof("kind") != "ack":
        raise NoAck("the decode replica answered the KV without an ack")
    seconds = time.perf_counter() - start - ack.ack.queue_ms / 1000
    await call.done_writing()
    return Transfer(bytes_sent=sent, seconds=seconds, queue_ms=ack.ack.queue_ms, slot=ack.ack.slot, shared=region is not None)
