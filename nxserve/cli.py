"""The `nxserve` command line.

    nxserve make-model --arch llama --preset tiny --out DIR     # a random-weight HF checkpoint
    nxserve generate --model DIR --prompt "Hello" [--json]       # in-process generation
    nxserve compile --model DIR [engine flags]                  # fill the compiled-graph cache
    nxserve up --model DIR [--decode-replicas N]                # prefill + decode services locally
    nxserve prefill|decode --model DIR ...                       # one service (python -m prefill_svc|decode_svc)
    nxserve client --target HOST:PORT --prompt "Hello"           # generate through a running server
    nxserve openai --target HOST:PORT --port 8000                # OpenAI-compatible HTTP API over the gRPC one
    nxserve demo                                                 # what `make run` shows
    nxserve bench engine|serve ...                               # benchmarks (bench/): in-process, or a server under load

Each command lives in nxserve/commands/; this module builds the parser and reports errors.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from nxserve.commands.bench import add_bench
from nxserve.commands.local import add_compile, add_generate, add_make_model
from nxserve.commands.serving import add_client, add_demo, add_openai, add_up


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nxserve",
        description="nxserve: LLM serving on nxcore, a static-shape three-graph decoder engine.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_make_model(sub)
    add_generate(sub)
    add_compile(sub)
    add_up(sub)
    add_client(sub)
    add_openai(sub)
    add_demo(sub)
    add_bench(sub)
    for name, what in SERVICES.items():
        sub.add_parser(name, add_help=False, help=f"run the {what} (`nxserve {name} --help` lists its flags)")
    return parser


SERVICES = {"prefill": "prefill service (the public Generation API)", "decode": "decode service (one replica)"}
"""Commands that run a service: their arguments go to the service's own parser (the container image's entrypoint is `nxserve`)."""


def run_service_command(name: str, argv: Sequence[str]) -> int:
    if name == "prefill":
        from prefill_svc.__main__ import main as prefill_main

        return prefill_main(list(argv), prog="nxserve prefill")
    from decode_svc.__main__ import main as decode_main

    return decode_main(list(argv), prog="nxserve decode")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SERVICES:
        return run_service_command(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from nxcore import native
    from nxcore.errors import EngineError

    native.configure_from(os.environ)  # the one place the command line reads NXSERVE_NATIVE*

    try:
        return args.func(args)
    except (EngineError, ValueError, FileNotFoundError) as exc:
        print(f"nxserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
