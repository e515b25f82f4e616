"""The decode loop's admission: the ack goes out as soon as the KV is in its slot, its queue time is
the wait for a slot, and KV that fails its check takes no slot."""

from __future__ import annotations

import threading
import time

from decode_svc.loop import Acked, DecodeJob, DecodeLoop, Failed, Finished, Tokens
from nxcore import Engine, RequestRng, RuntimeConfig, SamplingParams, SequenceRequest, StoppingCriteria, generate
from nxcore.engine_thread import EngineThread
from nxcore.generate import GenerationResult
from nxcore.kv_cache import KVSnapshot
from nxcore.kv_wire import KVTransferError
from nxcore.speculation import DraftProposer
from tests.conftest import Checkpoint, random_prompt

CONFIG = RuntimeConfig(batch_size=2, seq_len=64, dtype="float32")


def _job(prompt: list[int], first: int, kv, events: list, done: threading.Event, **extra) -> DecodeJob:  # noqa: ANN001, ANN003
    def emit(event) -> None:  # noqa: ANN001
        events.append((event, time.monotonic()))
        if isinstance(event, Finished | Failed):
            done.set()

    return DecodeJob(request_id="r", prompt_ids=prompt, first_token=first, kv=kv, sampling=SamplingParams(),
                     rng=RequestRng(0, offset=1), stopping=StoppingCriteria(max_new_tokens=6, ignore_eos=True),
                     stop_strings=(), emit=emit, **extra)


def _prefilled(ckpt: Checkpoint, *, seed: int) -> tuple[list[int], int, KVSnapshot, GenerationResult]:
    """A prompt, its first token and KV from a prefill engine, and what one engine generates from it."""
    prompt = random_prompt(12, seed=seed)
    prefill = Engine.from_pretrained(ckpt.path, CONFIG)
    [first] = prefill.context_encode([SequenceRequest(slot=0, token_ids=prompt, sampling=SamplingParams(), rng=RequestRng(0))])
    kv = prefill.export_kv(0, len(prompt))
    [expected] = generate(prefill, [prompt], stopping=StoppingCriteria(max_new_tokens=6, ignore_eos=True))
    return prompt, first, kv, expected


def _decode_with_draft(ckpt: Checkpoint) -> tuple[EngineThread, Engine, Engine, DraftProposer]:
    """A decode engine speculating with a draft model (which encodes prompts itself), on their thread."""
    thread = EngineThread("decode-engine")
    engine = thread.submit(Engine.from_pretrained, ckpt.path, CONFIG.replace(speculation_length=2), graphs="decode").result(timeout=120)
    draft = thread.submit(Engine.from_pretrained, ckpt.path, CONFIG).result(timeout=120)
    return thread, engine, draft, DraftProposer(draft, 2, target_vocab=engine.model_config.vocab_size)


def test_admission_acks_before_the_drafts_own_prefill_and_checks_kv_first(checkpoints: dict[str, Checkpoint]) -> None:
    prompt, first, kv, expected = _prefilled(checkpoints["llama"], seed=4)
    thread, engine, draft, proposer = _decode_with_draft(checkpoints["llama"])
    import_kv, encode = engine.import_kv, draft.context_encode
    draft_started: list[float] = []

    def slow_import(slot, snapshot):  # noqa: ANN001, ANN202
        time.sleep(0.3)  # a long import is not time spent waiting for a slot
        return import_kv(slot, snapshot)

    def recorded_encode(requests):  # noqa: ANN001, ANN202
        draft_started.append(time.monotonic())
        return encode(requests)

    engine.import_kv, draft.context_encode = slow_import, recorded_encode
    loop = DecodeLoop(engine, tokenizer=None, max_queue=4, proposer=proposer, thread=thread)
    loop.start()
    try:
        events: list = []
        done = threading.Event()

        def corrupted() -> None:
            raise KVTransferError("shared KV region failed its CRC-32 check: the data is corrupted")

        loop.submit(_job(prompt, first, kv, events, done, check_kv=corrupted))
        assert done.wait(timeout=60)
        [(failed, _)] = events
        assert isinstance(failed, Failed) and failed.data_loss and "CRC-32" in failed.message
        assert engine.free_slots() == [0, 1] and draft_started == []  # no slot taken, nothing imported

        events.clear()
        done.clear()
        loop.submit(_job(prompt, first, kv, events, done, check_kv=lambda: None))
        assert done.wait(timeout=60)
        ack, acked_at = events[0]
        assert isinstance(ack, Acked) and ack.queue_ms < 300
        assert len(draft_started) == 1 and acked_at <= draft_started[0]  # the sender was free before the draft encoded
        tokens = [t for e, _ in events if isinstance(e, Tokens) for t in e.token_ids]
        assert [first, *tokens] == expected.output_ids
    finally:
        loop.stop(timeout=10)
        thread.close(timeout=10)


def test_the_drafts_own_prefill_runs_outside_the_loops_lock(checkpoints: dict[str, Checkpoint]) -> None:
    """The gRPC side takes the loop's lock on its event loop (load, room, submit, cancel): while the
    draft model encodes a prompt, those calls still answer, and the request decodes as before."""
    prompt, first, kv, expected = _prefilled(checkpoints["llama"], seed=5)
    thread, engine, draft, proposer = _decode_with_draft(checkpoints["llama"])
    encode = draft.context_encode
    encoding, release = threading.Event(), threading.Event()

    def held_encode(requests):  # noqa: ANN001, ANN202
        encoding.set()
        assert release.wait(timeout=30)
        return encode(requests)

    draft.context_encode = held_encode
    loop = DecodeLoop(engine, tokenizer=None, max_queue=4, proposer=proposer, thread=thread)
    loop.start()
    try:
        events: list = []
        done = threading.Event()
        loop.submit(_job(prompt, first, kv, events, done))
        assert encoding.wait(timeout=60)
        answered = threading.Event()
        threading.Thread(target=lambda: (loop.load(), loop.has_room(), answered.set()), daemon=True).start()
        assert answered.wait(timeout=5), "the loop held its lock while the draft model encoded the prompt"
        assert loop.load() == (1, 2, 0)
        release.set()
        assert done.wait(timeout=60)
        tokens = [t for e, _ in events if isinstance(e, Tokens) for t in e.token_ids]
        assert [first, *tokens] == expected.output_ids
    finally:
        release.set()
        loop.stop(timeout=10)
        thread.close(timeout=10)
