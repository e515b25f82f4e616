"""Executors run the graphs an engine asks for: in this process (TP=1, `LocalExecutor`) or over TP
rank processes (`nxcore.parallel.executor.TPExecutor`), behind one protocol (`Executor`).
`export_kv` always returns the logical layout (the model's real KV heads in order) and
`import_kv` takes it, whatever the TP degree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from nxcore.compiled import GRAPH_SETS, ArtifactStore, graph_keys
from nxcore.config import RuntimeConfig
from nxcore.graphs import ContextEncodingGraph, DecodeGraph, GraphInputs, GraphKey, GraphKind, example_inputs
from nxcore.kv_cache import KVSnapshot
from nxcore.modules import fused
from nxcore.modules.decoder import CausalLM

__all__ = ["Executor", "GraphKey", "GraphRunner", "LocalExecutor"]


class Executor(Protocol):
    """What the engine asks of whoever runs its graphs."""

    scratch_slot: int
    """The KV cache row padding rows of a graph call write to."""
    store: ArtifactStore | None
    """Where compiled graphs come from (compile backend); None otherwise."""

    def run(self, key: GraphKey, inputs: GraphInputs) -> tuple[torch.Tensor, ...]: ...
    def compile(self, key: GraphKey) -> None: ...
    def export_kv(self, slot: int, n_tokens: int, out: KVSnapshot | None = None) -> KVSnapshot: ...
    def import_kv(self, slot: int, kv: KVSnapshot) -> None: ...
    def prompt_logits(self, token_ids: Sequence[int]) -> torch.Tensor: ...
    def profile(self, key: GraphKey, inputs: GraphInputs, steps: int) -> dict[str, float]: ...
    def close(self) -> None: ...


class GraphRunner:
    """One rank's model and its graphs, one per (kind, rows, width, KV length).

    On the eager backend a graph is the module itself. On the compile backend it is an
    AOTInductor package from `store`; every package of the set `graphs` (see
    `nxcore.compiled.GRAPH_SETS`) is required and loaded up front, so a warm cache serves its first
    request without compiling.
    """

    def __init__(self, model: CausalLM, config: RuntimeConfig, store: ArtifactStore | None = None, graphs: str = "all") -> None:
        if (config.backend == "compile") != (store is not None):
            raise ValueError(f"backend {config.backend!r} {'needs' if store is None else 'takes no'} compiled-artifact store")
        self.model = model
        self.config = config
        self.store = store
        logits = not config.on_device_sampling
        self.ctx_graph = ContextEncodingGraph(model, max_topk=config.max_topk, output_logits=logits)
        self.decode_graph = DecodeGraph(model, max_topk=config.max_topk, output_logits=logits)
        self.scoring_graph = DecodeGraph(model, max_topk=config.max_topk, output_logits=True)
        """Token generation / speculation that also returns full logits (host-side speculative acceptance)."""
        self._modules: dict[GraphKind, torch.nn.Module] = {
            GraphKind.CONTEXT: self.ctx_graph,
            GraphKind.TOKEN_GENERATION: self.decode_graph,
            GraphKind.SPECULATION: self.decode_graph,
            GraphKind.SCORING: self.scoring_graph,
        }
        self._graphs: dict[GraphKey, Callable[..., tuple[torch.Tensor, ...]]] = {}
        if store is not None:
            store.require(graph_keys(config, graphs))
            for key in store.graphs():
                if key.kind in GRAPH_SETS[graphs]:
                    self._graph(key)

    def _module(self, kind: GraphKind) -> torch.nn.Module:
        return self._modules[kind]

    def runs_eagerly(self, key: GraphKey) -> bool:
        """Whether `key` runs as the eager module on the compile backend too: bf16 context encoding
        where nxcore's fused elementwise ops and prefill attention run (eager-only kernels,
        `nxcore.modules.fused`). Measured on the small llama (Intel Xeon with AMX, one thread):
        eager 23-25 ms at 128 tokens and 65-75 at 512, against the AOTInductor graph's 33 and 107
        (Inductor's own fused loops and SDPA); on AMD EPYC (the llama 512x8 of bench/peers, one
        thread, two alternations) eager 42.4 / 160-161 / 760-776 ms at 128 / 512 / 2048 tokens
        against 42.3-45.2 / 195-196 / 1046. The compiled graph is still built and required, so
        an artifact cache serves any machine. `bench.engine --backends eager compile` compares them.
        Not in batch-invariant mode, where context encoding must give the compiled token
        generation's bits (Inductor's norms and rotary, not nxcore's fused ones)."""
        return (
            self.store is not None
            and key.kind is GraphKind.CONTEXT
            and not self.config.batch_invariant
            and self.model.rope_cos.dtype == torch.bfloat16
            and fused.attention_supported()
        )

    def _graph(self, key: GraphKey) -> Callable[..., tuple[torch.Tensor, ...]]:
        graph = self._graphs.get(key)
        if graph is None:
            module = self._module(key.kind)
            if self.store is None or self.runs_eagerly(key):
                graph = module
            else:
                graph = self.store.load(key, module, example_inputs(key, self.model.kv_cache.scratch_slot))
            self._graphs[key] = graph
        return graph

    def compile(self, key: GraphKey) -> None:
        """Compile one graph into the store."""
        if self.store is None:
            raise ValueError(f"backend {self.config.backend!r} compiles nothing")
        self.store.compile(key, self._module(key.kind), example_inputs(key, self.model.kv_cache.scratch_slot))

    @torch.no_grad()
    def run(self, key: GraphKey, inputs: GraphInputs) -> tuple[torch.Tensor, ...]:
        return self._graph(key)(inputs)

    def profile(self, key: GraphKey, inputs: GraphInputs, steps: int) -> dict[str, float]:
        """Milliseconds per call of this graph, and how many of them went to collectives (for benchmarks)."""
        from torch.profiler import ProfilerActivity, profile

        self.run(key, inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                self.run(key, inputs)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1000 / steps
        collective = sum(e.self_cpu_time_total for e in events if "c10d" in e.key or "gloo" in e.key) / 1000 / steps
        return {"step_ms": total, "collective_ms": collective}

    def export_local(self, slot: int, n_tokens: int, out: KVSnapshot | None = None) -> KVSnapshot:
        return self.model.kv_cache.export(slot, n_tokens, out)

    def import_heads(self, slot: int, kv: KVSnapshot, heads: Sequence[int]) -> None:
        """Write the logical snapshot's `heads` (this rank's KV heads) into `slot`."""
        index = torch.tensor(list(heads))
        self.model.kv_cache.import_(slot, KVSnapshot(kv.keys.index_select(1, index), kv.values.index_select(1, index)))

    @torch.no_grad()
    def prompt_logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.tensor([list(token_ids)], dtype=torch.int64)
        positions = torch.arange(ids.shape[1])[None]
        slot = torch.tensor([self.model.kv_cache.scratch_slot])
        ctx = self.model.context(prefill=True, slot_ids=slot, positions=positions)
        logits = self.model.logits(self.model.hidden_states(ids, ctx))[0]
        return self.model.comm.all_gather(logits, dim=-1)[:, : self.model.cfg.vocab_size]


class LocalExecutor:
    """TP=1: the graphs run in this process."""

    def __init__(self, model: CausalLM, config: RuntimeConfig, store: ArtifactStore | None = None, graphs: str = "all") -> None:
        self.runner = GraphRunner(model, config, store, graphs)
        self.scratch_slot = model.kv_cache.scratch_slot
        self.store = store

    @property
    def model(self) -> CausalLM:
        return self.runner.model

    def run(self, key: GraphKey, inputs: GraphInputs) -> tuple[torch.Tensor, ...]:
        return self.runner.run(key, inputs)

    def compile(self, key: GraphKey) -> None:
        self.runner.compile(key)

    def export_kv(self, slot: int, n_tokens: int, out: KVSnapshot | None = None) -> KVSnapshot:
        return self.runner.export_local(slot, n_tokens, out)

    def import_kv(self, slot: int, kv: KVSnapshot) -> None:
        self.model.kv_cache.import_(slot, kv)

    def prompt_logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        return self.runner.prompt_logits(token_ids)

    def profile(self, key: GraphKey, inputs: GraphInputs, steps: int) -> dict[str, float]:
        return self.runner.profile(key, inputs, steps)

    def close(self) -> None:
        pass
