"""The decode loop's admission: the ack goes out as soon as the KV is in its slot, its queue time is
the wait for a slot, and KV that fails its check takes no slot."""

from __future__ import annotations

import threading
from pathlib import Path

from decode_svc.loop import Acked, DecodeJob, DecodeLoop, Failed, Finished, Tokens
from nxcore import Engine, RequestRng, RuntimeConfig, SamplingParams, SequenceRequest, StoppingCriteria, generate
from nxcore.engine_thread import EngineThread
from nxcore.generate import GenerationResult
from nxcore.kv_cache import KVSnapshot
from nxcore.speculation import DraftProposer
from nxserve.kv import CHUNKS, SHM, ReceivedKV, engine_layout
from nxserve.kv.shm import KVArena, SharedKVReader, SharedRegion
from nxserve.rpc.errors import EngineFailure, KVCorrupted
from tests.conftest import Checkpoint, random_prompt

CONFIG = RuntimeConfig(batch_size=2, seq_len=64, dtype="float32")


def _job(prompt: list[int], first: int, kv: ReceivedKV, events: list, done: threading.Event) -> DecodeJob:
    def emit(event) -> None:
        events.append(event)
        if isinstance(event, Finished | Failed):
            done.set()

    return DecodeJob(
        request_id="r",
        prompt_ids=prompt,
        output_ids=[first],
        kv=kv,
        sampling=SamplingParams(),
        rng=RequestRng(0, offset=1),
        stopping=StoppingCriteria(max_new_tokens=6, ignore_eos=True),
        emit=emit,
    )


def _prefilled(ckpt: Checkpoint, *, seed: int) -> tuple[list[int], int, KVSnapshot, GenerationResult, Engine]:
    """A prompt, its first token and KV from a prefill engine, and what one engine generates from it."""
    prompt = random_prompt(12, seed=seed)
    prefill = Engine.from_pretrained(ckpt.path, CONFIG)
    [first] = prefill.context_encode([SequenceRequest(slot=0, token_ids=prompt, sampling=SamplingParams(), rng=RequestRng(0))])
    kv = prefill.export_kv(0, len(prompt))
    [expected] = generate(prefill, [prompt], stopping=StoppingCriteria(max_new_tokens=6, ignore_eos=True))
    return prompt, first, kv, expected, prefill


def _decode_with_draft(ckpt: Checkpoint) -> tuple[EngineThread, Engine, Engine, DraftProposer]:
    """A decode engine speculating with a draft model (which encodes prompts itself), on their thread."""
    thread = EngineThread("decode-engine")
    engine = thread.submit(Engine.from_pretrained, ckpt.path, CONFIG.replace(speculation_length=2), graphs="decode").result(timeout=120)
    draft = thread.submit(Engine.from_pretrained, ckpt.path, CONFIG).result(timeout=120)
    return thread, engine, draft, DraftProposer(draft, 2, target_vocab=engine.model_config.vocab_size)


