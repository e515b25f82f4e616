"""The OpenMP spin setting of processes that share the cores: set by LocalCluster only when its
engines' threads outnumber the cores, never over the user's choice, and seen by the services."""

from __future__ import annotations

from pathlib import Path

import pytest

from nxserve.cluster import LocalCluster
from nxserve.omp_env import SHARED_CORES_SPINCOUNT, share_cores
from nxserve.testing.model_factory import make_model


def test_spincount_is_set_only_when_oversubscribed_and_the_user_chose_no_policy() -> None:
    env: dict[str, str] = {}
    assert share_cores(env, threads=4, cores=2) and env == {"GOMP_SPINCOUNT": SHARED_CORES_SPINCOUNT}
    env = {}
    assert not share_cores(env, threads=2, cores=2) and env == {}
    for chosen in ({"GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "PASSIVE"}):
        env = dict(chosen)
        assert not share_cores(env, threads=8, cores=2) and env == chosen


def test_cluster_counts_each_services_threads_and_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert LocalCluster(tmp_path, decode_replicas=2).openmp_threads() == 3 * 16
    c = LocalCluster(tmp_path, decode_replicas=2, engine_args=["--threads", "2"], prefill_args=["--tp", "2"], decode_args=["--threads=3"])
    assert c.openmp_threads() == 2 * 2 + 2 * 3


@pytest.mark.slow
def test_services_of_an_oversubscribed_cluster_start_with_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    model = make_model(arch="llama", preset="tiny", out=tmp_path / "m", seed=0)
    # Two services at torch's default of one thread per core: always more threads than cores.
    with LocalCluster(model, decode_replicas=1, engine_args=["--seq-len", "64", "--batch-size", "1"]) as c:
        for service in c.services:
            environ = Path(f"/proc/{service.process.pid}/environ").read_bytes().split(b"\0")
            assert f"GOMP_SPINCOUNT={SHARED_CORES_SPINCOUNT}".encode() in environ
