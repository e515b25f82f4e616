"""The prefill worker and the decode loop run every engine call on the thread that loaded the engine
(see nxcore.engine_thread for why)."""

from __future__ import annotations

import asyncio
import threading

from decode_svc.loop import DecodeJob, DecodeLoop, Finished, Tokens
from nxcore import Engine, RequestRng, RuntimeConfig, SamplingParams, SequenceRequest, StoppingCriteria
from nxcore.engine_thread import EngineThread
from nxserve.kv import CHUNKS, ReceivedKV
from prefill_svc.worker import PrefillWorker
from tests.conftest import random_prompt


def _recording(engine: Engine, idents: set[int], *names: str) -> None:
    """Record the thread of every call to the engine's `names` methods."""
    for name in names:
        method = getattr(engine, name)

        def wrapped(*args, _method=method, **kwargs):
            idents.add(threading.get_ident())
            return _method(*args, **kwargs)

        setattr(engine, name, wrapped)


def test_prefill_worker_and_decode_loop_run_on_the_thread_that_loaded_the_engine(checkpoints) -> None:
    path = checkpoints["llama"].path
    config = RuntimeConfig(batch_size=2, seq_len=64, dtype="float32")
    prompt = random_prompt(9, seed=3)
    idents: set[int] = set()

    prefill_thread = EngineThread("prefill-engine")
    prefill_engine = prefill_thread.submit(Engine.from_pretrained, path, config, graphs="context").result(timeout=120)
    _recording(prefill_engine, idents, "context_encode", "export_kv")
    worker = PrefillWorker(prefill_engine, max_queue=4, thread=prefill_thread)
    worker.start()

    async def encode():
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

    def emit(event) -> None:
        events.append(event)
        if isinstance(event, Finished):
            done.set()

    kv = ReceivedKV(snapshots=list(result.kv.snapshots), transport=CHUNKS, nbytes=result.kv.nbytes)
    loop.submit(
        DecodeJob(
            request_id="r",
            prompt_ids=prompt,
            output_ids=[result.first_token],
            kv=kv,
            sampling=SamplingParams(),
            rng=RequestRng(0, offset=1),
            stopping=StoppingCriteria(max_new_tokens=4),
            emit=emit,
        )
    )
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
