"""KV cache: in-place writes, and export/import between engine instances."""

from __future__ import annotations

import pytest
import torch

from nxcore import Engine, RequestRng, RuntimeConfig, SamplingParams, SequenceRequest, StoppingCriteria, generate
from nxcore.errors import EngineError
from nxcore.kv_cache import KVCache, KVSnapshot
from tests.conftest import Checkpoint, random_prompt


def test_prefix_write_and_scatter_touch_only_their_cells() -> None:
    cache = KVCache(num_layers=1, slots=3, kv_heads=2, seq_len=8, head_dim=4, dtype=torch.float32)
    k = torch.randn(2, 2, 5, 4)
    cache.write_prefix(0, torch.tensor([2, 0]), k, -k)
    k_buf, v_buf = cache.buffers_of(0)
    assert torch.equal(k_buf[2, :, :5], k[0]) and torch.equal(k_buf[0, :, :5], k[1])
    assert torch.equal(v_buf[0, :, :5], -k[1])
    assert k_buf[1].abs().sum() == 0 and k_buf[:, :, 5:].abs().sum() == 0
    new = torch.randn(2, 2, 2, 4)
    cache.scatter(0, torch.tensor([0, 1]), torch.tensor([[5, 6], [0, 1]]), new, new)
    assert torch.equal(k_buf[0, :, 5:7], new[0]) and torch.equal(k_buf[1, :, :2], new[1])
    assert torch.equal(k_buf[0, :, :5], k[1])  # the prefix is untouched
    assert cache.export(0, 7).keys.shape == (1, 2, 7, 4)


def test_prefix_write_eager_copies_equal_the_traced_index_copy() -> None:
    """Eagerly, write_prefix copies each row's block (a Python loop over slot ids); traced, it is one
    index_copy_. Both give the same cache for views (v transposed, as attention hands it) and a
    padding row on the scratch slot, and leave the other slots' cells untouched."""
    caches = [KVCache(num_layers=1, slots=4, kv_heads=2, seq_len=8, head_dim=4, dtype=torch.bfloat16) for _ in range(2)]
    k = torch.randn(3, 2, 6, 4, dtype=torch.bfloat16)
    v = torch.randn(3, 6, 2, 4, dtype=torch.bfloat16).transpose(1, 2)
    slots = torch.tensor([3, 1, 4])  # 4: the scratch slot

    def traced(cache: KVCache) -> None:
        cache.write_prefix(0, slots, k, v)

    caches[0].write_prefix(0, slots, k, v)
    torch.compile(traced, backend="eager", fullgraph=True)(caches[1])
    for a, b in zip(caches[0].buffers_of(0), caches[1].buffers_of(0), strict=True):
        assert torch.equal(a, b)
    k_buf, v_buf = caches[0].buffers_of(0)
    assert torch.equal(k_buf[3, :, :6], k[0]) and torch.equal(v_buf[1, :, :6], v[1]) and torch.equal(v_buf[4, :, :6], v[2])
    assert k_buf[[0, 2]].abs().sum() == 0 and k_buf[:, :, 6:].abs().sum() == 0


def test_import_writes_only_the_slots_first_tokens_in_any_dtype_and_layout() -> None:
    """Same dtype (copied as bytes), another dtype (converted) and a non-contiguous snapshot."""
    for cache_dtype, kv_dtype in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)):
        cache = KVCache(num_layers=2, slots=3, kv_heads=2, seq_len=8, head_dim=4, dtype=cache_dtype)
        keys = torch.randn(2, 2, 5, 4, dtype=kv_dtype)
        for kv in (KVSnapshot(keys, -keys), KVSnapshot(keys.transpose(2, 3).contiguous().transpose(2, 3), 2 * keys)):
            cache.import_(1, kv)
            for layer in range(2):
                k_buf, v_buf = cache.buffers_of(layer)
                assert torch.equal(k_buf[1, :, :5], kv.keys[layer].to(cache_dtype))
                assert torch.equal(v_buf[1, :, :5], kv.values[layer].to(cache_dtype))
                assert k_buf[[0, 2]].abs().sum() == 0 and k_buf[1, :, 5:].abs().sum() == 0


