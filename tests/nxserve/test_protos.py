"""The committed stubs in nxserve/v1 are what grpcio-tools generates from protos/ today."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "protos" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    _load_generator().generate(tmp_path)
    generated = sorted(p.name for p in (tmp_path / "nxserve" / "v1").iterdir())
    committed = sorted(p.name for p in (ROOT / "nxserve" / "v1").iterdir() if p.suffix in (".py", ".pyi") and p.name != "__init__.py")
    assert generated == committed
    for name in generated:
        fresh = (tmp_path / "nxserve" / "v1" / name).read_text()
        assert (ROOT / "nxserve" / "v1" / name).read_text() == fresh, f"nxserve/v1/{name} is stale: run `python protos/generate.py`"


def test_every_field_is_documented() -> None:
    for proto in (ROOT / "protos" / "nxserve" / "v1").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\s+(optional |repeated )?[\w.]+ \w+ = \d+;", line) and "UNSPECIFIED" not in line:
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} has no comment: {line.strip()}"


def test_buf_lint_is_clean() -> None:
    """`buf lint` (STANDARD) under the committed buf.yaml: its one exception is documented there."""
    from tests.node import buf

    done = subprocess.run([buf(), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
