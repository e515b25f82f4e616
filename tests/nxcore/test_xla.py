"""The xla backend's pure-Python side, in the project's venv (which has no torch-xla): the error that
says how to get it, the flag, and the branch-free sampling XLA programs take. The backend itself is
checked on torch-xla's CPU device by `make xla-check` (bench/xla_check.py), never here."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from nxcore import Engine, EngineError, RuntimeConfig, sampling
from nxcore.config import BACKENDS
from nxcore.modules.eager import on_xla, runs_eagerly
from nxcore.xla import XlaUnavailable
from nxserve.cli import build_parser
from nxserve.rpc.flags import EngineFlags
from tests.conftest import Checkpoint


def test_backend_xla_without_torch_xla_says_how_to_get_it(checkpoints: dict[str, Checkpoint], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_xla", None)  # an import of it fails, as where it is not installed
    config = RuntimeConfig(batch_size=1, seq_len=32, buckets=(32,), backend="xla")
    with pytest.raises(XlaUnavailable, match=r"torch_xla is not importable.*make xla-check.*torch-xla==2\.9\.0") as info:
        Engine.from_pretrained(checkpoints["llama"].path, config)
    assert isinstance(info.value, EngineError)  # the command line reports it like any engine error


def test_backend_xla_is_tp1_only(checkpoints: dict[str, Checkpoint]) -> None:
    config = RuntimeConfig(batch_size=1, seq_len=32, buckets=(32,), backend="xla", tp_degree=2)
    with pytest.raises(EngineError, match=r"xla backend runs tp_degree=1 only \(asked: 2\)"):
        Engine.from_pretrained(checkpoints["llama"].path, config)


def test_every_backend_is_a_flag_choice() -> None:
    for backend in BACKENDS:
        args = build_parser().parse_args(["generate", "--model", "m", "--backend", backend])
        assert EngineFlags.from_args(args).runtime_config(max_positions=64).backend == backend


def test_xla_tensors_are_never_run_eagerly() -> None:
    cpu = torch.zeros(2)
    assert runs_eagerly(cpu) and not on_xla(cpu)
    lazy = SimpleNamespace(device=torch.device("xla", 0))  # the device is all `on_xla` reads
    assert on_xla(lazy)  # type: ignore[arg-type]


@pytest.mark.parametrize("temperature", [[0.0, 0.0, 0.0], [0.0, 0.9, 0.0]])
def test_branch_free_sampling_equals_the_eager_branch(temperature: list[float], monkeypatch: pytest.MonkeyPatch) -> None:
    """On XLA every row takes the sampled path (no torch.cond): greedy rows keep the argmax."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 100, generator=gen)
    params = dict(
        temperature=torch.tensor(temperature),
        top_k=torch.tensor([0, 20, 5]),
        top_p=torch.tensor([1.0, 0.9, 0.5]),
        rand=torch.rand(3, generator=gen),
        max_topk=32,
    )
    eager = sampling.sample(logits, **params)  # type: ignore[arg-type]
    monkeypatch.setattr(sampling, "on_xla", lambda t: True)
    assert torch.equal(sampling.sample(logits, **params), eager)  # type: ignore[arg-type]
