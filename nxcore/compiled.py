"""Compiled graphs: AOTInductor packages in a cache folder, compiled once and reused.

Each (kind, rows, width, KV length) graph the engine can call is exported with strict
`torch.export` and compiled by AOTInductor into one `.pt2` package. The packages live in one
folder per artifact key (model fingerprint, runtime config, torch version, backend, nxcore code)
under a cache root, with a `manifest.json` recording that key. The fingerprint covers the weights
and their dtype; a digest of nxcore's source stands for the code the graphs were traced from.
Weights are never saved in a package (`package_constants_in_so=False`): at load the engine hands
the runner its own parameters and KV cache buffers with `user_managed=True`, so every graph shares
one copy of the weights (read from the HF checkpoint) and writes the one KV cache in place. The
bf16 linears' oneDNN packing is done once at load too (`nxcore.modules.linear`), not per graph.

Why AOTInductor rather than torch.compile's on-disk caches (measured on this project's 2-core CPU
machine, 125M llama, bf16, batch-1 decode): eager 19.4 ms, torch.compile 16.6-19.5 ms, torch.compile
with inductor freezing 11-15 ms but freezing packs weights into oneDNN constants that inductor's
FX-graph cache cannot store (every process recompiles, ~15 s per graph) and that are a copy of the
weights per graph; AOTInductor 13-17 ms, and a warm package loads in ~5 ms without tracing. AOTI's
own freezing (runtime constant folding) was not used for the same per-graph weight copies.

A missing package is an error unless compiling on demand was asked for: a production service
never compiles silently. `nxserve compile` fills the cache ahead of deployment.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nxcore import native
from nxcore.config import RuntimeConfig
from nxcore.errors import EngineError
from nxcore.graphs import GraphKey, GraphKind

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

Graph = Callable[..., tuple[torch.Tensor, ...]]


class ArtifactError(EngineError):
    """Compiled artifacts are missing or were built for something else."""


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `module` by qualified name (shared ones under each name): what
    a graph exported from `module` binds its constants to."""
    return {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers(remove_duplicate=False))}


class PackagedGraph:
    """One AOTInductor package, called like the module it was exported from.

    It runs through nxcore's `AOTIGraph` (`nxcore/csrc/graph.cpp`), which releases the GIL for the
    call, so the serving threads' event loops run beside a step; torch's `load_package` runner
    holds the GIL throughout (measured: a Python thread woke 1-8 times in a 10 ms compiled decode
    step, against every ~0.2 ms beside an eager one). Where nxcore's C++ ops are not built, torch's
    runner stands in."""

    def __init__(self, path: Path, *, nxcore_runner: bool | None = None) -> None:
        """`nxcore_runner`: run through nxcore's AOTIGraph (default: where the C++ ops are built)."""
        from torch.utils import _pytree as pytree

        self._pytree = pytree
        self.releases_gil = native.available() if nxcore_runner is None else nxcore_runner
        """Whether calls run through nxcore's runner, with the GIL released."""
        if self.releases_gil:
            graph = torch.classes.nxcore.AOTIGraph(str(path))
            specs, self.constant_fqns, self._bind, self._run = graph.call_spec(), graph.constant_fqns, graph.bind, graph.run
        else:
            from torch._inductor.package import load_package

            loader = load_package(str(path)).loader
            specs, self.constant_fqns, self._run = loader.get_call_spec(), loader.get_constant_fqns, loader.boxed_run
            self._bind = lambda tensors: loader.load_constants(tensors, False, True, True)
        self._out_spec = pytree.treespec_loads(specs[1])

    def bind(self, tensors: dict[str, torch.Tensor]) -> None:
        """Use these tensors' memory for the graph's weights and buffers (user-managed: one copy of
        the weights across graphs, KV writes land in the engine's cache)."""
        self._bind(tensors)

    def __call__(self, *args: Any) -> Any:
        """The exported module's outputs for `args`, flattened as at export (the runner checks
        their count; the executor, their shapes)."""
        flat = [x for x in self._pytree.tree_leaves(args) if isinstance(x, torch.Tensor)]
        return self._pytree.tree_unflatten(self._run(flat), self._out_spec)


