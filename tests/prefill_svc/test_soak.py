"""Soak: 500 requests with random cancels and deadlines while a decode replica is killed and
restarted. Afterwards nothing is held (slots, queues, arena regions) and no service has grown."""

from __future__ import annotations

import random
import threading
from collections import Counter
from pathlib import Path

import grpc
import pytest

from nxserve.cluster import LocalCluster
from tests.services import ENGINE_ARGS, wait_all_free, wait_until

pytestmark = pytest.mark.slow

REQUESTS, WORKERS = 500, 8


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_500_requests_with_cancels_deadlines_and_a_replica_killed_and_restarted(svc_model: Path, tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    with LocalCluster(
        svc_model,
        decode_replicas=2,
        engine_args=[*ENGINE_ARGS, "--kv-shm-dir", str(shm)],
        prefill_args=["--kv-shm-bytes", "4M"],
        log_dir=tmp_path / "logs",  # a killed replica keeps its logs; pytest's tmp_path rotates them
    ) as cluster:
        rng = random.Random(7)
        plans = [
            (
                rng.randint(3, 40),
                rng.randint(1, 40),
                rng.choices(["finish", "cancel", "deadline"], [6, 2, 2])[0],
                rng.uniform(0.02, 0.3),
                rng.randint(1, 5),
            )
            for _ in range(REQUESTS)
        ]
        outcomes: Counter[str] = Counter()
        lock = threading.Lock()
        next_index = [0]
        done = [0]
        baseline: dict[str, float] = {}
        victim = cluster.service("decode-1")
        steady = [cluster.service("prefill"), cluster.service("decode-0")]
        restarter: list[threading.Thread] = []

        def milestone(n: int) -> None:  # the operator's part, at fixed points of the run
            if n == 50:
                baseline.update({s.name: _rss_mb(s.process.pid) for s in steady})  # type: ignore[union-attr]
            elif n == 150:
                victim.process.kill()  # type: ignore[union-attr]
            elif n == 300:
                victim.process.wait()  # type: ignore[union-attr]
                restarter.append(threading.Thread(target=cluster.restart, args=("decode-1",)))
                restarter[0].start()

        def worker() -> None:
            with cluster.client() as client:
                while True:
                    with lock:
                        if next_index[0] >= REQUESTS:
                            return
                        i = next_index[0]
                        next_index[0] += 1
                    prompt_len, new_tokens, how, deadline, cancel_after = plans[i]
                    prompt = [rng.randrange(4, 512) for _ in range(prompt_len)]
                    try:
                        stream = client.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True, timeout=deadline if how == "deadline" else 30)
                        for n, _ in enumerate(stream, 1):
                            if how == "cancel" and n >= cancel_after:
                                stream.close()  # leaving the iteration cancels the call
                                break
                        outcome = "cancelled" if how == "cancel" else "ok"
                    except grpc.RpcError as exc:
                        outcome = exc.code().name
                    with lock:
                        outcomes[outcome] += 1
                        done[0] += 1
                        n_done = done[0]
                    milestone(n_done)

        threads = [threading.Thread(target=worker) for _ in range(WORKERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        for t in restarter:
            t.join(120)
        assert sum(outcomes.values()) == REQUESTS
        assert set(outcomes) <= {"ok", "cancelled", "DEADLINE_EXCEEDED"}, outcomes  # a killed replica cost no request
        state = wait_all_free(cluster, timeout=20)
        assert all(s.free_slots == s.total_slots and s.queued_requests == 0 for s in state) and len(state) == 2
        with cluster.client() as client:
            assert wait_until(lambda: client.model_info()["kv_regions_held"] == 0, what="every arena region back")
            info = client.model_info()
        after = {s.name: _rss_mb(s.process.pid) for s in steady}  # type: ignore[union-attr]
        print(f"\nsoak: {dict(outcomes)}; {info['migrations']} moved; RSS MB after 50 requests {baseline}, at the end {after}")
        for name, rss in after.items():
            assert rss <= baseline[name] * 1.10, f"{name} grew from {baseline[name]:.0f} to {rss:.0f} MB"
        assert cluster.exited() == []
