"""Engine flags shared by every command that loads a model, and the RuntimeConfig they build."""

from __future__ import annotations

import argparse

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nxcore import RuntimeConfig

SERVICE_DEFAULTS = {"prefill": {"batch_size": 4, "seq_len": 1024}, "decode": {"batch_size": 8, "seq_len": 1024}}
"""Engine flag defaults of each service (prefill's batch size is its context-encoding batch). The
compiled-artifact cache is keyed by the runtime config, so `nxserve compile` uses them too."""

SERVICE_GRAPHS = {"prefill": "context", "decode": "decode"}
"""The graph set (`nxcore.compiled.GRAPH_SETS`) each service's engine loads: prefill only encodes
prompts; decode fills its slots from prefill's KV and only extends them."""


def add_engine_flags(parser: argparse.ArgumentParser, *, batch_size: int | None, seq_len: int | None,
                     batch_help: str | None = None, seq_help: str | None = None) -> None:
    """--dtype --batch-size --ctx-batch-size --seq-len --backend --max-topk; None defaults are decided by the command."""
    g = parser.add_argument_group("engine")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights/activations/KV dtype (default: the checkpoint's own)")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help=batch_help or f"decode slots (default: {batch_size if batch_size else 'the number of prompts'})")
    g.add_argument("--ctx-batch-size", type=int, default=None, help="prompts per context-encoding call (default: batch size)")
    g.add_argument("--seq-len", type=int, default=seq_len,
                   help=seq_help or f"tokens per slot, prompt + output (default: {seq_len if seq_len else 'fits the longest prompt plus --max-new-tokens'}; "
                        "capped at the model's max_position_embeddings)")
    g.add_argument("--buckets", type=lambda s: tuple(int(x) for x in s.split(",")), default=(),
                   help="context-encoding bucket lengths, e.g. 128,512,2048 (default: powers of two from 128 to seq-len, plus seq-len)")
    g.add_argument("--backend", choices=["eager", "compile"], default="eager",
                   help="graph backend: eager runs the PyTorch modules; compile runs AOTInductor-compiled graphs from "
                        "the compiled-artifact cache (fill it with `nxserve compile`) (default: eager)")
    g.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="compiled-artifact cache root for --backend compile "
                        "(default: $NXSERVE_COMPILE_CACHE, else ~/.cache/nxserve/compiled)")
    g.add_argument("--compile-on-demand", action="store_true",
                   help="with --backend compile, compile graphs missing from the cache at load instead of failing")
    g.add_argument("--max-topk", type=int, default=256, help="width of the in-graph top-k candidate set (default: 256)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: rank processes for this engine (default: 1)")
    g.add_argument("--ep", type=int, default=1, help="expert-parallel degree for MoE models, a divisor of --tp (default: 1)")
    g.add_argument("--moe-capacity-factor", type=float, default=None,
                   help="MoE expert capacity factor; overflow tokens are dropped (default: none, every token exact)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice, usually one per core)")


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def load_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of Engine.from_pretrained that come from the engine flags."""
    return {"compile_cache": args.compile_cache, "compile_on_demand": args.compile_on_demand}


def service_config(args: argparse.Namespace, service: str, *, max_positions: int) -> RuntimeConfig:
    """The runtime config `service` ("prefill" or "decode") builds from its engine flags; unset ones
    take SERVICE_DEFAULTS[service]. Prefill's slots are its context-encoding batch."""
    defaults = SERVICE_DEFAULTS[service]
    batch = args.batch_size or defaults["batch_size"]
    if service == "prefill":
        batch = args.ctx_batch_size or batch
    return config_from_args(args, max_positions=max_positions, batch_size=batch, seq_len=args.seq_len or defaults["seq_len"])


def config_from_args(args: argparse.Namespace, *, max_positions: int, batch_size: int | None = None,
                     seq_len: int | None = None) -> RuntimeConfig:
    from nxcore import RuntimeConfig

    batch = batch_size or args.batch_size or 1
    return RuntimeConfig(
        batch_size=batch,
        ctx_batch_size=min(args.ctx_batch_size or batch, batch),
        seq_len=min(seq_len or args.seq_len, max_positions),
        buckets=args.buckets,
        dtype=args.dtype,
        backend=args.backend,
        max_topk=args.max_topk,
        tp_degree=args.tp,
        ep_degree=args.ep,
        moe_capacity_factor=args.moe_capacity_factor,
    )


def add_speculation_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("speculative decoding")
    g.add_argument("--speculation", default=None, metavar="ngram|draft:DIR",
                   help="propose tokens by prompt lookup (ngram) or with a draft model checkpoint (draft:DIR); default: off")
    g.add_argument("--speculation-length", type=int, default=4, help="tokens proposed per round (default: 4)")


def build_proposer(spec: str | None, engine, *, draft_only: bool = False, **load_kwargs):  # noqa: ANN001, ANN003, ANN201
    """The proposer `--speculation` names for `engine` (None when off); `draft_only` skips n-gram
    (prefill has nothing to do for it) and loads only the draft's context-encoding graphs.
    `load_kwargs` go to the draft's Engine.from_pretrained."""
    if not spec:
        return None
    from nxcore import Engine
    from nxcore.speculation import DraftProposer, NgramProposer

    k = engine.config.speculation_length
    if spec == "ngram":
        return None if draft_only else NgramProposer(k)
    if spec.startswith("draft:"):
        # Off prefill the draft encodes prompts itself when prefill sent no draft KV: all its graphs.
        draft = Engine.from_pretrained(spec.removeprefix("draft:"), engine.config.replace(tp_degree=1, ep_degree=1),
                                       graphs="context" if draft_only else "all", **load_kwargs)
        return DraftProposer(draft, k, target_vocab=engine.model_config.vocab_size)
    raise ValueError(f"--speculation {spec!r} is invalid: use ngram or draft:DIR")