def test_admission_acks_before_the_drafts_own_prefill_and_checks_kv_first(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    prompt, first, kv, expected, prefill = _prefilled(checkpoints["llama"], seed=4)
    thread, engine, draft, proposer = _decode_with_draft(checkpoints["llama"])
    import_kv, encode = engine.import_kv, draft.context_encode
    now = [0.0]  # the loop's clock: the import below takes 300 s of it
    order: list[str] = []

    def slow_import(slot, snapshot):
        now[0] += 300.0  # a long import is not time spent waiting for a slot
        return import_kv(slot, snapshot)

    def recorded_encode(requests):
        order.append("draft prefill")
        return encode(requests)

    engine.import_kv, draft.context_encode = slow_import, recorded_encode
    arena = KVArena(tmp_path, 1 << 20)
    region = arena.put([kv]).sealed
    shared = SharedKVReader(tmp_path).read(
        SharedRegion(region.name, region.offset, region.nbytes, region.crc32 ^ 1), [engine_layout(prefill, len(prompt))]
    )
    loop = DecodeLoop(engine, tokenizer=None, max_queue=4, proposer=proposer, thread=thread, clock=lambda: now[0])
    loop.start()
    try:
        events: list = []
        done = threading.Event()
        corrupted = ReceivedKV(snapshots=shared.snapshots, transport=SHM, nbytes=region.nbytes, shared=shared)
        loop.submit(_job(prompt, first, corrupted, events, done))
        assert done.wait(timeout=60)
        [failed] = events
        assert isinstance(failed, Failed) and isinstance(failed.error, KVCorrupted) and "CRC-32" in str(failed.error)
        assert engine.free_slots() == [0, 1] and order == [] and loop.load() == (2, 2, 0)  # no slot taken, nothing imported

        events.clear()
        done.clear()
        job = _job(prompt, first, ReceivedKV(snapshots=[kv], transport=CHUNKS, nbytes=kv.nbytes), events, done)
        emit = job.emit
        job.emit = lambda event: (order.append(type(event).__name__), emit(event))  # type: ignore[method-assign]
        loop.submit(job)
        assert done.wait(timeout=60)
        ack = events[0]
        assert isinstance(ack, Acked) and ack.queue_ms == 0.0  # the 300 s import is not in it
        assert order[:2] == ["Acked", "draft prefill"]  # the sender was free before the draft encoded
        tokens = [t for e in events if isinstance(e, Tokens) for t in e.token_ids]
        assert [first, *tokens] == expected.output_ids
    finally:
        loop.stop(timeout=10)
        thread.close(timeout=10)
        arena.close()


def test_the_drafts_own_prefill_runs_outside_the_loops_lock(checkpoints: dict[str, Checkpoint]) -> None:
    """The gRPC side takes the loop's lock on its event loop (load, room, submit, cancel): while the
    draft model encodes a prompt, those calls still answer, and the request decodes as before."""
    prompt, first, kv, expected, _ = _prefilled(checkpoints["llama"], seed=5)
    thread, engine, draft, proposer = _decode_with_draft(checkpoints["llama"])
    encode = draft.context_encode
    encoding, release = threading.Event(), threading.Event()

    def held_encode(requests):
        encoding.set()
        assert release.wait(timeout=30)
        return encode(requests)

    draft.context_encode = held_encode
    loop = DecodeLoop(engine, tokenizer=None, max_queue=4, proposer=proposer, thread=thread)
    loop.start()
    try:
        events: list = []
        done = threading.Event()
        loop.submit(_job(prompt, first, ReceivedKV(snapshots=[kv], transport=CHUNKS, nbytes=kv.nbytes), events, done))
        assert encoding.wait(timeout=60)
        answered = threading.Event()
        threading.Thread(target=lambda: (loop.load(), loop.has_room(), answered.set()), daemon=True).start()
        assert answered.wait(timeout=5), "the loop held its lock while the draft model encoded the prompt"
        assert loop.load() == (1, 2, 0)
        release.set()
        assert done.wait(timeout=60)
        tokens = [t for e in events if isinstance(e, Tokens) for t in e.token_ids]
        assert [first, *tokens] == expected.output_ids
    finally:
        release.set()
        loop.stop(timeout=10)
        thread.close(timeout=10)


def test_a_request_that_fails_a_step_fails_alone_and_the_others_keep_their_tokens(checkpoints: dict[str, Checkpoint]) -> None:
    """A row the engine refuses mid-batch (a token outside the vocabulary, which the service's
    header check would have refused: submitted here straight to the loop) fails with
    EngineFailure; the requests stepped with it go on with the tokens they get without it."""
    ckpt = checkpoints["llama"]
    config = RuntimeConfig(batch_size=3, ctx_batch_size=3, seq_len=64, dtype="float32")
    prefill = Engine.from_pretrained(ckpt.path, config)
    prompts = [random_prompt(n, seed=n) for n in (9, 13)]
    requests = [SequenceRequest(slot=i, token_ids=p, sampling=SamplingParams(), rng=RequestRng(0)) for i, p in enumerate(prompts)]
    firsts = prefill.context_encode(requests)
    kvs = [prefill.export_kv(i, len(p)) for i, p in enumerate(prompts)]
    for i in range(len(prompts)):
        prefill.free(i)
    expected = generate(prefill, prompts, stopping=StoppingCriteria(max_new_tokens=6, ignore_eos=True))
    thread = EngineThread("decode-engine")
    engine = thread.submit(Engine.from_pretrained, ckpt.path, config, graphs="decode").result(timeout=120)
    loop = DecodeLoop(engine, tokenizer=None, max_queue=4, thread=thread)
    events: list[list] = [[], [], []]
    dones = [threading.Event() for _ in range(3)]
    jobs = [
        _job(p, f, ReceivedKV(snapshots=[kv], transport=CHUNKS, nbytes=kv.nbytes), events[i], dones[i])
        for i, (p, f, kv) in enumerate(zip(prompts, firsts, kvs))
    ]
    poison_kv = kvs[0]
    poisoned = _job(
        prompts[0],
        engine.model_config.vocab_size + 100,
        ReceivedKV(snapshots=[poison_kv], transport=CHUNKS, nbytes=poison_kv.nbytes),
        events[2],
        dones[2],
    )
    for job in (jobs[0], poisoned, jobs[1]):
        loop.submit(job)  # queued before the loop starts: all three are admitted into one batch
    loop.start()
    try:
        assert all(done.wait(timeout=60) for done in dones)
        [failure] = events[2][1:]  # its ack, then the failure
        assert isinstance(failure, Failed) and isinstance(failure.error, EngineFailure) and "out of range" in str(failure.error)
        for i in range(2):
            tokens = [t for e in events[i] if isinstance(e, Tokens) for t in e.token_ids]
            assert isinstance(events[i][-1], Finished) and [firsts[i], *tokens] == expected[i].output_ids
        assert loop.load() == (3, 3, 0)
    finally:
        loop.stop(timeout=10)
        thread.close(timeout=10)


def _run_alone(ckpt: Checkpoint, *, stream_interval: int, clock=None, max_new_tokens: int = 9) -> tuple[list, GenerationResult]:
    """One request through a decode loop with its stream_interval; its events and what one engine generates."""
    prompt, first, kv, _, prefill = _prefilled(ckpt, seed=5)
    [expected] = generate(prefill, [prompt], stopping=StoppingCriteria(max_new_tokens=max_new_tokens, ignore_eos=True))
    thread = EngineThread("decode-engine")
    engine = thread.submit(Engine.from_pretrained, ckpt.path, CONFIG, graphs="decode").result(timeout=120)
    loop = DecodeLoop(engine, tokenizer=None, max_queue=4, thread=thread, **({"clock": clock} if clock else {}))
    events: list = []
    done = threading.Event()
    job = _job(prompt, first, ReceivedKV(snapshots=[kv], transport=CHUNKS, nbytes=kv.nbytes), events, done)
    job.stopping = StoppingCriteria(max_new_tokens=max_new_tokens, ignore_eos=True)
    job.stream_interval = stream_interval
    loop.start()
    try:
        loop.submit(job)
        assert done.wait(timeout=60)
    finally:
        loop.stop(timeout=10)
        thread.close(timeout=10)
    return events, expected


def test_tokens_go_out_in_batches_of_the_stream_interval_with_the_rest_at_the_end(checkpoints: dict[str, Checkpoint]) -> None:
    """8 decoded tokens at stream_interval 3: batches of 3, 3, then the last 2 when the request
    finishes; each batch carries the random-stream position after its last token, the one a
    request streamed token by token has there."""
    ckpt = checkpoints["llama"]
    one, expected = _run_alone(ckpt, stream_interval=1)
    three, _ = _run_alone(ckpt, stream_interval=3)
    singles = [e for e in one if isinstance(e, Tokens)]
    batches = [e for e in three if isinstance(e, Tokens)]
    assert [len(e.token_ids) for e in singles] == [1] * 8
    assert [len(e.token_ids) for e in batches] == [3, 3, 2]
    assert [t for e in batches for t in e.token_ids] == [t for e in singles for t in e.token_ids] == expected.output_ids[1:]
    assert [e.rng_offset for e in batches] == [singles[2].rng_offset, singles[5].rng_offset, singles[7].rng_offset]
    assert isinstance(three[-1], Finished) and three[-1].decoded_tokens == 8


def test_held_back_tokens_go_out_after_a_second_however_few(checkpoints: dict[str, Checkpoint]) -> None:
    """A stream_interval larger than the whole generation still sends what waits once the oldest
    token has waited MAX_UNSENT_S (here on a clock that moves 0.4 s per reading), so prefill's
    stall timeout never takes a batching replica for a stuck one."""
    ticks = iter(range(10**6))
    events, expected = _run_alone(checkpoints["llama"], stream_interval=1000, clock=lambda: 0.4 * next(ticks), max_new_tokens=12)
    batches = [e.token_ids for e in events if isinstance(e, Tokens)]
    # one reading per step: the tokens of 4 steps, the oldest read 1.2 s before the newest
    assert [len(b) for b in batches] == [4, 4, 3]
    assert [t for b in batches for t in b] == expected.output_ids[1:]
