"""The engine: a loaded model, its static KV cache and its three graphs, behind a few methods.

Services and the generate loop talk only to this object: `context_encode`, `token_generate`,
`speculate`, `export_kv`, `import_kv`, `free`. Each call validates its requests against the
compiled shapes, pads them into one graph call and returns plain Python token ids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nxcore import native, xla
from nxcore.compiled import GRAPH_SETS, ArtifactKey, ArtifactStore, check_graph_set, default_cache_root, graph_keys
from nxcore.config import DTYPES, RuntimeConfig
from nxcore.errors import EngineError
from nxcore.executor import Executor, LocalExecutor
from nxcore.graphs import GraphInputs, GraphKey, GraphKind
from nxcore.kv_cache import KVSnapshot
from nxcore.loader import load_rank, read_model_config, resolve_config
from nxcore.model_config import ModelConfig
from nxcore.modules.decoder import CausalLM
from nxcore.sampling import RequestRng, SamplingParams, sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequenceRequest:
    """Tokens to run for one slot: a whole prompt (context encoding), one token (token generation)
    or k proposed tokens (speculation)."""

    slot: int
    token_ids: Sequence[int]
    sampling: SamplingParams
    rng: RequestRng


class Engine:
    """A loaded model, its static KV cache and its graphs, served through a few calls.

    `context_encode`, `token_generate` and `speculate` take one `SequenceRequest` per slot, check
    them against the shapes the engine was built for (EngineError names the value and the limit),
    pad them into one graph call and return plain token ids; `export_kv`/`import_kv` move a slot's
    KV to another engine; `free` gives a slot back. Load one with `from_pretrained`. Not
    thread-safe: drive it from one thread (see nxcore.engine_thread)."""

    def __init__(self, *, executor: Executor, model_config: ModelConfig, config: RuntimeConfig, fingerprint: str, graphs: str = "all") -> None:
        self.executor = executor
        self.model_config = model_config
        self.config = config
        self.fingerprint = fingerprint
        self.graphs = check_graph_set(graphs)
        """The graph set this engine loaded (`nxcore.compiled.GRAPH_SETS`): the calls it serves."""
        self.slot_lengths: list[int | None] = [None] * config.batch_size
        """Tokens held by each slot's cache, None for a slot with no sequence."""
        self._positions: dict[int, torch.Tensor] = {}

    @property
    def model(self) -> CausalLM:
        """The in-process model (TP=1 only; under TP each rank process holds its slice)."""
        if not isinstance(self.executor, LocalExecutor):
            raise AttributeError(f"the model lives in {self.config.tp_degree} TP rank processes, not in this one")
        return self.executor.model

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        config: RuntimeConfig | None = None,
        *,
        saved_config: str | Path | None = None,
        compile_cache: str | Path | None = None,
        compile_on_demand: bool = False,
        graphs: str = "all",
    ) -> Engine:
        """Load an HF checkpoint directory into an engine built for `config` (TP ranks started as needed).

        `saved_config` is the JSON RuntimeConfig that artifacts were built for; any difference
        (TP degree, shapes, dtype) is an error rather than a silent rebuild.

        On the compile backend the graphs come from the artifact cache under `compile_cache`
        (default: `nxcore.compiled.default_cache_root()`), keyed by this model's fingerprint, the
        config and the torch version. Missing artifacts are an `ArtifactError` unless
        `compile_on_demand`, which compiles them (once; later loads reuse them).
        """
        start = time.perf_counter()
        native.load()  # nxcore's C++ ops, built the first time (see nxcore.native)
        model_config = read_model_config(model_dir)
        config = resolve_config(model_config, config or RuntimeConfig())
        if saved_config is not None:
            config.check_matches(RuntimeConfig.load(saved_config), what=str(saved_config))
        if config.backend in ("compile", "xla") and config.tp_degree > 1:
            raise EngineError(f"the {config.backend} backend runs tp_degree=1 only (asked: {config.tp_degree}); use --backend eager with TP")
        if config.backend == "xla":
            xla.require()  # before reading weights: says how to get torch-xla where it is missing
        if config.tp_degree == 1:
            model, fingerprint = load_rank(model_dir, model_config, config)
            store = None
            if config.backend == "compile":
                store = ArtifactStore(compile_cache or default_cache_root(), ArtifactKey(fingerprint, config), compile_on_demand=compile_on_demand)
            if config.backend == "xla":
                executor: Executor = xla.XlaExecutor(model, config, graphs)
            else:
                executor = LocalExecutor(model, config, store, graphs)
        else:
            from nxcore.parallel.executor import TPExecutor

            tp = TPExecutor(model_dir, model_config, config)
            executor, fingerprint = tp, tp.fingerprint
        engine = cls(executor=executor, model_config=model_config, config=config, fingerprint=fingerprint, graphs=graphs)
        log.info(
            "loaded %s (%s, %s, TP=%d) in %.2fs: %d slots, seq_len %d, buckets %s",
            model_dir,
            model_config.model_type,
            config.dtype,
            config.tp_degree,
            time.perf_counter() - start,
            config.batch_size,
            config.seq_len,
            list(config.buckets),
        )
        return engine

    def close(self) -> None:
        """Stop TP rank processes (nothing to do at TP=1)."""
        self.executor.close()

    def missing_graphs(self) -> list[GraphKey]:
        """Graphs this engine can call that its compiled-artifact store lacks (compile backend)."""
        return self.artifacts.missing(graph_keys(self.config, self.graphs))

    def compile_graph(self, key: GraphKey) -> None:
        """Compile one graph into the artifact store (see `missing_graphs`)."""
        self.artifacts  # noqa: B018 (raises on the eager backend)
        self.executor.compile(key)

    @property
    def artifacts(self) -> ArtifactStore:
        """The compiled-artifact store this engine's graphs come from (compile backend)."""
        store = self.executor.store
        if store is None:
            raise EngineError(f"backend {self.config.backend!r} has no compiled artifacts: use --backend compile")
        return store

    # ---------------------------------------------------------------- graph calls

    @torch.no_grad()
    def context_encode(self, requests: Sequence[SequenceRequest]) -> list[int]:
        """Encode prompts into their (free) slots; returns the first generated token of each."""
        cfg = self.config
        if not 1 <= len(requests) <= cfg.ctx_batch_size:
            raise EngineError(f"{len(requests)} prompts in one context-encoding call: allowed 1..ctx_batch_size ({cfg.ctx_batch_size})")
        self._check_slots(requests)
        for r in requests:
            if self.slot_lengths[r.slot] is not None:
                raise EngineError(f"slot {r.slot} already holds a sequence of {self.slot_lengths[r.slot]} tokens: free it first")
            self._check_request(r)
            if len(r.token_ids) > cfg.max_prompt_len:
                raise EngineError(
                    f"prompt of {len(r.token_ids)} tokens is longer than the largest context bucket ({cfg.max_prompt_len}): "
                    f"shorten it or serve with a larger --seq-len"
                )
        longest = max(len(r.token_ids) for r in requests)
        bucket = _fit(longest, cfg.buckets)
        rows = _fit(len(requests), cfg.ctx_batch_buckets)
        inputs = self._inputs(requests, rows=rows, width=bucket, prefill=True)
        outputs = self._run(GraphKey(GraphKind.CONTEXT, rows, bucket, bucket), inputs)
        tokens = self._tokens(outputs, inputs, rows=len(requests))
        for r in requests:
            self.slot_lengths[r.slot] = len(r.token_ids)
        return tokens[:, 0].tolist()

    @torch.no_grad()
    def token_generate(self, requests: Sequence[SequenceRequest]) -> list[int]:
        """Append one token to each request's slot; returns the next token of each."""
        if any(len(r.token_ids) != 1 for r in requests):
            raise EngineError("token generation takes exactly one token per request")
        return [t[0] for t in self._decode(requests, width=1, kind=GraphKind.TOKEN_GENERATION)]

    @torch.no_grad()
    def speculate(self, requests: Sequence[SequenceRequest]) -> list[list[int]]:
        """Score the last token plus k = speculation_length proposed tokens per slot in one pass
        (they are appended to the cache); returns, for each of the k + 1 inputs, the token the
        model samples after it."""
        return self._decode(requests, width=self._speculation_width(requests), kind=GraphKind.SPECULATION)

    @torch.no_grad()
    def speculate_logits(self, requests: Sequence[SequenceRequest]) -> torch.Tensor:
        """As `speculate`, but returns float32 logits [n, k + 1, vocab] for host-side acceptance."""
        return self._decode(requests, width=self._speculation_width(requests), kind=GraphKind.SCORING, logits=True)

    @torch.no_grad()
    def token_generate_logits(self, requests: Sequence[SequenceRequest]) -> torch.Tensor:
        """As `token_generate`, but returns float32 logits [n, vocab] of the next token."""
        if any(len(r.token_ids) != 1 for r in requests):
            raise EngineError("token generation takes exactly one token per request")
        return self._decode(requests, width=1, kind=GraphKind.SCORING, logits=True)[:, 0]

    def truncate(self, slot: int, n_tokens: int) -> None:
        """Keep only the slot's first n_tokens (after a partial speculation acceptance); later
        cache entries are masked until overwritten."""
        length = self.slot_lengths[slot]
        if length is None or not 1 <= n_tokens <= length:
            raise EngineError(f"cannot truncate slot {slot} holding {length or 0} tokens to {n_tokens}")
        self.slot_lengths[slot] = n_tokens

    def _speculation_width(self, requests: Sequence[SequenceRequest]) -> int:
        k = self.config.speculation_length
        if k == 0:
            raise EngineError("speculation_length is 0: build the engine with speculation_length >= 1")
        if any(len(r.token_ids) != k + 1 for r in requests):
            raise EngineError(f"speculation takes the last token plus speculation_length={k} proposals per request")
        return k + 1

    def _decode(self, requests: Sequence[SequenceRequest], *, width: int, kind: GraphKind, logits: bool = False):
        cfg = self.config
        if not requests:
            return []
        self._check_slots(requests)
        for r in requests:
            length = self.slot_lengths[r.slot]
            if length is None:
                raise EngineError(f"{kind} on slot {r.slot}, which had no context encoding: encode a prompt into it first")
            if length + width > cfg.seq_len:
                raise EngineError(f"slot {r.slot} holds {length} tokens; {width} more exceed seq_len ({cfg.seq_len})")
            self._check_request(r)
        rows = _fit(len(requests), cfg.batch_buckets)
        inputs = self._inputs(requests, rows=rows, width=width, prefill=False)
        outputs = self._run(GraphKey(kind, rows, width, inputs.key_positions.shape[0]), inputs)
        for r in requests:
            self.slot_lengths[r.slot] = self.length(r.slot) + width
        if logits:
            return outputs[1][: len(requests)]
        return self._tokens(outputs, inputs, rows=len(requests)).tolist()

    def _run(self, key: GraphKey, inputs: GraphInputs) -> tuple[torch.Tensor, ...]:
        """Run the graph for this shape, built on first use."""
        if key.kind not in GRAPH_SETS[self.graphs]:
            sets = " or ".join(repr(name) for name, kinds in GRAPH_SETS.items() if key.kind in kinds)
            raise EngineError(
                f"this engine was loaded with the {self.graphs!r} graph set, which has no {key.kind} graphs: load it with graphs={sets} to call them"
            )
        return self.executor.run(key, inputs)

    def _tokens(self, outputs: tuple[torch.Tensor, ...], inputs: GraphInputs, *, rows: int) -> torch.Tensor:
        """[rows, T] tokens of the real rows; samples on the host when the graph returned logits."""
        if self.config.on_device_sampling:
            tokens = outputs[0]
        else:
            logits = outputs[1].reshape(-1, outputs[1].shape[-1])
            per_row = logits.shape[0] // inputs.temperature.shape[0]
            tokens = sample(
                logits,
                temperature=inputs.temperature.repeat_interleave(per_row),
                top_k=inputs.top_k.repeat_interleave(per_row),
                top_p=inputs.top_p.repeat_interleave(per_row),
                rand=inputs.rand.reshape(-1),
                max_topk=self.config.max_topk,
            ).view(inputs.temperature.shape[0], per_row)
        return tokens.reshape(tokens.shape[0], -1)[:rows]

    def _inputs(self, requests: Sequence[SequenceRequest], *, rows: int, width: int, prefill: bool) -> GraphInputs:
        """Pad requests into `rows` x `width` graph inputs; padding rows use the scratch slot.

        Built from Python lists with one tensor per input (per-element tensor writes cost ~1 ms
        a step at 32 rows)."""
        pad = rows - len(requests)
        ids = [[*r.token_ids, *[0] * (width - len(r.token_ids))] for r in requests] + [[0] * width] * pad
        starts = [0 if prefill else self.length(r.slot) for r in requests] + [0] * pad
        draws = 1 if prefill else width
        rand = torch.zeros(rows, draws, dtype=torch.float32)
        if requests:
            rand[: len(requests)] = torch.stack([r.rng.draw(draws) for r in requests])
        needed = width if prefill else max(self.length(r.slot) for r in requests) + width
        kv_len = width if prefill else _fit(needed, self.config.kv_buckets)
        return GraphInputs(
            input_ids=torch.tensor(ids, dtype=torch.int64),
            position_ids=torch.tensor(starts, dtype=torch.int64)[:, None] + torch.arange(width, dtype=torch.int64),
            slot_ids=torch.tensor([r.slot for r in requests] + [self.executor.scratch_slot] * pad, dtype=torch.int64),
            last_index=torch.tensor([len(r.token_ids) - 1 for r in requests] + [0] * pad, dtype=torch.int64),
            temperature=torch.tensor([r.sampling.temperature for r in requests] + [0.0] * pad, dtype=torch.float32),
            top_k=torch.tensor([r.sampling.top_k for r in requests] + [0] * pad, dtype=torch.int64),
            top_p=torch.tensor([r.sampling.top_p for r in requests] + [1.0] * pad, dtype=torch.float32),
            rand=rand,
            key_positions=self._key_positions(kv_len),
        )

    def _key_positions(self, kv_len: int) -> torch.Tensor:
        """0..kv_len-1, built once per KV bucket: no per-step host work that grows with the sequence."""
        cached = self._positions.get(kv_len)
        if cached is None:
            cached = self._positions[kv_len] = torch.arange(kv_len, dtype=torch.int64)
        return cached

    def _check_slots(self, requests: Sequence[SequenceRequest]) -> None:
        slots = [r.slot for r in requests]
        bad = [s for s in slots if not 0 <= s < self.config.batch_size]
        if bad:
            raise EngineError(f"slot ids {bad} out of range: allowed 0..{self.config.batch_size - 1} (batch_size)")
        if len(set(slots)) != len(slots):
            raise EngineError(f"slot ids {slots} repeat a slot within one call")

    def _check_request(self, r: SequenceRequest) -> None:
        if not r.token_ids:
            raise EngineError(f"slot {r.slot}: no tokens given")
        vocab = self.model_config.vocab_size
        bad = [t for t in r.token_ids if not 0 <= t < vocab]
        if bad:
            raise EngineError(f"token ids {bad[:8]} out of range: allowed 0..{vocab - 1} (vocab_size)")
        try:
            r.sampling.validate(max_topk=self.config.max_topk)
        except ValueError as exc:
            raise EngineError(str(exc)) from exc

    # ---------------------------------------------------------------- slots and KV hand-off

    def bucket_for(self, n_tokens: int) -> int:
        """The context-encoding bucket a prompt of `n_tokens` runs in (EngineError past the largest)."""
        if not 1 <= n_tokens <= self.config.max_prompt_len:
            raise EngineError(f"prompt of {n_tokens} tokens: allowed 1..{self.config.max_prompt_len} (the largest context bucket)")
        return _fit(n_tokens, self.config.buckets)

    def length(self, slot: int) -> int:
        """Tokens the slot's cache holds; EngineError when it holds no sequence."""
        length = self.slot_lengths[slot]
        if length is None:
            raise EngineError(f"slot {slot} holds no sequence: encode a prompt into it or import its KV first")
        return length

    def free_slots(self) -> list[int]:
        return [i for i, n in enumerate(self.slot_lengths) if n is None]

    def free(self, slot: int) -> None:
        self.slot_lengths[slot] = None

    def export_kv(self, slot: int, n_tokens: int, out: KVSnapshot | None = None) -> KVSnapshot:
        """The slot's first n_tokens of KV for every layer, as plain tensors: new ones, or `out`'s
        (contiguous, `[num_layers, num_kv_heads, n_tokens, head_dim]` in the cache's dtype), which
        are written in place and returned."""
        length = self.slot_lengths[slot]
        if length is None or not 1 <= n_tokens <= length:
            raise EngineError(f"cannot export {n_tokens} tokens from slot {slot}, which holds {length or 0}")
        if out is not None:
            cfg = self.model_config
            expected = (cfg.num_layers, cfg.num_kv_heads, n_tokens, cfg.head_dim)
            dtype = DTYPES[self.config.dtype]
            for name, t in (("keys", out.keys), ("values", out.values)):
                if tuple(t.shape) != expected or t.dtype != dtype or not t.is_contiguous():
                    raise EngineError(
                        f"cannot export into {name} of shape {tuple(t.shape)} and dtype {t.dtype}"
                        f"{'' if t.is_contiguous() else ' (not contiguous)'}: expected a contiguous {expected} {dtype}"
                    )
        return self.executor.export_kv(slot, n_tokens, out)

    def import_kv(self, slot: int, kv: KVSnapshot) -> None:
        """Write a snapshot (from this or another engine of the same model) into a free slot."""
        if self.slot_lengths[slot] is not None:
            raise EngineError(f"slot {slot} already holds a sequence: free it first")
        cfg = self.model_config
        expected = (cfg.num_layers, cfg.num_kv_heads, kv.n_tokens, cfg.head_dim)
        if tuple(kv.keys.shape) != expected or tuple(kv.values.shape) != expected:
            raise EngineError(f"KV snapshot of shape {tuple(kv.keys.shape)} does not match this model: expected {expected}")
        if kv.n_tokens > self.config.seq_len:
            raise EngineError(f"KV snapshot of {kv.n_tokens} tokens exceeds seq_len ({self.config.seq_len})")
        self.executor.import_kv(slot, kv)
        self.slot_lengths[slot] = kv.n_tokens

    # ---------------------------------------------------------------- reference helpers

    def prompt_logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """float32 logits [T, vocab] at every prompt position (eager, scratch slot): for checks."""
        return self.executor.prompt_logits(token_ids)


def _fit(n: int, sizes: Sequence[int]) -> int:
    """The smallest size that holds n."""
    return next(size for size in sizes if size >= n)
