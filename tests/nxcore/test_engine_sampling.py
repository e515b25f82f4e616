"""Sampling through the engine: seeded requests are independent of their batch, host and graph
sampling agree (the compile backend is checked in test_compiled.py)."""

from __future__ import annotations

from nxcore import Engine, RuntimeConfig, SamplingParams, StoppingCriteria, generate
from tests.conftest import Checkpoint, random_prompt

CONFIG = RuntimeConfig(batch_size=4, ctx_batch_size=2, seq_len=64, buckets=(32, 64))
STOP = StoppingCriteria(max_new_tokens=16, ignore_eos=True)


def test_same_seed_same_tokens_alone_and_in_a_batch(checkpoints: dict[str, Checkpoint]) -> None:
    engine = Engine.from_pretrained(checkpoints["llama"].path, CONFIG)
    prompt = random_prompt(12, seed=1)
    mine = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=1234)
    [alone] = generate(engine, [prompt], sampling=mine, stopping=STOP)
    others = [random_prompt(n, seed=n) for n in (5, 20, 9)]
    batch = generate(
        engine,
        [others[0], prompt, others[1], others[2]],
        sampling=[SamplingParams(temperature=0.7, seed=1), mine, SamplingParams(), SamplingParams(temperature=1.3, top_p=0.5, seed=2)],
        stopping=STOP,
    )
    assert batch[1].output_ids == alone.output_ids
    [again] = generate(engine, [prompt], sampling=mine, stopping=STOP)
    assert again.output_ids == alone.output_ids
    [other_seed] = generate(engine, [prompt], sampling=SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=99), stopping=STOP)
    assert other_seed.output_ids != alone.output_ids


def test_host_sampling_equals_graph_sampling(checkpoints: dict[str, Checkpoint]) -> None:
    prompts = [random_prompt(n, seed=n) for n in (7, 25)]
    sampling = SamplingParams(temperature=0.8, top_k=30, seed=7)
    on_device = generate(Engine.from_pretrained(checkpoints["qwen2"].path, CONFIG), prompts, sampling=sampling, stopping=STOP)
    host = generate(
        Engine.from_pretrained(checkpoints["qwen2"].path, CONFIG.replace(on_device_sampling=False)),
        prompts,
        sampling=sampling,
        stopping=STOP,
    )
    assert [r.output_ids for r in host] == [r.output_ids for r in on_device]


def test_stop_token_and_eos_end_a_request(checkpoints: dict[str, Checkpoint]) -> None:
    engine = Engine.from_pretrained(checkpoints["llama"].path, CONFIG)
    prompt = random_prompt(9, seed=3)
    [free_run] = generate(engine, [prompt], stopping=STOP)
    stop_at = free_run.output_ids[4]
    cut = free_run.output_ids.index(stop_at) + 1
    [stopped] = generate(engine, [prompt], stopping=StoppingCriteria(max_new_tokens=16, stop_token_ids=(stop_at,)))
    assert stopped.output_ids == free_run.output_ids[:cut] and stopped.finish_reason == "stop"
    [eos] = generate(engine, [prompt], stopping=StoppingCriteria(max_new_tokens=16), eos_token_ids=[stop_at])
    assert eos.output_ids == free_run.output_ids[:cut] and eos.finish_reason == "eos"
