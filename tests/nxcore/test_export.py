"""Every graph exports with torch.export (strict: no graph breaks) and keeps its in-place KV update."""

from __future__ import annotations

import pytest
import torch

from nxcore import Engine, RequestRng, RuntimeConfig, SamplingParams, SequenceRequest
from tests.conftest import Checkpoint


def _export_and_check(module: torch.nn.Module, inputs, num_layers: int) -> None:
    program = torch.export.export(module, (inputs,), strict=True)
    # Functionalized, the in-place cache writes become buffer mutations of every K and V buffer.
    mutated = {spec.target for spec in program.run_decompositions().graph_signature.output_specs if spec.kind.name == "BUFFER_MUTATION"}
    assert mutated == {f"model.kv_cache.{kv}{i}" for i in range(num_layers) for kv in "kv"}


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral"])
def test_all_graphs_export_strict(checkpoints: dict[str, Checkpoint], name: str) -> None:
    config = RuntimeConfig(batch_size=2, ctx_batch_size=2, seq_len=64, buckets=(32, 64), speculation_length=3)
    engine = Engine.from_pretrained(checkpoints[name].path, config)
    layers = engine.model_config.num_layers
    sampling = SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=0)
    prompt = SequenceRequest(slot=0, token_ids=[5, 6, 7], sampling=sampling, rng=RequestRng(0))
    _export_and_check(engine.executor.runner.ctx_graph, engine._inputs([prompt], rows=2, width=32, prefill=True), layers)
    engine.context_encode([prompt])
    one = SequenceRequest(slot=0, token_ids=[8], sampling=sampling, rng=RequestRng(0))
    _export_and_check(engine.executor.runner.decode_graph, engine._inputs([one], rows=2, width=1, prefill=False), layers)
    spec = SequenceRequest(slot=0, token_ids=[8, 9, 10], sampling=sampling, rng=RequestRng(0))
    _export_and_check(engine.executor.runner.decode_graph, engine._inputs([spec], rows=2, width=3, prefill=False), layers)


def test_exported_token_generation_equals_eager(checkpoints: dict[str, Checkpoint]) -> None:
    config = RuntimeConfig(batch_size=2, ctx_batch_size=1, seq_len=64, buckets=(64,))
    engine = Engine.from_pretrained(checkpoints["llama"].path, config)
    greedy = SamplingParams()
    engine.context_encode([SequenceRequest(slot=1, token_ids=[3, 4, 5, 6], sampling=greedy, rng=RequestRng(0))])
    step = SequenceRequest(slot=1, token_ids=[9], sampling=greedy, rng=RequestRng(0))
    inputs = engine._inputs([step], rows=2, width=1, prefill=False)
    exported = torch.export.export(engine.executor.runner.decode_graph, (inputs,), strict=True).module()
    snapshot = engine.export_kv(1, 4)
    (expected,) = engine.executor.runner.decode_graph(inputs)
    engine.model.kv_cache.import_(1, snapshot)  # undo the eager call's write before the exported one
    (actual,) = exported(inputs)
    assert torch.equal(actual, expected)
