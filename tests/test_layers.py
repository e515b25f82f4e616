"""The import graph keeps its layers (ARCHITECTURE.md, Packages): nxcore never imports grpc or
anything above it; nxserve's bottom layer (rpc, kv, the stubs) never imports the services or the
top layer; the services import neither each other nor the top layer; the top layer reaches the
services only through their entry points. Every import counts, also those inside functions."""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BOTTOM = ("nxserve.rpc", "nxserve.kv", "nxserve.v1")
TOP = ("nxserve.cli", "nxserve.commands", "nxserve.client", "nxserve.cluster", "nxserve.testing", "nxserve.omp_env", "nxserve.pki", "nxserve.openai")
SERVICES = ("prefill_svc", "decode_svc")
ENTRY_POINTS = ("prefill_svc.__main__", "decode_svc.__main__")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _under(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


@functools.cache
def _graph() -> dict[str, set[str]]:
    sources = [p for package in ("nxcore", "nxserve", *SERVICES) for p in (ROOT / package).rglob("*.py")]
    return {_module(p): set(_imports(p)) for p in sources}


def _violations(module: str, imports: set[str]) -> list[str]:
    bad: list[str] = []
    if _under(module, ("nxcore",)):
        bad += [i for i in imports if _under(i, ("grpc", "nxserve", *SERVICES, "bench"))]
    elif _under(module, BOTTOM):
        bad += [i for i in imports if _under(i, (*TOP, *SERVICES, "bench"))]
    elif _under(module, SERVICES):
        other = [s for s in SERVICES if not _under(module, (s,))]
        bad += [i for i in imports if _under(i, (*TOP, *other, "bench"))]
    elif _under(module, TOP):
        bad += [i for i in imports if _under(i, SERVICES) and not _under(i, ENTRY_POINTS)]
    return bad


def test_every_module_is_in_a_layer() -> None:
    unplaced = [
        m
        for m in _graph()
        if not _under(m, ("nxcore", "nxserve", *SERVICES)) or (_under(m, ("nxserve",)) and m != "nxserve" and not _under(m, (*BOTTOM, *TOP)))
    ]
    assert unplaced == []


@pytest.mark.parametrize("module", sorted(_graph()))
def test_imports_respect_the_layers(module: str) -> None:
    assert _violations(module, _graph()[module]) == []


def test_the_check_catches_a_violation() -> None:
    assert _violations("nxcore.engine", {"grpc"}) == ["grpc"]
    assert _violations("nxserve.kv.transfer", {"prefill_svc.worker"}) == ["prefill_svc.worker"]
    assert sorted(_violations("decode_svc.loop", {"prefill_svc.router", "nxserve.cluster"})) == ["nxserve.cluster", "prefill_svc.router"]
    assert _violations("nxserve.commands.serving", {"prefill_svc.__main__", "prefill_svc.server"}) == ["prefill_svc.server"]
