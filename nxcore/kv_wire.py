"""A KV snapshot as bounded byte chunks and back, independent of any transport.

A chunk covers layers [layer_start, layer_end) x tokens [token_start, token_end) and carries the
K block then the V block, each `[layers, kv_heads, tokens, head_dim]`, as raw bytes with a CRC-32.
Whole layers are grouped while they fit `max_bytes`; a layer larger than that is split by tokens.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from nxcore.config import DTYPES
from nxcore.kv_cache import KVSnapshot

DEFAULT_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class KVChunk:
    layer_start: int
    layer_end: int
    token_start: int
    token_end: int
    data: bytes
    crc32: int


class KVTransferError(ValueError):
    """A chunk that does not fit the announced layout, or whose checksum does not match."""


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
"""An integer dtype of each element size: numpy has no bfloat16, so raw copies go through these."""


def _block_bytes(k: torch.Tensor, v: torch.Tensor) -> bytes:
    """K block then V block as raw bytes: one gather into a flat buffer, one copy out."""
    flat = torch.cat([k.reshape(-1), v.reshape(-1)]).view(_INT_VIEW[k.element_size()])
    return flat.numpy().tobytes()


def iter_chunks(kv: KVSnapshot, *, max_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[KVChunk]:
    layers, heads, tokens, dim = kv.keys.shape
    token_bytes = 2 * heads * dim * kv.keys.element_size()
    layer_bytes = token_bytes * tokens
    if layer_bytes <= max_bytes:
        step = max(1, max_bytes // max(layer_bytes, 1))
        spans = [(l, min(l + step, layers), 0, tokens) for l in range(0, layers, step)]
    else:
        per = max(1, max_bytes // token_bytes)
        spans = [(l, l + 1, t, min(t + per, tokens)) for l in range(layers) for t in range(0, tokens, per)]
    for l0, l1, t0, t1 in spans:
        data = _block_bytes(kv.keys[l0:l1, :, t0:t1], kv.values[l0:l1, :, t0:t1])
        yield KVChunk(layer_start=l0, layer_end=l1, token_start=t0, token_end=t1, data=data, crc32=zlib.crc32(data))


class KVAssembler:
    """Collects chunks into a snapshot of a known layout, checking ranges, sizes and checksums."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, n_tokens: int, dtype: str) -> None:
        if dtype not in DTYPES:
            raise KVTransferError(f"KV dtype {dtype!r} is not supported: allowed {sorted(DTYPES)}")
        shape = (num_layers, num_kv_heads, n_tokens, head_dim)
        self.keys = torch.empty(shape, dtype=DTYPES[dtype])
        self.values = torch.empty(shape, dtype=DTYPES[dtype])
        self._filled = torch.zeros(num_layers, n_tokens, dtype=torch.bool)
        self.bytes_received = 0

    def add(self, chunk: KVChunk) -> None:
        layers, heads, tokens, dim = self.keys.shape
        l0, l1, t0, t1 = chunk.layer_start, chunk.layer_end, chunk.token_start, chunk.token_end
        if not (0 <= l0 < l1 <= layers and 0 <= t0 < t1 <= tokens):
            raise KVTransferError(f"chunk layers [{l0}, {l1}) x tokens [{t0}, {t1}) is outside the layout ({layers} layers, {tokens} tokens)")
        if zlib.crc32(chunk.data) != chunk.crc32:
            raise KVTransferError(f"chunk layers [{l0}, {l1}) x tokens [{t0}, {t1}) failed its CRC-32 check: the data is corrupted")
        block_shape = (l1 - l0, heads, t1 - t0, dim)
        block_bytes = int(np.prod(block_shape)) * self.keys.element_size()
        if len(chunk.data) != 2 * block_bytes:
            raise KVTransferError(f"chunk layers [{l0}, {l1}) x tokens [{t0}, {t1}) has {len(chunk.data)} bytes, expected {2 * block_bytes}")
        # Copy straight from the message's bytes into the snapshot (numpy reads bytes without a copy).
        int_dtype = _INT_VIEW[self.keys.element_size()]
        raw = np.frombuffer(chunk.data, dtype=torch.empty(0, dtype=int_dtype).numpy().dtype)
        half = raw.shape[0] // 2
        self.keys.view(int_dtype).numpy()[l0:l1, :, t0:t1] = raw[:half].reshape(block_shape)
        self.values.view(int_dtype).numpy()[l0:l1, :, t0:t1] = raw[half:].reshape(block_shape)
        self._filled[l0:l1, t0:t1] = True
        self.bytes_received += len(chunk.data)

    def snapshot(self) -> KVSnapshot:
        if not bool(self._filled.all()):
            missing = int((~self._filled).sum())
            raise KVTransferError(f"KV snapshot incomplete at commit: {missing} (layer, token) cells never arrived")
        return KVSnapshot(keys=self.keys, values=self.values)
