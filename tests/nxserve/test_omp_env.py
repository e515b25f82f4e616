"""Processes that share the cores: LocalCluster's services take turns (--core-turns) when their
threads together outnumber the cores, and get the lower OpenMP spin count only when one engine's
own threads do, never over the user's choice."""

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
    # An engine whose own threads outnumber the cores (two ranks at one thread per core) spins less.
    env: dict[str, str] = {}
    assert share_cores(env, threads=LocalCluster(tmp_path)._engine_threads(["--tp", "2"])) and env["GOMP_SPINCOUNT"] == SHARED_CORES_SPINCOUNT


@pytest.mark.slow
def test_services_of_an_oversubscribed_cluster_take_turns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    model = make_model(arch="llama", preset="tiny", out=tmp_path / "m", seed=0)
    # Two services at torch's default of one thread per core: always more threads than cores.
    with LocalCluster(model, decode_replicas=1, engine_args=["--seq-len", "64", "--batch-size", "1"]) as c:
        files = set()
        for service in c.services:
            argv = Path(f"/proc/{service.process.pid}/cmdline").read_bytes().split(b"\0")
            assert b"--core-turns" in argv, argv
            files.add(argv[argv.index(b"--core-turns") + 1])
            environ = Path(f"/proc/{service.process.pid}/environ").read_bytes().split(b"\0")
            assert not any(e.startswith(b"GOMP_SPINCOUNT=") for e in environ)  # each computes alone in its turn
        assert len(files) == 1  # one set of turns for all of them
        # Requests complete with the services taking turns.
        assert len(c.client().generate_text([5, 6, 7], max_new_tokens=4, ignore_eos=True).output_ids) == 4
