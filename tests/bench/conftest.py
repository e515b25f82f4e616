"""Fixtures of the benchmark tests: one tiny llama checkpoint per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from nxserve.testing.model_factory import make_model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(arch="llama", preset="tiny", out=tmp_path_factory.mktemp("bench") / "tiny")
