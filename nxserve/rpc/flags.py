"""Flags of every command that loads a model or runs a service, declared once.

`EngineFlags` is the engine's flags as one dataclass: each field is one `--flag` (its help and
argparse settings in the field's metadata). It adds them to a parser, reads them back, builds the
`RuntimeConfig`, and writes them back out as arguments, which is how `nxserve up` forwards every
engine flag to the services it starts. `nxserve generate`, `nxserve compile`, both services and
`nxserve up` use it; only defaults differ between them (`SERVICE_DEFAULTS`).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nxserve.rpc.security import TLSFiles
from nxserve.rpc.turns import DEFAULT_WAIT_S
from nxserve.rpc.validate import MAX_STREAM_INTERVAL

if TYPE_CHECKING:
    from nxcore import RuntimeConfig

SERVICE_DEFAULTS = {"prefill": {"batch_size": 4, "seq_len": 1024}, "decode": {"batch_size": 8, "seq_len": 1024}}
"""Engine flag defaults of each service (prefill's batch size is its context-encoding batch). The
compiled-artifact cache is keyed by the runtime config, so `nxserve compile` uses them too."""

SERVICE_GRAPHS = {"prefill": "context", "decode": "decode"}
"""The graph set (`nxcore.compiled.GRAPH_SETS`) each service's engine loads: prefill only encodes
prompts; decode fills its slots from prefill's KV and only extends them."""

ENV_COMPILE_CACHE = "NXSERVE_COMPILE_CACHE"
"""Environment variable read (by the entry points, once) for the default of --compile-cache."""


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 128,512,2048, got {text!r}") from None
    return values


def _flag(default: Any, help: str, *, unset: str = "", group: str = "engine", **argparse_kwargs: Any) -> Any:
    """A field of EngineFlags: its default, help (without the default, which `add_to` appends; `unset`
    says what a None default means) and argparse settings."""
    return dataclasses.field(default=default, metadata={"help": help, "unset": unset, "group": group, "argparse": argparse_kwargs})


@dataclass(frozen=True, kw_only=True)
class EngineFlags:
    """The engine's flags; a field `name` is the flag `--name` (underscores as dashes). None means
    the command decides (a service's default, or one fitted to the prompts for `generate`)."""

    dtype: str = _flag("auto", "weights/activations/KV dtype; auto is the checkpoint's own", choices=["auto", "float32", "bfloat16", "float16"])
    batch_size: int | None = _flag(None, "decode slots", type=int)
    ctx_batch_size: int | None = _flag(None, "prompts per context-encoding call", unset="the batch size", type=int)
    seq_len: int | None = _flag(None, "tokens per slot, prompt + output; capped at the model's max_position_embeddings", type=int)
    buckets: tuple[int, ...] | None = _flag(
        None,
        "context-encoding bucket lengths, e.g. 128,512,2048",
        unset="four per octave from 32 (eager) or two per octave from 64 (compile, xla) up to seq-len, plus seq-len",
        type=int_list,
    )
    backend: str = _flag(
        "eager",
        "graph backend: eager runs the PyTorch modules; compile runs AOTInductor-compiled graphs "
        "from the compiled-artifact cache (fill it with `nxserve compile`); xla runs them as XLA programs through "
        "torch-xla (the Neuron path: needs torch-xla, see `make xla-check`)",
        choices=["eager", "compile", "xla"],
    )
    compile_cache: str | None = _flag(
        None, "compiled-artifact cache root for --backend compile", unset=f"${ENV_COMPILE_CACHE}, else ~/.cache/nxserve/compiled", metavar="DIR"
    )
    compile_on_demand: bool = _flag(
        False, "with --backend compile, compile graphs missing from the cache at load instead of failing", action="store_true"
    )
    batch_invariant: bool = _flag(
        False,
        "compute every request as if it were alone: its tokens (seeded sampling included) are the same bits whatever "
        "the batch, the buckets or the replica, and re-encoding a sequence continues it exactly; slower prefill and batched decode "
        "(README: Batch invariance)",
        action="store_true",
    )
    max_topk: int = _flag(256, "width of the in-graph top-k candidate set", type=int)
    tp: int = _flag(1, "tensor-parallel degree: rank processes for this engine", type=int)
    ep: int = _flag(1, "expert-parallel degree for MoE models, a divisor of --tp", type=int)
    moe_capacity_factor: float | None = _flag(
        None, "MoE expert capacity factor; overflow tokens are dropped", unset="none, every token exact", type=float
    )
    threads: int | None = _flag(None, "CPU threads for torch", unset="torch's choice, usually one per core", type=int)
    speculation: str | None = _flag(
        None,
        "propose tokens by prompt lookup (ngram) or with a draft model checkpoint (draft:DIR)",
        unset="off",
        group="speculative decoding",
        metavar="ngram|draft:DIR",
    )
    speculation_length: int = _flag(4, "tokens proposed per round", group="speculative decoding", type=int)

    # ------------------------------------------------------------------ argparse

    @classmethod
    def add_to(
        cls,
        parser: argparse.ArgumentParser,
        *,
        defaults: Mapping[str, Any] | None = None,
        helps: Mapping[str, str] | None = None,
        exclude: Sequence[str] = (),
        unset: bool = False,
    ) -> None:
        """Add every flag (but `exclude`) to `parser`, in argument groups. `defaults` and `helps`
        replace a field's default and help; `unset` makes every default None, so that only flags
        given on the command line are set (for forwarding them: `to_argv`)."""
        defaults, helps = dict(defaults or {}), dict(helps or {})
        groups: dict[str, argparse._ArgumentGroup] = {}
        for f in dataclasses.fields(cls):
            if f.name in exclude:
                continue
            name = f.metadata["group"]
            group = groups[name] if name in groups else groups.setdefault(name, parser.add_argument_group(name))
            kwargs = dict(f.metadata["argparse"])
            default = defaults.get(f.name, f.default)
            help_text = helps.get(f.name, f.metadata["help"])
            if f.name not in helps and kwargs.get("action") != "store_true":
                shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
                help_text += f" (default: {shown if default is not None else f.metadata['unset'] or 'the command decides'})"
            group.add_argument(_option(f.name), dest=f.name, default=None if unset else default, help=help_text, **kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, environ: Mapping[str, str] | None = None) -> EngineFlags:
        """The flags parsed into `args` (fields the parser lacked keep their defaults); `environ`
        (the process environment, read once by the entry point) gives --compile-cache's default."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
        flags = cls(**values)
        if flags.compile_cache is None and environ and environ.get(ENV_COMPILE_CACHE):
            flags = dataclasses.replace(flags, compile_cache=environ[ENV_COMPILE_CACHE])
        return flags

    @staticmethod
    def set_in(args: argparse.Namespace) -> list[str]:
        """The engine flags given in `args` (parsed with `unset=True`) as command-line arguments."""
        argv: list[str] = []
        for f in dataclasses.fields(EngineFlags):
            value = getattr(args, f.name, None)
            if value is None or value is False:
                continue
            if value is True:
                argv.append(_option(f.name))
            elif isinstance(value, tuple):
                argv += [_option(f.name), ",".join(map(str, value))]
            else:
                argv += [_option(f.name), str(value)]
        return argv

    # ------------------------------------------------------------------ what they build

    def runtime_config(self, *, max_positions: int, batch_size: int | None = None, seq_len: int | None = None) -> RuntimeConfig:
        """The runtime config; `batch_size` and `seq_len` are the command's choice where the flags left them unset."""
        from nxcore import RuntimeConfig

        batch = self.batch_size or batch_size or 1
        return RuntimeConfig(
            batch_size=batch,
            ctx_batch_size=min(self.ctx_batch_size or batch, batch),
            seq_len=min(self.seq_len or seq_len or max_positions, max_positions),
            buckets=self.buckets or (),
            dtype=self.dtype,
            backend=self.backend,
            max_topk=self.max_topk,
            tp_degree=self.tp,
            ep_degree=self.ep,
            moe_capacity_factor=self.moe_capacity_factor,
            batch_invariant=self.batch_invariant,
        )

    def service_config(self, service: str, *, max_positions: int) -> RuntimeConfig:
        """The runtime config of `service` ("prefill" or "decode"): unset flags take
        SERVICE_DEFAULTS[service]. Prefill's slots are its context-encoding batch; decode builds
        its speculation graphs when --speculation is on."""
        defaults = SERVICE_DEFAULTS[service]
        batch = self.batch_size or defaults["batch_size"]
        if service == "prefill":
            batch = self.ctx_batch_size or batch
        config = self.runtime_config(max_positions=max_positions, batch_size=batch, seq_len=defaults["seq_len"])
        if service == "decode" and self.speculation:
            config = config.replace(speculation_length=self.speculation_length)
        return config

    def load_options(self) -> dict[str, Any]:
        """Keyword arguments of Engine.from_pretrained (and nxcore.speculation.build_proposer)."""
        from nxcore.compiled import default_cache_root

        return {"compile_cache": self.compile_cache or default_cache_root(), "compile_on_demand": self.compile_on_demand}

    def apply_threads(self) -> None:
        """torch's thread count, on the calling thread's process (call it on the engine's thread)."""
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------- server flags


def shm_dir_arg(value: str) -> Path | None:
    """--kv-shm-dir: a directory, or "none"."""
    return None if value.lower() in ("none", "") else Path(value)


def default_shm_dir() -> str:
    return "/dev/shm" if Path("/dev/shm").is_dir() else "none"


def add_kv_shm_flag(parser: argparse.ArgumentParser, *, role: str) -> None:
    default = default_shm_dir()
    parser.add_argument(
        "--kv-shm-dir",
        type=shm_dir_arg,
        default=shm_dir_arg(default),
        metavar="DIR|none",
        help=f"shared-memory directory for KV hand-off on one host: {role}; used only where prefill and "
        f"decode see the same directory, chunks over gRPC otherwise. In Kubernetes, mount one emptyDir "
        f"(medium: Memory) into both containers of a pod. none: chunks only (default: {default})",
    )


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number such as 2048, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is invalid: allowed a positive whole number")
    return value


def stream_interval(text: str) -> int:
    """--stream-interval: 1..MAX_STREAM_INTERVAL."""
    value = positive_int(text)
    if value > MAX_STREAM_INTERVAL:
        raise argparse.ArgumentTypeError(f"{text} is invalid: allowed 1..{MAX_STREAM_INTERVAL}")
    return value


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds such as 0.5, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is invalid: allowed a positive number of seconds")
    return value


def add_core_turns_flag(parser: argparse.ArgumentParser, *, role: str) -> None:
    parser.add_argument(
        "--core-turns",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"take turns computing with the other engine processes given the same FILE ({role}), for "
        "services that share their host's cores: each then computes alone on all of them instead of "
        "its OpenMP threads contending with the others' (see nxserve.rpc.turns). `nxserve up` sets it "
        "when its services' threads outnumber the cores. Default: none, for a service with cores of its own",
    )
    parser.add_argument(
        "--core-turns-wait-s",
        type=positive_seconds,
        default=DEFAULT_WAIT_S,
        metavar="S",
        help="with --core-turns: seconds a turn is waited for before computing without it, so a process "
        f"that stopped while holding the cores (SIGSTOP, a debugger) or one very long context encoding "
        f"cannot stall this one (default: {DEFAULT_WAIT_S:g})",
    )


def add_server_flags(parser: argparse.ArgumentParser, *, port: int, max_queue: int, queue_help: str, max_streams: int, client_ca_help: str) -> None:
    """--host --port --max-queue --grace --log-level, TLS and stream limits, shared by both services."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=port, help=f"port to listen on (default: {port})")
    parser.add_argument(
        "--health-port",
        type=int,
        default=None,
        metavar="PORT",
        help="also answer grpc.health.v1 alone, in plaintext, on this port: for Kubernetes' gRPC probes, which cannot speak "
        "TLS, when the service port serves TLS (default: none; health is on --port)",
    )
    parser.add_argument("--max-queue", type=int, default=max_queue, help=f"{queue_help}; past it RESOURCE_EXHAUSTED (default: {max_queue})")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds running requests get to finish on SIGTERM (default: 10)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level (default: INFO)")
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="stderr log lines: text, or JSON objects with request, trace and span ids (default: text)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (default: none; OTLP metrics follow OTEL_*)",
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the model's name in ModelInfo, traces and metrics (default: the checkpoint folder's name)",
    )
    parser.add_argument(
        "--max-concurrent-streams",
        type=int,
        default=max_streams,
        metavar="N",
        help=f"calls in flight per client connection (HTTP/2 streams); more wait for one to end (default: {max_streams})",
    )
    g = parser.add_argument_group("TLS (files are read again when they change: rotated certificates apply to new connections)")
    g.add_argument("--tls-cert", type=Path, default=None, metavar="FILE", help="serve TLS with this certificate chain (PEM); needs --tls-key")
    g.add_argument("--tls-key", type=Path, default=None, metavar="FILE", help="the private key of --tls-cert (PEM)")
    g.add_argument("--tls-client-ca", type=Path, default=None, metavar="FILE", help=client_ca_help)


def tls_files(args: argparse.Namespace) -> TLSFiles | None:
    """The server's TLS files from --tls-cert/--tls-key/--tls-client-ca (None: plaintext)."""
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key: client certificates are checked over TLS")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    return TLSFiles(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca)
