"""The xla backend: nxcore's graphs through torch-xla, the layer torch-neuronx is built on.

torch-neuronx is torch-xla plus a Neuron PJRT plugin, so this backend is the Neuron path minus
the plugin: the same tracing and lowering, checked here on torch-xla's CPU device
(`PJRT_DEVICE=CPU`) and run on Neuron cores with `PJRT_DEVICE=NEURON` (README, "Running on AWS
Neuron"). Weights and the KV cache live on the XLA device; each graph (`GraphKey`) is one XLA
program, compiled once for its static shape, that writes the cache in place and samples in the
graph; every input, positions included, is a tensor, so no value is baked into a program.

Graphs go through `torch.compile(backend="openxla", fullgraph=True, dynamic=False)` rather than
torch-xla's lazy tensors (plain calls + a sync): measured with `python -m bench.xla_check` (tiny
llama, fp32, 2 CPU cores) the lazy mode re-traces the whole model in Python every step, which
costs more than the program itself; the dynamo path replays a cached program (figures in the
README). `MODES` keeps both for that measurement.

Everything that depends on torch-xla's API is in this file, and torch-xla is imported only when
the backend is used: the project's own venv (pinned torch) has none, and `--backend xla` there
fails with `XlaUnavailable`, which says how to get it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import torch

from nxcore.config import RuntimeConfig
from nxcore.errors import EngineError
from nxcore.executor import GraphRunner, LocalExecutor
from nxcore.graphs import GraphInputs, GraphKey
from nxcore.kv_cache import KVCache, KVSnapshot
from nxcore.modules.decoder import CausalLM

TORCH_XLA_VERSION = "2.9.0"
"""The torch-xla release this backend was checked with (it pins torch 2.9.0, as the Neuron SDK's
torch-neuronx 2.9 does): `make xla-check` installs it."""

INSTALL_HINT = (
    f"the xla backend needs torch-xla ({TORCH_XLA_VERSION}, which pins torch {TORCH_XLA_VERSION}): "
    "`make xla-check` builds a virtualenv with it under .cache/xla-venv and checks this backend there; "
    f"or `pip install torch=={TORCH_XLA_VERSION} torch-xla=={TORCH_XLA_VERSION}` into a venv of its own "
    "(on a Neuron host: the Neuron SDK's torch-neuronx, which brings torch-xla)"
)

MODES = ("dynamo", "lazy")
"""How a graph is traced: `dynamo`, torch.compile's openxla backend (the default); `lazy`, torch-xla's
lazy tensors, the whole module re-traced in Python on every call (kept for the benchmark)."""


class XlaUnavailable(EngineError):
    """The xla backend was asked for where torch-xla is not installed."""


def require() -> ModuleType:
    """torch_xla, or `XlaUnavailable` saying how to get it."""
    try:
        import torch_xla
    except ImportError as exc:
        raise XlaUnavailable(f"--backend xla: torch_xla is not importable here ({exc}); {INSTALL_HINT}") from exc
    return torch_xla


def device() -> torch.device:
    """The XLA device of this process (`PJRT_DEVICE` picks CPU or NEURON)."""
    return torch.device(require().device())


def sync() -> None:
    """Run what the lazy tensors recorded so far (xm.mark_step before torch-xla 2.5)."""
    require().sync()


def to_device(model: CausalLM) -> None:
    """Move the weights and the KV cache to the XLA device and materialize them there.

    The sync turns the moved tensors into device data: without it the first graph would carry the
    transfers and the cache's zero-fill and compile once more than its shape needs (measured: one
    extra compilation of the first context-encoding graph)."""
    model.to(device())
    model.tie_weights()
    sync()


@dataclass(frozen=True)
class XlaMetrics:
    """torch-xla's counters over a run (`torch_xla.debug.metrics`)."""

    compilations: int
    """XLA programs compiled (the `CompileTime` metric's sample count)."""
    executions: int
    """XLA programs run (`ExecuteTime`)."""
    fallbacks: dict[str, int]
    """`aten::` counters: ops torch-xla ran on the host instead of the device (each a sync, or a
    graph cut in two), by op name. A static-shape graph has none."""


def metrics() -> XlaMetrics:
    require()
    import torch_xla.debug.metrics as met

    def count(name: str) -> int:
        data = met.metric_data(name)
        return int(data[0]) if data else 0

    fallbacks = {name: int(met.counter_value(name)) for name in met.counter_names() if name.startswith("aten::")}
    return XlaMetrics(compilations=count("CompileTime"), executions=count("ExecuteTime"), fallbacks=fallbacks)


def clear_metrics() -> None:
    require()
    import torch_xla.debug.metrics as met

    met.clear_all()


