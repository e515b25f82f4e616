"""Batch invariance through the services: on a cluster started with --batch-invariant, seeded and
greedy streams running next to other traffic, on two replicas, one of which is killed midway (its
streams are re-encoded on the other), give the tokens of in-process generation of each request
alone, in bfloat16, over hundreds of tokens."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nxcore import Engine, RuntimeConfig, SamplingParams, StoppingCriteria, generate
from nxserve.cluster import LocalCluster
from tests.services import loads, prompts, wait_all_free

pytestmark = pytest.mark.slow

NEW_TOKENS = 400
SAMPLING = [SamplingParams(temperature=1.0, seed=11), SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=5)] * 2


@pytest.fixture(scope="module")
def invariant(svc_model: Path) -> Iterator[LocalCluster]:
    with LocalCluster(
        svc_model,
        decode_replicas=2,
        engine_args=["--dtype", "bfloat16", "--seq-len", "512", "--batch-invariant", "--threads", "1"],
        decode_args=["--batch-size", "4", "--grace", "0.5"],
        prefill_args=["--stall-timeout-s", "2"],
    ) as c:
        yield c


def test_streams_equal_alone_generation_across_batches_replicas_and_a_migration(invariant: LocalCluster, svc_model: Path) -> None:
    with invariant.client() as client:
        assert client.model_info()["batch_invariant"] is True
    batch = [p[: 5 + 7 * i] for i, p in enumerate(prompts(len(SAMPLING)))]
    # Each request alone, in-process, in an engine of other shapes (1 slot, other buckets).
    config = RuntimeConfig(batch_size=1, seq_len=512, buckets=(64, 512), dtype="bfloat16", batch_invariant=True)
    alone_engine = Engine.from_pretrained(svc_model, config)
    stop = StoppingCriteria(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    expected = [generate(alone_engine, [p], sampling=s, stopping=stop)[0].output_ids for p, s in zip(batch, SAMPLING)]

    received: list[list[int]] = [[] for _ in batch]
    errors: list[BaseException] = []
    halfway = [threading.Event() for _ in batch]

    def run(i: int) -> None:
        s = SAMPLING[i]
        try:
            with invariant.client() as c:
                for chunk in c.generate(batch[i], max_new_tokens=NEW_TOKENS, ignore_eos=True, temperature=s.temperature, top_p=s.top_p, seed=s.seed):
                    received[i].extend(chunk.token_ids)
                    if len(received[i]) >= NEW_TOKENS // 3:
                        halfway[i].set()
        except BaseException as exc:
            errors.append(exc)
        finally:
            halfway[i].set()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batch))]
    for t in threads:
        t.start()
    for event in halfway:
        assert event.wait(120)
    state = loads(invariant.decode_targets)  # kill the replica holding the most streams
    victim = invariant.service(f"decode-{min(range(len(state)), key=lambda r: state[r].free_slots)}")
    os.kill(victim.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
    for t in threads:
        t.join(180)
    assert errors == []
    assert [len(r) for r in received] == [NEW_TOKENS] * len(batch)
    for i, (got, want) in enumerate(zip(received, expected)):
        first = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), None)
        assert first is None, f"stream {i} ({SAMPLING[i]}) parts from its alone generation at token {first}"
    with invariant.client() as client:
        assert int(client.model_info()["migrations"]) > 0
    victim.process.wait(30)  # type: ignore[union-attr]
    invariant.restart(victim.name)
    assert all(s.free_slots == s.total_slots for s in wait_all_free(invariant))
