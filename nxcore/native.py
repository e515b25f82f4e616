"""nxcore's C++ ops (`nxcore/csrc`), built once per machine and torch version, loaded on first use.

`torch.utils.cpp_extension` compiles them with the same C++ toolchain AOTInductor already needs
for the compile backend, into a cache folder (default `~/.cache/nxserve/native`); later loads use
the built library. Without a compiler, or when disabled, nxcore runs the Python paths instead
(`nxcore.modules.linear`, `nxcore.modules.attention`): the same results up to float rounding,
slower.

Nothing happens at import. `load()` builds or loads them, the first time an engine is loaded (or
a module calls `available()`), and runs the hooks modules registered with `on_load` (they define
the Python fallback ops, or the C++ ops' shape functions). Entry points read the environment once
and pass it on (`configure_from`): NXSERVE_NATIVE=0 disables the ops, NXSERVE_NATIVE_CACHE moves
the cache. `make setup` builds them; `main()` says which ops are in use and why.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(
    CSRC / name for name in ("linear.cpp", "amx_linear.cpp", "invariant.cpp", "attention.cpp", "prefill_attention.cpp", "fused.cpp", "graph.cpp")
)
ENV_DISABLE = "NXSERVE_NATIVE"
ENV_CACHE = "NXSERVE_NATIVE_CACHE"

GEMV_MAX_ROWS = 2
"""Rows up to which bf16 linears may run the C++ GEMV rather than oneDNN's packed GEMM: measured
with `python -m bench.linear` (TinyLlama shapes) on AMD EPYC, the GEMV was 20-30% faster at 1 and
2 rows, and oneDNN 20-40% faster at 3 and 4 (its blocked GEMM reuses each weight load across more
rows). On Intel Xeon oneDNN was faster at 1 and 2 rows too: the GEMV runs on AMD CPUs only
(`torch.ops.nxcore._gemv_rows()` says what runs here; see nxcore/csrc/linear.cpp)."""

CFLAGS = ("-O3", "-fopenmp", f"-DNXCORE_GEMV_MAX_ROWS={GEMV_MAX_ROWS}")
"""-fopenmp makes `at::parallel_for` use torch's own OpenMP pool (torch's bundled libgomp is the
one the library binds to at load)."""


@dataclass(frozen=True)
class Settings:
    enabled: bool = True
    """False: the Python paths, without trying to build."""
    cache: Path | None = None
    """Where builds go (None: ~/.cache/nxserve/native)."""


_settings = Settings()
_UNLOADED = object()
_status: object = _UNLOADED
"""None once the ops are loaded, else why not (a string); _UNLOADED before `load`."""
_hooks: list[Callable[[bool], None]] = []


def configure(settings: Settings) -> None:
    """Choose how `load` behaves; before the first load (the TP ranks get the parent's settings)."""
    global _settings
    if _status is not _UNLOADED and settings != _settings:
        raise RuntimeError(f"nxcore's C++ ops were already loaded with {_settings}: configure them before the first engine")
    _settings = settings


def configure_from(environ: Mapping[str, str]) -> Settings:
    """`configure` from an entry point's environment (NXSERVE_NATIVE, NXSERVE_NATIVE_CACHE)."""
    cache = environ.get(ENV_CACHE)
    settings = Settings(enabled=environ.get(ENV_DISABLE, "1") != "0", cache=Path(cache) if cache else None)
    configure(settings)
    return settings


def settings() -> Settings:
    return _settings


def cache_dir() -> Path:
    return _settings.cache or Path.home() / ".cache" / "nxserve" / "native"


def build_dir() -> Path:
    """One folder per source text (headers included), flags and torch version, so a stale build
    is never loaded."""
    digest = hashlib.sha256()
    for source in sorted(CSRC.iterdir()):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    digest.update(" ".join(CFLAGS).encode())
    return cache_dir() / f"torch-{torch.__version__}-{digest.hexdigest()[:16]}"


def load() -> str | None:
    """Build (first time) and load the ops, then run the `on_load` hooks; returns None when loaded,
    else why they are not. Later calls return the first answer."""
    global _status
    if _status is _UNLOADED:
        _status = _build()
        for hook in _hooks:
            hook(_status is None)
    return _status  # type: ignore[return-value]


def _build() -> str | None:
    if not _settings.enabled:
        return f"disabled by {ENV_DISABLE}=0"
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the ninja wheel's binary, when the venv is not activated
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    directory = build_dir()
    built = directory / "nxcore_native.so"
    if built.is_file():
        # The folder's name hashes the sources, flags and torch version, so a library there is this
        # build: load it without running ninja, which compares file times and rebuilds (~15 s on
        # 2 cores) whenever the sources were touched, e.g. by a new checkout of the same code.
        try:
            torch.ops.load_library(str(built))
            return None
        except OSError as exc:
            log.warning("nxcore: could not load %s (%s): building it again", built, exc)
    if not any(directory.glob("*.so")):
        print(f"nxcore: building the C++ ops once into {directory} (about 30 s) ...", file=sys.stderr, flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(
            name="nxcore_native",
            sources=[str(s) for s in SOURCES],
            extra_cflags=list(CFLAGS),
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # no compiler or ninja, a failed build: the Python ops still work
        reason = f"could not build {', '.join(s.name for s in SOURCES)} ({type(exc).__name__}: {exc})".strip()
        log.warning("nxcore: %s; running the Python ops instead (slower in compiled graphs)", reason[:2000])
        return reason
    return None


def available() -> bool:
    """Whether the C++ ops are in use (loading them first if nothing has yet)."""
    if _status is _UNLOADED:
        load()
    return _status is None


def on_load(hook: Callable[[bool], None]) -> Callable[[bool], None]:
    """Run `hook(loaded)` when the ops are loaded (or their fallback chosen); at once if that happened."""
    _hooks.append(hook)
    if _status is not _UNLOADED:
        hook(_status is None)
    return hook


def main() -> int:
    """Build and load the ops and print which are in use (the Python ops stand in when the build
    fails, so that is not an error here; the test suite checks the build wherever a compiler is)."""
    configure_from(os.environ)
    reason = load()
    if reason is None:
        rows = torch.ops.nxcore._gemv_rows()
        print(f"nxcore C++ ops: loaded from {build_dir()} (bf16 GEMV {f'up to {rows} rows' if rows else 'off: oneDNN measured faster on this CPU'})")
        return 0
    print(f"nxcore C++ ops: not in use, {reason}; running the Python ops")
    return 0