def default_cache_root() -> Path:
    """~/.cache/nxserve/compiled (the command line's --compile-cache defaults to $NXSERVE_COMPILE_CACHE first)."""
    return Path.home() / ".cache" / "nxserve" / "compiled"


GRAPH_SETS: dict[str, tuple[GraphKind, ...]] = {
    "all": tuple(GraphKind),
    "context": (GraphKind.CONTEXT,),
    "decode": (GraphKind.TOKEN_GENERATION, GraphKind.SPECULATION, GraphKind.SCORING),
}
"""Which graph kinds an engine loads: all of them (in-process generation), context encoding only
(a prefill service), or everything that extends a cache another engine filled (a decode service,
which receives its prompts' KV). Each service then compiles and preloads only its own graphs."""


def check_graph_set(graphs: str) -> str:
    if graphs not in GRAPH_SETS:
        raise ValueError(f"graph set {graphs!r} is not one of {', '.join(GRAPH_SETS)}")
    return graphs


def graph_keys(config: RuntimeConfig, graphs: str = "all") -> list[GraphKey]:
    """Every graph of the set `graphs` (see GRAPH_SETS) an engine built for `config` can call:
    context encoding per (rows, bucket), token generation per (rows, KV bucket), and with
    speculation the speculation and scoring graphs (scoring returns logits for host-side
    acceptance) per (rows, KV bucket)."""
    kinds = GRAPH_SETS[check_graph_set(graphs)]
    keys = [GraphKey(GraphKind.CONTEXT, rows, b, b) for rows in config.ctx_batch_buckets for b in config.buckets]
    keys += [GraphKey(GraphKind.TOKEN_GENERATION, rows, 1, kv) for rows in config.batch_buckets for kv in config.kv_buckets if kv >= 2]
    width = config.speculation_length + 1
    if config.speculation_length:
        for kind in (GraphKind.SPECULATION, GraphKind.SCORING):
            keys += [GraphKey(kind, rows, width, kv) for rows in config.batch_buckets for kv in config.kv_buckets if kv > width]
    return [key for key in keys if key.kind in kinds]


TRACED_SOURCES = ("compiled.py", "graphs.py", "sampling.py", "kv_cache.py", "model_config.py", "modules/*.py", "parallel/comm.py", "parallel/plan.py")
"""nxcore's files that the compiled graphs are traced from (or compiled by)."""


@functools.cache
def code_digest() -> str:
    """A hash of the nxcore source the graphs are traced from: artifacts built by other code are
    stale even for the same model and config."""
    digest = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(p for pattern in TRACED_SOURCES for p in root.glob(pattern)):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class ArtifactKey:
    """What a folder of compiled graphs was built for; any difference means other artifacts."""

    fingerprint: str
    config: RuntimeConfig
    torch_version: str = torch.__version__
    code: str = dataclasses.field(default_factory=code_digest)
    native_ops: bool = dataclasses.field(default_factory=native.available)
    """Whether nxcore's C++ ops were loaded: graphs traced with them call them, graphs traced
    without them run the Python ops' code, so neither loads in the other kind of process."""

    def fields(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "torch": self.torch_version,
            "nxcore_code": self.code,
            "nxcore_native_ops": self.native_ops,
            **self.config.to_dict(),
        }

    @property
    def dirname(self) -> str:
        digest = hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.fingerprint}-{self.config.backend}-{digest}"