def _allow_recompiles(graphs: int) -> None:
    """Make room in dynamo's cache for `graphs` more programs. torch.compile caches programs per code
    object, so every shape of every engine's module shares one `forward` entry list (guarded on the
    module), and past `recompile_limit` entries (8) a fullgraph compile fails: a serving config has
    more shapes than that (rows x KV buckets), and a process may hold several engines (a draft and
    its target, the checks)."""
    config = torch._dynamo.config
    config.recompile_limit += graphs
    config.accumulated_recompile_limit += graphs


class XlaGraph:
    """One graph shape on the XLA device, called like the module: CPU inputs in, CPU outputs back."""

    def __init__(self, traced: Callable[[GraphInputs], tuple[torch.Tensor, ...]], *, lazy: bool, dev: torch.device) -> None:
        self._traced = traced
        self._lazy = lazy
        self._device = dev

    def __call__(self, inputs: GraphInputs) -> tuple[torch.Tensor, ...]:
        on_device = GraphInputs(**{f.name: getattr(inputs, f.name).to(self._device) for f in dataclasses.fields(GraphInputs)})
        outputs = self._traced(on_device)
        if self._lazy:
            sync()
        return tuple(t.cpu() for t in outputs)


class XlaGraphRunner(GraphRunner):
    """GraphRunner whose graphs are XLA programs: one torch.compile per module, one compiled
    program per shape under it."""

    def __init__(self, model: CausalLM, config: RuntimeConfig, graphs: str = "all", *, mode: str = "dynamo") -> None:
        if mode not in MODES:
            raise ValueError(f"xla mode {mode!r} is invalid: allowed one of {list(MODES)}")
        super().__init__(model, config, None, graphs)
        self.mode = mode
        self.device = device()
        self._traced: dict[int, Callable[[GraphInputs], tuple[torch.Tensor, ...]]] = {}
        from nxcore.compiled import graph_keys

        _allow_recompiles(len(graph_keys(config, graphs)))

    def _graph(self, key: GraphKey) -> Callable[..., tuple[torch.Tensor, ...]]:
        graph = self._graphs.get(key)
        if graph is None:
            module = self._module(key.kind)
            traced = self._traced.get(id(module))
            if traced is None:
                traced = module if self.mode == "lazy" else torch.compile(module, backend="openxla", fullgraph=True, dynamic=False)
                self._traced[id(module)] = traced
            graph = self._graphs[key] = XlaGraph(traced, lazy=self.mode == "lazy", dev=self.device)
        return graph

    def profile(self, key: GraphKey, inputs: GraphInputs, steps: int) -> dict[str, float]:
        """Wall-clock milliseconds per call (the CPU profiler sees none of the device's time)."""
        self.run(key, inputs)
        start = time.perf_counter()
        for _ in range(steps):
            self.run(key, inputs)
        return {"step_ms": (time.perf_counter() - start) * 1000 / steps, "collective_ms": 0.0}


class XlaExecutor(LocalExecutor):
    """TP=1 on one XLA device (one NeuronCore under `NEURON_RT_VISIBLE_CORES`).

    KV hand-off copies whole cache buffers through the host: a device-side slice at a Python
    position would be a new XLA program per (slot, length)."""

    def __init__(self, model: CausalLM, config: RuntimeConfig, graphs: str = "all", *, mode: str = "dynamo") -> None:
        if config.tp_degree != 1:
            raise EngineError(f"the xla backend runs tp_degree=1 only (asked: {config.tp_degree})")
        to_device(model)
        self.runner = XlaGraphRunner(model, config, graphs, mode=mode)
        self.scratch_slot = model.kv_cache.scratch_slot
        self.store = None

    def export_kv(self, slot: int, n_tokens: int, out: KVSnapshot | None = None) -> KVSnapshot:
        host = _host_cache(self.model.kv_cache)
        return host.export(slot, n_tokens, out)

    def import_kv(self, slot: int, kv: KVSnapshot) -> None:
        cache = self.model.kv_cache
        host = _host_cache(cache)
        host.import_(slot, kv)
        with torch.no_grad():
            for name, buf in cache.named_buffers():
                buf.copy_(getattr(host, name).to(buf.device))
        sync()

    def prompt_logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """For checks: runs lazily on the device (an XLA program per prompt length)."""
        logits = self.runner.prompt_logits(token_ids)
        return logits.cpu()


def _host_cache(cache: KVCache) -> KVCache:
    """A host copy of a device cache (same shapes; its buffers are the device buffers' contents)."""
    k0 = cache.buffers_of(0)[0]
    host = KVCache(num_layers=cache.num_layers, slots=cache.slots, kv_heads=k0.shape[1], seq_len=cache.seq_len, head_dim=k0.shape[3], dtype=k0.dtype)
    for name, buf in cache.named_buffers():
        setattr(host, name, buf.cpu())
    return host


def describe() -> dict[str, str]:
    """Versions and device, for reports."""
    torch_xla = require()
    import torch_xla.runtime as xr

    return {"torch": torch.__version__, "torch_xla": torch_xla.__version__, "device": str(device()), "pjrt_device": xr.device_type() or "?"}
