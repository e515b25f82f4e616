"""nxcore's C++ ops (`nxcore/csrc`), built once per machine and torch version, loaded at import.

`torch.utils.cpp_extension` compiles them with the same C++ toolchain AOTInductor already needs
for the compile backend, into `$NXSERVE_NATIVE_CACHE` (default `~/.cache/nxserve/native`); later
imports load the built library. Without a compiler, or with `NXSERVE_NATIVE=0`, nxcore runs the
Python paths instead (`nxcore.modules.linear`, `nxcore.modules.attention`): the same results
up to float rounding, slower.
`make setup` builds them; `native.main()` says which ops are in use and why.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(CSRC / name for name in ("linear.cpp", "attention.cpp", "graph.cpp"))
ENV_DISABLE = "NXSERVE_NATIVE"
ENV_CACHE = "NXSERVE_NATIVE_CACHE"

GEMV_MAX_ROWS = 2
"""Rows up to which bf16 linears run the C++ GEMV rather than oneDNN's packed GEMM: measured
with `python -m bench.linear` (TinyLlama shapes), the GEMV was 20-30% faster at 1 and 2 rows, and
oneDNN 20-40% faster at 3 and 4 (its blocked GEMM reuses each weight load across more rows)."""

CFLAGS = ("-O3", "-fopenmp", f"-DNXCORE_GEMV_MAX_ROWS={GEMV_MAX_ROWS}")
"""-fopenmp makes `at::parallel_for` use torch's own OpenMP pool (torch's bundled libgomp is the
one the library binds to at load)."""


def cache_dir() -> Path:
    """$NXSERVE_NATIVE_CACHE, else ~/.cache/nxserve/native."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "nxserve" / "native")


def build_dir() -> Path:
    """One folder per source text (headers included), flags and torch version, so a stale build
    is never loaded."""
    digest = hashlib.sha256()
    for source in sorted(CSRC.iterdir()):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    digest.update(" ".join(CFLAGS).encode())
    return cache_dir() / f"torch-{torch.__version__}-{digest.hexdigest()[:16]}"


@functools.cache
def load() -> str | None:
    """Build (first time) and load the ops; returns None when loaded, else why they are not."""
    if os.environ.get(ENV_DISABLE, "1") == "0":
        return f"disabled by {ENV_DISABLE}=0"
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the ninja wheel's binary, when the venv is not activated
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    directory = build_dir()
    if not any(directory.glob("*.so")):
        print(f"nxcore: building the C++ ops once into {directory} (about 30 s) ...", file=sys.stderr, flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(name="nxcore_native", sources=[str(s) for s in SOURCES], extra_cflags=list(CFLAGS),
                           extra_ldflags=["-fopenmp"], build_directory=str(directory), is_python_module=False,
                           verbose=False)
    except Exception as exc:  # no compiler or ninja, a failed build: the Python ops still work
        reason = f"could not build {', '.join(s.name for s in SOURCES)} ({type(exc).__name__}: {exc})".strip()
        log.warning("nxcore: %s; running the Python ops instead (slower in compiled graphs)", reason[:2000])
        return reason
    return None


def available() -> bool:
    return load() is None


def main() -> int:
    """Build and load the ops and print which are in use (the Python ops stand in when the build
    fails, so that is not an error here; the test suite checks the build wherever a compiler is)."""
    reason = load()
    if reason is None:
        print(f"nxcore C++ ops: loaded from {build_dir()} (bf16 GEMV up to {GEMV_MAX_ROWS} rows)")
        return 0
    print(f"nxcore C++ ops: not in use, {reason}; running the Python ops")
    return 0
