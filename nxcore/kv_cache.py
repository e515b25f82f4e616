"""Static KV cache in BHSD layout, updated in place.

Per layer one K and one V buffer `[slots + 1, kv_heads, seq_len, head_dim]`. Rows 0..slots-1 are
the decode slots; the extra last row is a scratch slot that padded graph rows write into, so a
padded row can never touch a live request's cache.

Writes are either a prefix write (context encoding: positions 0..bucket-1 of some slots) or a
scatter at per-row positions (token generation and speculation). Positions and slot ids are
tensors, so one compiled graph serves every position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nxcore.modules.eager import runs_eagerly


@dataclass
class KVSnapshot:
    """One slot's first `n_tokens` of cache for every layer, independent of TP degree.

    `keys` and `values` are `[num_layers, num_kv_heads, n_tokens, head_dim]`: the model's real KV
    heads in checkpoint order.
    """

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class KVCache(nn.Module):
    def __init__(self, *, num_layers: int, slots: int, kv_heads: int, seq_len: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.slots = slots
        self.seq_len = seq_len
        shape = (slots + 1, kv_heads, seq_len, head_dim)
        for i in range(num_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype), persistent=False)
        self._byte_views: list[tuple[torch.Tensor, np.ndarray]] = []
        """(buffer, numpy byte view of it) per K and V buffer, layer by layer: see `_bytes_of`."""

    @property
    def scratch_slot(self) -> int:
        return self.slots

    def buffers_of(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"k{layer}"), getattr(self, f"v{layer}")

    def write_prefix(self, layer: int, slot_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v `[rows, kv_heads, T, D]` at positions 0..T-1 of `slot_ids` `[rows]`."""
        k_buf, v_buf = self.buffers_of(layer)
        length = k.shape[2]
        if runs_eagerly(slot_ids):
            # One block copy per (row, buffer): index_copy_ into the length-sliced (non-contiguous)
            # buffers went element by element, 0.25 / 0.38 ms for k / v (v a transposed view) of one
            # 2048-token prompt against 0.07 ms each here (llama 512x8, one thread). Rows that
            # repeat a slot (padding rows, all on the scratch slot) leave the last one's (index_copy_
            # leaves which one undefined; nothing reads the scratch slot).
            for row, slot in enumerate(slot_ids.tolist()):
                k_buf[slot, :, :length].copy_(k[row])
                v_buf[slot, :, :length].copy_(v[row])
            return
        k_buf[:, :, :length].index_copy_(0, slot_ids, k)
        v_buf[:, :, :length].index_copy_(0, slot_ids, v)

    def scatter(self, layer: int, slot_ids: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v `[rows, kv_heads, T, D]` at `positions` `[rows, T]` of `slot_ids` `[rows]`."""
        k_buf, v_buf = self.buffers_of(layer)
        heads = torch.arange(k_buf.shape[1], device=k.device)
        index = (slot_ids[:, None, None], heads[None, :, None], positions[:, None, :])
        k_buf.index_put_(index, k)
        v_buf.index_put_(index, v)

    def gather(self, layer: int, slot_ids: torch.Tensor, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V `[rows, kv_heads, length, D]` of `slot_ids` (length: default the whole row)."""
        k_buf, v_buf = self.buffers_of(layer)
        if length is not None and length < self.seq_len:
            k_buf, v_buf = k_buf[:, :, :length], v_buf[:, :, :length]
        return k_buf.index_select(0, slot_ids), v_buf.index_select(0, slot_ids)

    @torch.no_grad()
    def export(self, slot: int, n_tokens: int, out: KVSnapshot | None = None) -> KVSnapshot:
        """The slot's first n_tokens, copied into `out` when given (contiguous, of the snapshot's
        shape and the cache's dtype), else into new tensors."""
        keys = torch.stack([self.buffers_of(i)[0][slot, :, :n_tokens] for i in range(self.num_layers)], out=None if out is None else out.keys)
        values = torch.stack([self.buffers_of(i)[1][slot, :, :n_tokens] for i in range(self.num_layers)], out=None if out is None else out.values)
        return KVSnapshot(keys=keys, values=values)

    def _bytes_of(self) -> list[np.ndarray]:
        """Every K and V buffer (layer by layer, K then V) as a numpy byte array viewing its memory,
        `[slots + 1, kv_heads, seq_len, head_dim * itemsize]`. Made once, and again for a buffer
        that was replaced (`Module.to`). Slicing these costs a fraction of slicing the tensors: the
        2 x num_layers torch views took 0.125 ms of a 0.19 ms import of 128 tokens (125M model,
        measured here), and several times that in a service that has just woken up."""
        buffers = [buf for i in range(self.num_layers) for buf in self.buffers_of(i)]
        views = self._byte_views
        if len(views) != len(buffers) or any(cached is not buf for (cached, _), buf in zip(views, buffers)):
            views[:] = [(buf, buf.view(torch.uint8).numpy()) for buf in buffers]
        return [array for _, array in views]

    @torch.no_grad()
    def import_(self, slot: int, kv: KVSnapshot) -> None:
        """Write a snapshot into the slot's first n_tokens (converted to the cache's dtype if need be).

        On CPU, with the cache's dtype, each layer is copied with numpy rather than torch: a torch
        copy of more than 32768 elements opens an OpenMP parallel region, and in a service whose
        engine threads sleep between steps each of the 2 x num_layers regions can wait for them
        (a 6.3 MB snapshot took 0.8-5.7 ms to import in the decode service, 2.9 ms median)."""
        n = kv.n_tokens
        k0 = self.buffers_of(0)[0]
        if k0.device.type == "cpu" and kv.keys.device.type == "cpu" and kv.keys.dtype == k0.dtype == kv.values.dtype:
            keys, values = (t.contiguous().view(torch.uint8).numpy() for t in (kv.keys, kv.values))
            arrays = self._bytes_of()
            for i in range(self.num_layers):
                arrays[2 * i][slot, :, :n] = keys[i]
                arrays[2 * i + 1][slot, :, :n] = values[i]
            return
        for i in range(self.num_layers):
            k_buf, v_buf = self.buffers_of(i)
            k_buf[slot, :, :n].copy_(kv.keys[i])
            v_buf[slot, :, :n].copy_(kv.values[i])
