"""The services' OpenMP spin default, and that a service process has it before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nxserve.omp_env import SERVICE_SPINCOUNT, apply_service_defaults

# Imports a module and prints GOMP_SPINCOUNT as it is when torch is first imported.
PROBE = """
import importlib.abc, os, sys
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("at torch import:", os.environ.get("GOMP_SPINCOUNT"), flush=True)
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, Watch())
import {module}
"""


def test_spincount_is_set_only_when_the_user_chose_no_spin_policy() -> None:
    env: dict[str, str] = {}
    apply_service_defaults(env)
    assert env == {"GOMP_SPINCOUNT": SERVICE_SPINCOUNT}
    for chosen in ({"GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "PASSIVE"}):
        env = dict(chosen)
        apply_service_defaults(env)
        assert env == chosen


@pytest.mark.parametrize("module", ["prefill_svc.__main__", "decode_svc.__main__"])
def test_service_entry_point_sets_it_before_torch_loads(module: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert f"at torch import: {SERVICE_SPINCOUNT}" in out.splitlines(), out
