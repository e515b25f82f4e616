"""Faults cost no request: a decode replica killed, stopped or shut down mid-stream hands its
requests to the other one, and every stream completes with the tokens of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from nxcore import Engine, SamplingParams, StoppingCriteria, generate
from nxserve.cluster import LocalCluster
from tests.services import ENGINE_ARGS, SEQ_LEN, loads, prompts, wait_all_free, wait_until

pytestmark = pytest.mark.slow

NEW_TOKENS = 220  # 20-token prompts + 220 < SEQ_LEN (256): streams long enough for the replicas to be seen holding them
SETTINGS = [SamplingParams(), SamplingParams(), SamplingParams(), *(SamplingParams(temperature=0.9, top_p=0.95, seed=s) for s in (1, 2, 3))]


@pytest.fixture(scope="module")
def faulty(svc_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Two decode replicas of 4 slots (the 6 streams spread over both and all run at once, so the
    victim holds some when the fault comes); prefill moves a request after 2 s without a token;
    decode's grace is 0.5 s (it hands its requests back at once)."""
    with LocalCluster(
        svc_model,
        decode_replicas=2,
        engine_args=[*ENGINE_ARGS[:2], "--threads", "1", "--dtype", "float32"],
        decode_args=["--batch-size", "4", "--grace", "0.5"],
        prefill_args=["--stall-timeout-s", "2"],
        log_dir=tmp_path_factory.mktemp("faulty-logs"),  # killed replicas keep their logs; pytest rotates them
    ) as c:
        yield c


def _expected(engine: Engine, batch: list[list[int]]) -> list[list[int]]:
    return [r.output_ids for r in generate(engine, batch, sampling=SETTINGS, stopping=StoppingCriteria(max_new_tokens=NEW_TOKENS, ignore_eos=True))]


def _streams(cluster: LocalCluster, batch: list[list[int]], fault: callable) -> tuple[list[list[int]], list[BaseException]]:  # type: ignore[valid-type]
    """Run the batch's streams, apply `fault` while the replicas hold several of them (read from
    the replicas themselves: the clients' threads can lag far behind decode on a busy machine, so
    counting received tokens could let every stream finish first), return what each received."""
    received: list[list[int]] = [[] for _ in batch]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        s = SETTINGS[i]
        try:
            with cluster.client() as client:
                for chunk in client.generate(
                    batch[i], max_new_tokens=NEW_TOKENS, ignore_eos=True, temperature=s.temperature, top_p=s.top_p, seed=s.seed
                ):
                    received[i].extend(chunk.token_ids)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batch))]
    for t in threads:
        t.start()
    held = min(2, len(batch))
    wait_until(
        lambda: sum(s.total_slots - s.free_slots for s in loads(cluster.decode_targets)) >= held,
        timeout=60,
        what=f"the decode replicas holding {held} of the streams",
    )
    fault()
    for t in threads:
        t.join(120)
    return received, errors


def _moves(cluster: LocalCluster) -> int:
    with cluster.client() as client:
        return int(client.model_info()["migrations"])


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGSTOP"])
def test_a_lost_replicas_streams_go_on_elsewhere_with_the_same_tokens(faulty: LocalCluster, svc_engine: Engine, how: str) -> None:
    batch = [p[:20] for p in prompts(6)]
    assert max(map(len, batch)) + NEW_TOKENS < SEQ_LEN
    expected = _expected(svc_engine, batch)
    before = _moves(faulty)
    victims = []

    def fault() -> None:  # the replica holding the most of the streams now
        state = loads(faulty.decode_targets)
        i = min(range(len(state)), key=lambda r: state[r].free_slots)
        assert state[i].free_slots < state[i].total_slots, "no replica holds a stream"
        victims.append(faulty.service(f"decode-{i}"))
        os.kill(victims[0].process.pid, getattr(signal, how))  # type: ignore[union-attr]

    received, errors = _streams(faulty, batch, fault)
    [victim] = victims
    assert errors == []
    assert received == expected  # no error, no repeated and no missing token, the tokens of an uninterrupted run
    assert _moves(faulty) > before
    if how == "SIGSTOP":
        os.kill(victim.process.pid, signal.SIGCONT)
        victim.process.send_signal(signal.SIGTERM)
    assert victim.process.wait(30) is not None
    start = time.monotonic()
    faulty.restart(victim.name)  # back after its outage: routed to again
    serving = time.monotonic() - start
    with faulty.client() as client:
        wait_until(lambda: client.model_info()["decode_replicas_up"] == 2, timeout=5, what="prefill routing to the restarted replica")
    print(f"{how}: restarted replica SERVING after {serving:.1f} s, routed to {time.monotonic() - start - serving:.2f} s later")
    assert all(s.free_slots == s.total_slots for s in wait_all_free(faulty))


def test_a_replica_lost_after_the_last_token_ends_the_request_instead_of_moving_it() -> None:
    """The token batch that reached max_new_tokens (or eos, or a stop) arrived, then the replica
    broke before its final message: the request ends with that reason; moving it would re-encode
    it and generate past its end."""
    import asyncio

    from opentelemetry import trace

    from nxcore import RequestRng
    from nxcore.stopping import FinishReason
    from nxserve.v1 import decode_pb2
    from nxserve.v1 import generation_pb2 as pb
    from prefill_svc.server import GenerationServicer, Request

    servicer = GenerationServicer(model_name="m")
    servicer._add_tokens = lambda req, response, tokens: FinishReason.LENGTH  # type: ignore[method-assign]

    async def must_not_move(*args: object) -> None:
        raise AssertionError("a finished request was moved to another replica")

    servicer._migrate = must_not_move  # type: ignore[method-assign]

    class Detok:
        stopped = False

        def flush(self) -> str:
            return ""

    class BrokenAfterLastBatch:
        def __init__(self) -> None:
            self.messages = [decode_pb2.DecodeResponse(tokens=decode_pb2.TokenBatch(token_ids=[7], rng_offset=3))]

        async def read(self) -> object:
            import grpc

            return self.messages.pop(0) if self.messages else grpc.aio.EOF

        def cancel(self) -> None:
            pass

    req = Request(
        id="r",
        prompt_ids=[1, 2],
        sampling=SamplingParams(),
        stopping=StoppingCriteria(max_new_tokens=1),
        stop_strings=(),
        disable_speculation=False,
        rng=RequestRng(0),
    )
    req.detok = Detok()  # type: ignore[assignment]

    async def run() -> list[pb.GenerateResponse]:
        replica = SimpleNamespace(target="127.0.0.1:1", name="decode-0")
        return [r async for r in servicer._stream(req, replica, BrokenAfterLastBatch(), trace.INVALID_SPAN)]  # type: ignore[arg-type]

    responses = asyncio.run(run())
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert servicer.migrations == 0