def _differences(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    return [f"{k}={theirs.get(k)!r} (this engine: {mine[k]!r})" for k in mine if theirs.get(k) != mine[k]]


class ArtifactStore:
    """The artifact folder of one key under a cache root: which graphs it holds, loading them, and
    (when allowed) compiling the missing ones into it."""

    def __init__(self, root: str | Path, key: ArtifactKey, *, compile_on_demand: bool = False) -> None:
        self.root = Path(root)
        self.key = key
        self.dir = self.root / key.dirname
        self.compile_on_demand = compile_on_demand
        manifest = self.dir / MANIFEST
        if manifest.exists():
            self._check_manifest(json.loads(manifest.read_text()), str(manifest))
        elif not compile_on_demand:
            raise ArtifactError(self._miss_message())

    # ---------------------------------------------------------------- lookup

    def graphs(self) -> list[GraphKey]:
        """Graphs present in the folder."""
        if not (self.dir / MANIFEST).exists():
            return []
        return [GraphKey(*k) for k in json.loads((self.dir / MANIFEST).read_text())["graphs"]]

    def missing(self, keys: list[GraphKey]) -> list[GraphKey]:
        present = set(self.graphs())
        return [k for k in keys if k not in present or not (self.dir / k.file_name).exists()]

    def require(self, keys: list[GraphKey]) -> None:
        """Raise unless every graph in `keys` is present (or may be compiled on demand)."""
        missing = self.missing(keys)
        if missing and not self.compile_on_demand:
            raise ArtifactError(
                f"{len(missing)} of {len(keys)} graphs are missing from {self.dir} (first: {missing[0]}): "
                f"run `nxserve compile` with the same model and engine flags, or pass --compile-on-demand"
            )

    def _miss_message(self) -> str:
        mine = self.key.fields()
        nearest = []
        for manifest in sorted(self.root.glob(f"*/{MANIFEST}")) if self.root.is_dir() else []:
            try:
                theirs = json.loads(manifest.read_text()).get("key", {})
            except (OSError, json.JSONDecodeError):
                continue
            nearest.append(_differences(mine, theirs))
        nearest = sorted(nearest, key=len)[:3]
        hint = " The nearest artifacts there differ in: " + "; ".join(", ".join(d) for d in nearest) + "." if nearest else ""
        return (
            f"no compiled artifacts for this model and runtime config in {self.root} (looked for {self.key.dirname}).{hint} "
            f"Run `nxserve compile --model DIR` with the same engine flags first, or pass --compile-on-demand "
            f"to compile missing graphs at run time"
        )

    def _check_manifest(self, manifest: dict[str, Any], where: str) -> None:
        diffs = _differences(self.key.fields(), manifest.get("key", {}))
        if diffs:
            raise ArtifactError(
                f"compiled artifacts in {where} were built for different settings: {', '.join(diffs)}; "
                f"recompile them with `nxserve compile` for this model, config and torch version"
            )

    # ---------------------------------------------------------------- load and compile

    def load(self, key: GraphKey, module: nn.Module, example: Any) -> Graph:
        """The compiled graph for `key`, bound to `module`'s weights and buffers; compiled first
        when it is missing and compiling on demand is allowed."""
        path = self.dir / key.file_name
        if not path.exists() or key not in self.graphs():
            if not self.compile_on_demand:
                raise ArtifactError(
                    f"graph {key} is not in the compiled artifacts at {self.dir}: run `nxserve compile` "
                    f"with the same model and engine flags, or pass --compile-on-demand"
                )
            self.compile(key, module, example)
        runner = PackagedGraph(path)
        tensors = module_tensors(module)
        names = runner.constant_fqns()
        unknown = [n for n in names if n not in tensors]
        if unknown:
            raise ArtifactError(f"{path} expects tensors {unknown[:4]} this model does not have: recompile it")
        runner.bind({n: tensors[n] for n in names})
        return runner

    def compile(self, key: GraphKey, module: nn.Module, example: Any) -> None:
        """Export `module` on `example` inputs and compile it into this folder."""
        from torch._inductor import aoti_compile_and_package

        start = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / key.file_name
        tmp = path.with_suffix(".tmp.pt2")
        with warnings.catch_warnings():  # torch's own pytree deprecation notice, once per graph
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            program = torch.export.export(module, (example,), strict=True)
            aoti_compile_and_package(program, package_path=str(tmp), inductor_configs={"aot_inductor.package_constants_in_so": False})
        tmp.replace(path)
        self._record(key)
        log.info("compiled %s in %.1fs -> %s", key, time.perf_counter() - start, path)

    def _record(self, key: GraphKey) -> None:
        manifest = self.dir / MANIFEST
        data: dict[str, Any] = json.loads(manifest.read_text()) if manifest.exists() else {"key": self.key.fields(), "graphs": []}
        if key.to_list() not in data["graphs"]:
            data["graphs"].append(key.to_list())
        tmp = manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(manifest)
