"""Pieces every `nxserve` command shares: prompt and sampling flags, error reporting."""

from __future__ import annotations

import argparse
import sys

import grpc


def token_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids such as 1,2,3, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


class AppendPrompt(argparse.Action):
    """Collect --prompt and --prompt-ids in command-line order as ("text", str) / ("ids", list)."""

    def __call__(self, parser, namespace, values, option_string=None):
        kind = "ids" if option_string == "--prompt-ids" else "text"
        prompts = list(getattr(namespace, self.dest) or [])
        prompts.append((kind, values))
        setattr(namespace, self.dest, prompts)


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling and stopping")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most (default: 32)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all candidates (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1] (default: 1)")
    g.add_argument("--seed", type=int, default=None, help="random seed per request (default: random)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    g.add_argument("--stop-token-ids", type=token_ids, default=[], help="comma-separated token ids that end a request")


def rpc_failed(command: str, exc: grpc.RpcError) -> int:
    """Report a failed gRPC call (grpc.RpcError) as `nxserve COMMAND: error: CODE: details`."""
    print(f"nxserve {command}: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 2
