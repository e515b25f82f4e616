"""Tools from the Node ecosystem for the tests that check nxserve against clients other than its
own: `buf` (lint, curl) and `@grpc/grpc-js`. Installed once with npm into .cache/node at the
versions below; the tests that need them skip, saying why, where npm is missing or cannot reach
its registry."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREFIX = ROOT / ".cache" / "node"
PACKAGES = {"@bufbuild/buf": "1.75.0", "@grpc/grpc-js": "1.14.7", "@grpc/proto-loader": "0.8.1"}
"""The same as the Makefile's NODE_TOOLS (`make proto-lint`)."""


def node_modules() -> Path:
    """.cache/node/node_modules with PACKAGES in it (pytest.skip when they cannot be had)."""
    modules = PREFIX / "node_modules"
    stamp = PREFIX / "installed.txt"
    wanted = " ".join(f"{name}@{version}" for name, version in sorted(PACKAGES.items()))
    if stamp.is_file() and stamp.read_text() == wanted:
        return modules
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.skip("needs node and npm (for buf and @grpc/grpc-js): apt-get install npm")
    PREFIX.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [npm, "install", "--prefix", str(PREFIX), "--no-audit", "--no-fund", "--no-save", *wanted.split()],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"npm could not install {wanted}: {done.stderr.strip()[-300:]}")
    stamp.write_text(wanted)
    return modules


def buf() -> str:
    return str(node_modules() / ".bin" / "buf")