def test_import_writes_into_buffers_that_replaced_the_ones_it_wrote_before() -> None:
    """The import keeps numpy views of the buffers: a replaced buffer (`Module.to`, an assignment)
    gets the next import, not the old one."""
    cache = KVCache(num_layers=2, slots=2, kv_heads=1, seq_len=4, head_dim=2, dtype=torch.float32)
    kv = KVSnapshot(torch.randn(2, 1, 3, 2), torch.randn(2, 1, 3, 2))
    cache.import_(0, kv)
    cache.v1 = torch.zeros_like(cache.v1)
    cache.to(torch.bfloat16)
    cache.import_(1, KVSnapshot(kv.keys.bfloat16(), kv.values.bfloat16()))
    for layer in range(2):
        k_buf, v_buf = cache.buffers_of(layer)
        assert k_buf.dtype == torch.bfloat16
        assert torch.equal(k_buf[1, :, :3], kv.keys[layer].bfloat16()) and torch.equal(v_buf[1, :, :3], kv.values[layer].bfloat16())
    assert cache.v1[0].abs().sum() == 0  # the replaced buffer's import is gone with it


def test_generation_continued_after_import_equals_one_engine(checkpoints: dict[str, Checkpoint]) -> None:
    ckpt = checkpoints["qwen3"]
    config = RuntimeConfig(batch_size=2, ctx_batch_size=1, seq_len=64, buckets=(32, 64))
    prompt = random_prompt(20, seed=3)
    sampling = SamplingParams(temperature=0.9, top_k=20, seed=11)
    stopping = StoppingCriteria(max_new_tokens=10, ignore_eos=True)
    [whole] = generate(Engine.from_pretrained(ckpt.path, config), [prompt], sampling=sampling, stopping=stopping)

    prefill = Engine.from_pretrained(ckpt.path, config)
    rng = RequestRng(sampling.seed)
    [first] = prefill.context_encode([SequenceRequest(slot=0, token_ids=prompt, sampling=sampling, rng=rng)])
    snapshot = prefill.export_kv(0, len(prompt))
    prefill.free(0)

    decode = Engine.from_pretrained(ckpt.path, config)
    decode.import_kv(1, snapshot)
    rng = RequestRng(sampling.seed, offset=rng.offset)
    tokens = [first]
    while len(tokens) < stopping.max_new_tokens:
        [nxt] = decode.token_generate([SequenceRequest(slot=1, token_ids=[tokens[-1]], sampling=sampling, rng=rng)])
        tokens.append(nxt)
    assert tokens == whole.output_ids
    assert snapshot.keys.shape == (2, ckpt.hf_model.config.num_key_value_heads, 20, 32)
    assert snapshot.nbytes == 2 * snapshot.keys.numel() * 4


def test_export_into_given_tensors_writes_them_in_place(checkpoints: dict[str, Checkpoint]) -> None:
    ckpt = checkpoints["llama"]
    engine = Engine.from_pretrained(ckpt.path, RuntimeConfig(batch_size=1, seq_len=64, dtype="float32"))
    prompt = random_prompt(11, seed=5)
    engine.context_encode([SequenceRequest(slot=0, token_ids=prompt, sampling=SamplingParams(), rng=RequestRng(0))])
    plain = engine.export_kv(0, len(prompt))
    out = KVSnapshot(keys=torch.full_like(plain.keys, float("nan")), values=torch.full_like(plain.values, float("nan")))
    got = engine.export_kv(0, len(prompt), out=out)
    assert got.keys.data_ptr() == out.keys.data_ptr() and got.values.data_ptr() == out.values.data_ptr()
    assert torch.equal(out.keys, plain.keys) and torch.equal(out.values, plain.values)
    shorter = engine.export_kv(0, 4, out=KVSnapshot(keys=torch.empty_like(plain.keys[:, :, :4]), values=torch.empty_like(plain.values[:, :, :4])))
    assert torch.equal(shorter.keys, plain.keys[:, :, :4])
    for bad, why in (
        (KVSnapshot(plain.keys[:, :, :5].clone(), plain.values.clone()), r"\(2, 2, 5, 16\)"),
        (KVSnapshot(plain.keys.double(), plain.values.clone()), "torch.float64"),
        (KVSnapshot(plain.keys.transpose(2, 3).contiguous().transpose(2, 3), plain.values.clone()), "not contiguous"),
    ):
        with pytest.raises(EngineError, match=why):
            engine.export_kv(0, len(prompt), out=bad)
