"""The prefill worker exports KV straight into the service's shared-memory arena, and every way a
request can end gives its region back."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from nxcore import Engine, RequestRng, RuntimeConfig, SamplingParams, SequenceRequest
from nxcore.engine_thread import EngineThread
from nxserve.kv import engine_layout
from nxserve.kv.shm import KVArena, SharedKVReader
from prefill_svc.worker import PrefillWorker
from tests.conftest import Checkpoint, random_prompt

CONFIG = RuntimeConfig(batch_size=1, seq_len=64, dtype="float32")


def _reference(path: Path, prompt: list[int]):
    """(first token, KV) of the prompt from an engine of its own."""
    engine = Engine.from_pretrained(path, CONFIG)
    [token] = engine.context_encode([SequenceRequest(slot=0, token_ids=prompt, sampling=SamplingParams(), rng=RequestRng(0))])
    return token, engine.export_kv(0, len(prompt))


def test_kv_is_exported_into_the_arena_and_every_request_releases_its_region(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    path, draft_path = checkpoints["llama"].path, checkpoints["llama-headdim-linear"].path  # a draft of another KV shape
    thread = EngineThread("prefill-engine")
    engine = thread.submit(Engine.from_pretrained, path, CONFIG, graphs="context").result(timeout=120)
    draft = thread.submit(Engine.from_pretrained, draft_path, CONFIG, graphs="context").result(timeout=120)
    assert engine_layout(engine, 1) != engine_layout(draft, 1)
    prompts = [random_prompt(n, seed=n) for n in (9, 10, 11)]

    def region(n_tokens: int) -> int:  # the arena bytes a prompt's KV (target and draft) takes
        return -(-sum(engine_layout(e, n_tokens).nbytes for e in (engine, draft)) // KVArena.ALIGN) * KVArena.ALIGN

    arena = KVArena(tmp_path, region(9) + region(10))  # room for the first two prompts' KV, not the third's
    reader = SharedKVReader(tmp_path)
    worker = PrefillWorker(engine, max_queue=8, draft=draft, thread=thread, arena=arena)
    encoding, gate = threading.Event(), threading.Event()
    encode = engine.context_encode

    def gated(requests):
        encoding.set()
        assert gate.wait(timeout=60)
        return encode(requests)

    worker.start()

    async def scenario() -> None:
        held = [await worker.submit(p, SamplingParams(), RequestRng(0)) for p in prompts[:2]]
        assert all(r.kv.region is not None for r in held) and arena.in_use == arena.nbytes
        overflow = await worker.submit(prompts[2], SamplingParams(), RequestRng(0))
        assert overflow.kv.region is None  # the arena is full: new tensors, the same KV
        for result, prompt in zip([*held, overflow], prompts):
            token, kv = _reference(path, prompt)
            assert result.first_token == token
            target_kv, draft_kv_got = result.kv.snapshots
            assert torch.equal(target_kv.keys, kv.keys) and torch.equal(target_kv.values, kv.values)
            _, draft_kv = _reference(draft_path, prompt)
            assert torch.equal(draft_kv_got.keys, draft_kv.keys) and torch.equal(draft_kv_got.values, draft_kv.values)
            if result.kv.region is not None:  # sealed: what a replica reads there passes its CRC-32 check and is the same KV
                target, drafted = reader.snapshots(result.kv.region.sealed, [engine_layout(e, len(prompt)) for e in (engine, draft)])
                assert torch.equal(target.values, kv.values) and torch.equal(drafted.keys, draft_kv.keys)
        for result in held:
            result.kv.release()
            result.kv.release()  # a second release (the request's `finally`) is a no-op
            assert result.kv.region is None and result.kv.released
        assert arena.in_use == 0

        draft_encode = draft.context_encode
        draft.context_encode = lambda requests: 1 / 0  # fails after the target's KV is in its region
        with pytest.raises(ZeroDivisionError):
            await worker.submit(prompts[0], SamplingParams(), RequestRng(0))
        assert arena.in_use == 0
        draft.context_encode = draft_encode

        engine.context_encode = gated  # cancelled while it is encoded: the worker gives its region back
        future = worker.submit(prompts[0], SamplingParams(), RequestRng(0))
        assert await asyncio.to_thread(encoding.wait, 60)
        future.cancel()
        gate.set()
        after = await worker.submit(prompts[1], SamplingParams(), RequestRng(0))  # its result comes after the cancelled one's
        assert after.kv.region is not None and arena.in_use == region(10)
        after.kv.release()
        assert arena.in_use == 0

    asyncio.run(scenario())
    worker.stop()
    thread.close(timeout=10)
    arena.close()


def test_prompts_wait_for_the_cores_turn_and_those_queued_by_then_share_the_call(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    """With turns on shared cores (nxserve.rpc.turns), no prompt is encoded while another process
    (a decode step) holds the cores; the prompts queued when the turn comes are encoded in one call."""
    from nxserve.rpc.turns import CoreTurns

    path = checkpoints["llama"].path
    config = RuntimeConfig(batch_size=4, ctx_batch_size=4, seq_len=64, dtype="float32")
    thread = EngineThread("prefill-engine")
    engine = thread.submit(Engine.from_pretrained, path, config, graphs="context").result(timeout=120)
    decode, turns = CoreTurns(tmp_path / "turns"), CoreTurns(tmp_path / "turns")
    worker = PrefillWorker(engine, max_queue=8, thread=thread, turns=turns)
    worker.start()
    prompts = [random_prompt(n, seed=n) for n in (7, 8, 9)]
    step = decode.turn()
    step.__enter__()  # a decode step in progress

    async def scenario() -> None:
        futures = [worker.submit(p, SamplingParams(), RequestRng(0)) for p in prompts]
        await asyncio.sleep(0.3)
        assert not any(f.done() for f in futures)  # none encoded while the step holds the cores
        step.__exit__(None, None, None)
        results = await asyncio.gather(*futures)
        assert [r.batch for r in results] == [3, 3, 3]  # the prompts queued by then, in one call
        for result, prompt in zip(results, prompts):
            assert result.first_token == _reference(path, prompt)[0]
            result.kv.release()

    try:
        asyncio.run(scenario())
    finally:
        worker.stop()
        thread.close(timeout=10)
        turns.close()
        decode.close()


def test_a_batch_is_split_into_the_calls_that_pad_the_least(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    """One long prompt among short ones gets a call of its own instead of padding them all to its
    bucket; --max-prefill-tokens caps each call's padded tokens; every prompt still gets the first
    token and KV it gets alone (up to float32 rounding: the calls' shapes differ)."""
    from nxserve.rpc.turns import CoreTurns

    path = checkpoints["llama"].path
    config = RuntimeConfig(batch_size=8, ctx_batch_size=8, seq_len=64, buckets=(32, 64), dtype="float32")
    thread = EngineThread("prefill-engine")
    engine = thread.submit(Engine.from_pretrained, path, config, graphs="context").result(timeout=120)
    calls: list[list[int]] = []
    encode = engine.context_encode

    def recorded(requests):
        calls.append([len(r.token_ids) for r in requests])
        return encode(requests)

    engine.context_encode = recorded
    decode, turns = CoreTurns(tmp_path / "turns"), CoreTurns(tmp_path / "turns")
    prompts = [random_prompt(n, seed=n) for n in (9, 10, 11, 12, 13, 14, 15, 50)]

    async def batch(worker: PrefillWorker) -> None:
        calls.clear()
        step = decode.turn()
        step.__enter__()  # hold the cores so that every prompt is queued before the worker's turn
        futures = [worker.submit(p, SamplingParams(), RequestRng(0)) for p in prompts]
        await asyncio.sleep(0.2)
        step.__exit__(None, None, None)
        results = await asyncio.gather(*futures)
        for result, prompt in zip(results, prompts):
            token, kv = _reference(path, prompt)
            assert result.first_token == token
            [got] = result.kv.snapshots  # other shapes than alone: the same up to float32 rounding
            torch.testing.assert_close(got.keys, kv.keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got.values, kv.values, rtol=1e-4, atol=1e-5)
            result.kv.release()

    for max_tokens, expected in ((4096, [[50], [9, 10, 11, 12, 13, 14, 15]]), (64, [[50], [9, 10], [11, 12], [13, 14], [15]])):
        worker = PrefillWorker(engine, max_queue=8, max_tokens=max_tokens, thread=thread, turns=turns)
        worker.start()
        try:
            asyncio.run(batch(worker))
        finally:
            worker.stop()
        assert sorted(calls) == sorted(expected), max_tokens
    thread.close(timeout=10)
    turns.close()
    decode.close()
