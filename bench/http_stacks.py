"""What one streamed token costs in each async HTTP stack the OpenAI gateway could be built on.

    python -m bench.http_stacks [--events 1000] [--streams 16] [--rounds 3]

Each stack serves the same endpoint in a process of its own: a server-sent-events stream of
`--events` chat-completion chunks (the JSON the gateway sends per token), each awaited from an
async generator as the gateway awaits the gRPC stream. The client here opens `--streams` such
streams at once and reads them line by line. The figure that decides is the server process's CPU
time per event (user + system, from /proc), which other load on the machine does not inflate as
it does wall time; wall time per event is printed next to it.

Stacks: aiohttp's own server (`web.StreamResponse`), and starlette's `StreamingResponse` on
uvicorn (its pure-Python h11 parser; with `httptools` installed, that parser too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

CHUNK = {
    "id": "chatcmpl-0123456789abcdef",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "small-llama",
    "choices": [{"index": 0, "delta": {"content": " token"}, "finish_reason": None}],
}


async def _events(n: int) -> AsyncIterator[bytes]:
    for i in range(n):
        await asyncio.sleep(0)  # the gateway awaits each message of the gRPC stream
        CHUNK["choices"][0]["delta"]["content"] = f" t{i}"
        yield b"data: " + json.dumps(CHUNK, separators=(",", ":")).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


def _serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        async for event in _events(int(request.query["n"])):
            await response.write(event)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/stream", stream)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _serve_starlette(port: int, http: str) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(_events(int(request.query_params["n"])), media_type="text/event-stream")

    app = Starlette(routes=[Route("/stream", stream)])
    uvicorn.run(app, host="127.0.0.1", port=port, http=http, loop="asyncio", log_level="warning", access_log=False)


SERVERS = {
    "aiohttp": _serve_aiohttp,
    "starlette+uvicorn(h11)": lambda port: _serve_starlette(port, "h11"),
    "starlette+uvicorn(httptools)": lambda port: _serve_starlette(port, "httptools"),
}


def _stacks() -> list[str]:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return ["aiohttp", "starlette+uvicorn(h11)"]
    return list(SERVERS)


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _read_streams(port: int, *, events: int, streams: int) -> int:
    import aiohttp

    async def one(session: aiohttp.ClientSession) -> int:
        got = 0
        async with session.get(f"http://127.0.0.1:{port}/stream", params={"n": str(events)}) as response:
            async for line in response.content:
                got += line.startswith(b"data: {")
        return got

    async with aiohttp.ClientSession() as session:
        return sum(await asyncio.gather(*(one(session) for _ in range(streams))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(stack: str, *, events: int, streams: int, rounds: int) -> dict[str, Any]:
    """Start the stack's server, warm it, then time `rounds` batches of `streams` streams."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.http_stacks", "--serve", stack, "--port", str(port)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{stack} server did not start") from None
                time.sleep(0.05)
        asyncio.run(_read_streams(port, events=events, streams=streams))  # warm-up
        cpu, wall, n = [], [], 0
        for _ in range(rounds):
            c0, t0 = _cpu_s(proc.pid), time.perf_counter()
            n = asyncio.run(_read_streams(port, events=events, streams=streams))
            wall.append(time.perf_counter() - t0)
            cpu.append(_cpu_s(proc.pid) - c0)
        assert n == events * streams, f"{stack}: {n} events of {events * streams}"
        return {"stack": stack, "cpu_us_per_event": 1e6 * min(cpu) / n, "wall_us_per_event": 1e6 * min(wall) / n, "events": n}
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1000, help="events per stream")
    parser.add_argument("--streams", type=int, default=16, help="streams at once")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per stack (the best is reported)")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--serve", choices=list(SERVERS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        SERVERS[args.serve](args.port)
        return
    rows = [measure(stack, events=args.events, streams=args.streams, rounds=args.rounds) for stack in _stacks()]
    base = rows[0]["cpu_us_per_event"]
    print(f"{'stack':30s} {'server CPU us/event':>20s} {'wall us/event':>14s} {'CPU vs aiohttp':>15s}")
    for row in rows:
        print(f"{row['stack']:30s} {row['cpu_us_per_event']:20.1f} {row['wall_us_per_event']:14.1f} {row['cpu_us_per_event'] / base:14.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
