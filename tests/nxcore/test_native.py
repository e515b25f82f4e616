"""nxcore's C++ ops are built or loaded on first use, never at import, and only entry points read
the environment that configures them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nxcore import native

ROOT = Path(__file__).resolve().parents[2]


def test_importing_nxcore_the_services_and_the_command_line_builds_and_loads_nothing(tmp_path: Path) -> None:
    script = """
import nxcore, nxcore.engine, nxcore.compiled, nxcore.modules.linear, nxcore.modules.attention, nxcore.parallel.executor
import prefill_svc.__main__, prefill_svc.server, decode_svc.__main__, decode_svc.server, nxserve.cli
from nxcore import native
assert native._status is native._UNLOADED, native._status
"""
    env = {**os.environ, native.ENV_CACHE: str(tmp_path / "native")}
    subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, check=True, timeout=120)
    assert not (tmp_path / "native").exists()


def test_settings_come_from_the_entry_points_environment_and_are_fixed_once_loaded(tmp_path: Path) -> None:
    script = f"""
from pathlib import Path
from nxcore import native
settings = native.configure_from({{"{native.ENV_DISABLE}": "0", "{native.ENV_CACHE}": "{tmp_path}"}})
assert settings == native.settings() == native.Settings(enabled=False, cache=Path("{tmp_path}")), settings
assert native.cache_dir() == Path("{tmp_path}")
assert native.load() == "disabled by NXSERVE_NATIVE=0" and not native.available()
"""
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=120)
    current = native.settings()
    native.load()
    with pytest.raises(RuntimeError, match="already loaded"):
        native.configure(native.Settings(enabled=not current.enabled))
    native.configure(current)  # the same settings again: fine
