"""EngineThread runs every call on one thread, and the services' loops run on the thread that loaded
their engines."""

from __future__ import annotations

import asyncio
import threading

import pytest

from decode_svc.loop import DecodeJob, DecodeLoop, Finished, Tokens
from nxcore import Engine, RequestRng, RuntimeConfig, SamplingParams, SequenceRequest, StoppingCriteria
from nxcore.engine_thread import EngineThread
from prefill_svc.worker import PrefillWorker
from tests.conftest import random_prompt


def test_calls_run_in_order_on_one_thread_with_results_and_errors() -> None:
    thread = EngineThread("test-engine")
    seen: list[tuple[int, int]] = []
    futures = [thread.submit(lambda i=i: seen.append((i, threading.get_ident())) or i * i) for i in range(5)]
    assert [f.result(timeout=5) for f in futures] == [0, 1, 4, 9, 16]
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert {ident for _, ident in seen} == {thread.ident} and thread.ident != threading.get_ident()

    failing = thread.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=5)
    assert thread.submit(lambda: "still serving").result(timeout=5) == "still serving"

    async def from_asyncio() -> int:
        return await thread.run(lambda x, *, y: x + y, 2, y=3)

    assert asyncio.run(from_asyncio()) == 5

    last = thread.submit(lambda: "ran before close")
    thread.close(timeout=5)
    assert last.result(timeout=0) == "ran before close"
    with pytest.raises(RuntimeError, match="closed"):
        thread.submit(lambda: None)


def test_a_loop_that_ends_on_an_error_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    thread = EngineThread("test-engine")
    with caplog.at_level("ERROR", logger="nxcore.engine_thread"):
        ended = thread.start_loop(lambda: 1 / 0, what="test loop")
        with pytest.raises(ZeroDivisionError):
            ended.result(timeout=5)
        assert thread.start_loop(lambda: None, what="quiet loop").result(timeout=5) is None
    thread.close(timeout=5)
    assert [r.getMessage() for r in caplog.records] == ["the test loop stopped on an error"]


def _recording(engine: Engine, idents: set[int], *names: str) -> None:
    """Record the thread of every call to the engine's `names` methods."""
    for name in names:
        method = getattr(engine, name)

        def wrapped(*args, _method=method, **kwargs):  # noqa: ANN002, ANN003, ANN202
            idents.add(threading.get_ident())
            return _method(*args, **kwargs)

        setattr(engine, name, wrapped)


def test_prefill_worker_and_decode_loop_run_on_the_thread_that_loaded_the_engine(checkpoints) -> None:  # noqa: ANN001
    path = checkpoints["llama"].path
    config = RuntimeConfig(batch_size=2, seq_len=64, dtype="float32")
    prompt = random_prompt(9, seed=3)
    idents: set[int] = set()

    prefill_thread = EngineThread("prefill-engine")
    prefill_engine = prefill_thread.submit(Engine.from_pretrained, path, config, graphs="context").result(timeout=120)
    _recording(prefill_engine, idents, "context_encode", "export_kv")
    worker = PrefillWorker(prefill_engine, max_queue=4, thread=prefill_thread)
    worker.start()

    async def encode():  # noqa: ANN202
        return await worker.submit(prompt, SamplingParams(), RequestRng(0))

    result = asyncio.run(encode())
    worker.stop()
    assert idents == {prefill_thread.ident}

    idents.clear()
    decode_thread = EngineThread("decode-engine")
    decode_engine = decode_thread.submit(Engine.from_pretrained, path, config, graphs="decode").result(timeout=120)
    _recording(decode_engine, idents, "import_kv", "token_generate")
    loop = DecodeLoop(decode_engine, tokenizer=None, max_queue=4, thread=decode_thread)
    loop.start()
    events: list = []
    done = threading.Event()

    def emit(event) -> None:  # noqa: ANN001
        events.append(event)
        if isinstance(event, Finished):
            done.set()

    loop.submit(DecodeJob(request_id="r", prompt_ids=prompt, first_token=result.first_token, kv=result.kv,
                          sampling=SamplingParams(), rng=RequestRng(0, offset=1), stopping=StoppingCriteria(max_new_tokens=4),
                          stop_strings=(), emit=emit))
    assert done.wait(timeout=60)
    loop.stop(timeout=5)
    assert idents == {decode_thread.ident}
    tokens = [t for e in events if isinstance(e, Tokens) for t in e.token_ids]
    assert len(tokens) == 3  # the first of the 4 came from prefill

    # the same tokens as one engine running the whole request
    whole = Engine.from_pretrained(path, config)
    expected = [whole.context_encode([SequenceRequest(slot=0, token_ids=prompt, sampling=SamplingParams(), rng=RequestRng(0))])[0]]
    for _ in range(3):
        expected += whole.token_generate([SequenceRequest(slot=0, token_ids=[expected[-1]], sampling=SamplingParams(), rng=RequestRng(0))])
    assert [result.first_token, *tokens] == expected
    for t in (prefill_thread, decode_thread):
        t.close(timeout=5)
