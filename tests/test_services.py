"""End to end: real prefill and decode processes on loopback, real gRPC, compared with the
in-process engine and transformers."""

from __future__ import annotations

import asyncio
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from nxcore import Engine, RuntimeConfig, SamplingParams, StoppingCriteria, generate
from nxcore.kv_cache import KVSnapshot
from nxcore.kv_wire import KVArena
from nxserve.client import Client
from nxserve.cluster import LocalCluster
from nxserve.decode_codec import DecodeStub, is_shm_unreadable
from nxserve.model_factory import make_model
from nxserve.v1 import decode_pb2, decode_pb2_grpc, generation_pb2 as pb, generation_pb2_grpc

pytestmark = pytest.mark.slow

SEQ_LEN = 256
SLOTS = 4
ENGINE_ARGS = ["--seq-len", str(SEQ_LEN), "--batch-size", str(SLOTS), "--threads", "1", "--dtype", "float32"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(arch="llama", preset="tiny", out=tmp_path_factory.mktemp("svc") / "tiny-llama", seed=3)


@pytest.fixture(scope="module")
def shm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared-memory directory of the module's cluster (any directory works; /dev/shm is RAM)."""
    return tmp_path_factory.mktemp("shm")


@pytest.fixture(scope="module")
def cluster(model_dir: Path, shm_dir: Path):
    with LocalCluster(model_dir, decode_replicas=2, engine_args=[*ENGINE_ARGS, "--max-queue", "64", "--kv-shm-dir", str(shm_dir)],
                      prefill_args=["--kv-shm-bytes", "4M"]) as c:
        yield c
        assert c.exited() == []  # nothing crashed during the tests
    assert list(shm_dir.iterdir()) == []  # arena and probes removed on shutdown


@pytest.fixture(scope="module")
def client(cluster: LocalCluster):
    with Client(cluster.target) as c:
        yield c


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Engine:
    return Engine.from_pretrained(model_dir, RuntimeConfig(batch_size=SLOTS, seq_len=SEQ_LEN, dtype="float32"))


def prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(n)
    return [torch.randint(4, 512, (int(length),), generator=gen).tolist() for length in torch.randint(3, 60, (n,), generator=gen)]


def loads(cluster: LocalCluster) -> list[decode_pb2.GetLoadResponse]:
    out = []
    for target in cluster.decode_targets:
        with grpc.insecure_channel(target) as ch:
            out.append(decode_pb2_grpc.DecodeStub(ch).GetLoad(decode_pb2.GetLoadRequest(), timeout=5))
    return out


def wait_all_free(cluster: LocalCluster, timeout: float = 10.0) -> list[decode_pb2.GetLoadResponse]:
    deadline = time.monotonic() + timeout
    while True:
        state = loads(cluster)
        if all(s.free_slots == s.total_slots and s.queued_requests == 0 for s in state) or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


@pytest.fixture(scope="module")
def hf_model(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:  # noqa: ANN001
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=2)
    return out[0, len(prompt):].tolist()


def test_greedy_single_request_equals_in_process_and_transformers(client: Client, engine: Engine, hf_model) -> None:  # noqa: ANN001
    prompt = prompts(1)[0]
    result = client.generate_text(prompt, max_new_tokens=20, ignore_eos=True)
    [local] = generate(engine, [prompt], stopping=StoppingCriteria(max_new_tokens=20, ignore_eos=True))
    assert result.output_ids == local.output_ids
    assert result.output_ids == hf_greedy(hf_model, prompt, 20)
    assert result.finish_reason == "length"
    assert result.usage.prompt_tokens == len(prompt) and result.usage.completion_tokens == 20


def test_sixteen_concurrent_requests_over_two_replicas(client: Client, cluster: LocalCluster, engine: Engine, hf_model) -> None:  # noqa: ANN001
    """Their KV goes through prefill's shared-memory arena (both services share --kv-shm-dir)."""
    batch = prompts(16)
    start = loads(cluster)
    before = [s.completed_requests for s in start]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: client.generate_text(p, max_new_tokens=24, ignore_eos=True), batch))
    local = generate(engine, batch, stopping=StoppingCriteria(max_new_tokens=24, ignore_eos=True))
    assert [r.output_ids for r in results] == [r.output_ids for r in local]
    assert [r.output_ids for r in results] == [hf_greedy(hf_model, p, 24) for p in batch]
    after = wait_all_free(cluster)
    served = [a.completed_requests - b for a, b in zip(after, before)]
    assert sum(served) == 16 and all(n > 0 for n in served)  # both replicas took requests
    assert all(s.free_slots == SLOTS for s in after)  # 16 requests > 8 slots, all completed, nothing leaked
    assert sum(a.shared_kv_requests - b.shared_kv_requests for a, b in zip(after, start)) == 16
    assert sum(a.chunked_kv_requests - b.chunked_kv_requests for a, b in zip(after, start)) == 0


def test_seeded_sampling_equals_in_process(client: Client, engine: Engine) -> None:
    batch = prompts(3)
    settings = [SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=s) for s in (1, 2, 3)]
    with ThreadPoolExecutor(3) as pool:
        remote = list(pool.map(
            lambda a: client.generate_text(a[0], max_new_tokens=16, ignore_eos=True, temperature=a[1].temperature,
                                           top_k=a[1].top_k, top_p=a[1].top_p, seed=a[1].seed),
            zip(batch, settings),
        ))
    local = generate(engine, batch, sampling=settings, stopping=StoppingCriteria(max_new_tokens=16, ignore_eos=True))
    assert [r.output_ids for r in remote] == [r.output_ids for r in local]


def test_text_stream_and_stop_strings(client: Client, engine: Engine) -> None:
    full = client.generate_text("Once upon a time", max_new_tokens=30, ignore_eos=True)
    chunks = list(client.generate("Once upon a time", max_new_tokens=30, ignore_eos=True))
    assert "".join(c.text for c in chunks) == full.text
    assert [t for c in chunks for t in c.token_ids] == full.output_ids
    assert chunks[0].prompt_token_ids == full.prompt_ids and chunks[-1].finish_reason == "length"
    stop = full.text[len(full.text) // 2:][:3]
    if stop.strip():
        stopped = client.generate_text("Once upon a time", max_new_tokens=30, ignore_eos=True, stop_strings=[stop])
        assert stopped.finish_reason == "stop"
        assert stopped.text == full.text[: full.text.index(stop)]


def test_request_joins_running_batch_without_waiting(client: Client, cluster: LocalCluster) -> None:
    long_prompt, short_prompt = prompts(2)
    streams = [client.generate(long_prompt, max_new_tokens=SEQ_LEN - len(long_prompt), ignore_eos=True) for _ in range(2)]
    for stream in streams:
        next(stream)
        next(stream)  # both long requests are decoding now
    short = client.generate_text(short_prompt, max_new_tokens=4, ignore_eos=True)
    assert short.finish_reason == "length" and len(short.output_ids) == 4
    remaining = [sum(1 for _ in stream) for stream in streams]
    assert all(n > 10 for n in remaining)  # the short request finished while both long ones still ran


def test_invalid_requests_get_precise_status(client: Client, cluster: LocalCluster) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.generate_text([5] * (SEQ_LEN + 1), max_new_tokens=4)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "largest context bucket (256 tokens)" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.generate_text([5, 512], max_new_tokens=4)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "out of range" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.generate_text("hi", temperature=1.0, top_k=1000)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_k=1000" in err.value.details()


def test_cancel_and_deadline_free_the_decode_slot(cluster: LocalCluster) -> None:
    with grpc.insecure_channel(cluster.target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), stopping=pb.StoppingParameters(max_new_tokens=250, ignore_eos=True))
        stream = stub.Generate(request)
        next(stream)
        next(stream)
        assert any(s.free_slots < s.total_slots for s in loads(cluster))
        stream.cancel()
        assert all(s.free_slots == SLOTS for s in wait_all_free(cluster))

        received = 0
        with pytest.raises(grpc.RpcError) as err:
            for message in stub.Generate(request, timeout=0.25):  # expires mid-decode: 250 steps take longer
                received += len(message.token_ids)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and 0 < received < 250
        assert all(s.free_slots == SLOTS for s in wait_all_free(cluster))


def test_model_info_and_tokenize(client: Client) -> None:
    info = client.model_info()
    assert info["architecture"] == "llama" and info["max_total_tokens"] == SEQ_LEN and info["decode_replicas"] == 2
    assert info["decode_replicas_up"] == 2
    assert client.tokenize("Hello", add_special_tokens=True)[0] == 0  # bos


def _header(cluster: LocalCluster, engine: Engine, **changes) -> decode_pb2.DecodeRequest:
    fp = decode_pb2.ModelFingerprint(digest=engine.fingerprint, architecture="llama", dtype="float32")
    layout = decode_pb2.KvLayout(num_layers=2, num_kv_heads=2, head_dim=16, n_tokens=3, dtype="float32")
    header = decode_pb2.DecodeHeader(request_id="t", prompt_token_ids=[5, 6, 7], first_token=9, fingerprint=fp, layout=layout,
                                     stopping=pb.StoppingParameters(max_new_tokens=4))
    for key, value in changes.items():
        getattr(header, key).CopyFrom(value)
    return decode_pb2.DecodeRequest(header=header)


def test_decode_refuses_other_model_and_corrupted_chunks(cluster: LocalCluster, engine: Engine) -> None:
    target = cluster.decode_targets[0]
    other = decode_pb2.ModelFingerprint(digest="0123456789abcdef", architecture="qwen3", dtype="float32")
    with grpc.insecure_channel(target) as ch:
        stub = decode_pb2_grpc.DecodeStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Decode(iter([_header(cluster, engine, fingerprint=other)]), timeout=10))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "qwen3/float32/0123456789abcdef" in err.value.details() and engine.fingerprint in err.value.details()

        data = bytes(2 * 2 * 2 * 3 * 16 * 4)
        bad = decode_pb2.KvChunk(layer_start=0, layer_end=2, token_start=0, token_end=3, data=data, crc32=zlib.crc32(data) ^ 1)
        messages = [_header(cluster, engine), decode_pb2.DecodeRequest(chunk=bad), decode_pb2.DecodeRequest(commit=decode_pb2.Commit())]
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Decode(iter(messages), timeout=10))
        assert err.value.code() == grpc.StatusCode.DATA_LOSS and "CRC-32" in err.value.details()

        good = decode_pb2.KvChunk(layer_start=0, layer_end=2, token_start=0, token_end=3, data=data, crc32=zlib.crc32(data))
        messages = [_header(cluster, engine), decode_pb2.DecodeRequest(chunk=good), decode_pb2.DecodeRequest(commit=decode_pb2.Commit())]
        kinds = [m.WhichOneof("kind") for m in stub.Decode(iter(messages), timeout=10)]
        assert kinds[0] == "ack" and kinds[-1] == "final"
    assert all(s.free_slots == SLOTS for s in wait_all_free(cluster))


def _header_only(stub: decode_pb2_grpc.DecodeStub, header: decode_pb2.DecodeRequest) -> grpc.RpcError:
    """Send `header` and keep the request side open, as a shared-memory sender does while it waits
    for the ack; the error the replica answers with."""
    answered = threading.Event()

    def requests():  # noqa: ANN202
        yield header
        answered.wait(10)

    try:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Decode(requests(), timeout=10))
    finally:
        answered.set()
    return err.value


def test_decode_refuses_shared_regions_it_cannot_or_must_not_read(cluster: LocalCluster, engine: Engine, shm_dir: Path) -> None:
    """A header naming a shared region is the whole request: the replica answers it without waiting
    for more messages (and ignores a commit an older sender still writes)."""
    region = decode_pb2.SharedKv(name="nxserve-kv-" + "0" * 32, offset=0, nbytes=2 * 2 * 2 * 3 * 16 * 4, crc32=0)
    commit = decode_pb2.DecodeRequest(commit=decode_pb2.Commit())
    with grpc.insecure_channel(cluster.decode_targets[0]) as ch:
        stub = decode_pb2_grpc.DecodeStub(ch)
        err = _header_only(stub, _header(cluster, engine, shared_kv=region))  # no such arena: send chunks
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "send chunks" in err.details()
        assert is_shm_unreadable(err.trailing_metadata())
        with pytest.raises(grpc.RpcError) as old_sender:
            list(stub.Decode(iter([_header(cluster, engine, shared_kv=region), commit]), timeout=10))
        assert old_sender.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        outside = decode_pb2.SharedKv(name="../../etc/passwd", offset=0, nbytes=region.nbytes)
        err = _header_only(stub, _header(cluster, engine, shared_kv=outside))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "nxserve-kv-<32 hex digits>" in err.details()
        assert not is_shm_unreadable(err.trailing_metadata())

        arena = KVArena(shm_dir, 1 << 16)  # a real region whose bytes no longer match the CRC-32 the header gives
        try:
            kv = KVSnapshot(keys=torch.randn(2, 2, 3, 16), values=torch.randn(2, 2, 3, 16))
            good = arena.put([kv])
            corrupted = decode_pb2.SharedKv(name=good.name, offset=good.offset, nbytes=good.nbytes, crc32=good.crc32 ^ 1)
            err = _header_only(stub, _header(cluster, engine, shared_kv=corrupted))
            assert err.code() == grpc.StatusCode.DATA_LOSS and "CRC-32" in err.details()
        finally:
            arena.close()
    assert all(s.free_slots == SLOTS for s in wait_all_free(cluster))


def test_kv_goes_as_chunks_where_the_directory_is_not_shared(model_dir: Path, engine: Engine, tmp_path: Path) -> None:
    """Prefill and decode with different --kv-shm-dir: chunks. Then prefill is made to see the
    replica's probe (as if the directory were shared) though the replica cannot open prefill's
    arena: the replica answers FAILED_PRECONDITION + SHM_UNREADABLE and prefill resends as chunks,
    for that request and the next."""
    theirs, ours = tmp_path / "decode-shm", tmp_path / "prefill-shm"
    theirs.mkdir(), ours.mkdir()
    batch = prompts(3)
    expected = [r.output_ids for r in generate(engine, batch, stopping=StoppingCriteria(max_new_tokens=6, ignore_eos=True))]
    with LocalCluster(model_dir, decode_replicas=1, engine_args=ENGINE_ARGS, decode_args=["--kv-shm-dir", str(theirs)],
                      prefill_args=["--kv-shm-dir", str(ours), "--kv-shm-bytes", "1M"]) as c, Client(c.target) as client:
        assert client.generate_text(batch[0], max_new_tokens=6, ignore_eos=True).output_ids == expected[0]
        [load] = loads(c)
        assert (load.shared_kv_requests, load.chunked_kv_requests) == (0, 1) and load.shm_probe
        (ours / load.shm_probe).touch()  # prefill now believes it shares the replica's directory
        time.sleep(1.5)  # the router's next GetLoad round (every 0.5 s) sees it
        for prompt, want in zip(batch[1:], expected[1:]):
            assert client.generate_text(prompt, max_new_tokens=6, ignore_eos=True).output_ids == want
        [load] = loads(c)
        assert (load.shared_kv_requests, load.chunked_kv_requests) == (0, 3)
        log = c.services[-1].log_tail(200)
        assert "shared memory in" in log and "chunks over gRPC until it restarts" in log
        assert c.exited() == []


def test_a_rejected_stream_reports_the_replicas_status_to_a_sender_still_writing(cluster: LocalCluster, engine: Engine) -> None:
    """The replica rejects at the header but reads the stream to its commit before aborting: aborting
    while the sender still writes turns the status into INTERNAL on a grpc aio sender (grpc/grpc#36066)."""
    other = decode_pb2.ModelFingerprint(digest="0123456789abcdef", architecture="qwen3", dtype="float32")
    data = bytes(2 * 2 * 2 * 3 * 16 * 4)
    chunk = decode_pb2.DecodeRequest(chunk=decode_pb2.KvChunk(layer_start=0, layer_end=2, token_start=0, token_end=3,
                                                              data=data, crc32=zlib.crc32(data)))

    async def send() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(cluster.decode_targets[0]) as channel:
            call = DecodeStub(channel).Decode(timeout=10)
            await call.write(_header(cluster, engine, fingerprint=other))
            for _ in range(300):  # written as prefill writes its chunks, while the replica has already decided
                await call.write(chunk)
            await call.write(decode_pb2.DecodeRequest(commit=decode_pb2.Commit()))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            return err.value

    for _ in range(3):
        err = asyncio.run(send())
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "qwen3/float32/0123456789abcdef" in err.details()
    assert all(s.free_slots == SLOTS for s in wait_all_free(cluster))


def test_reflection_lists_services(cluster: LocalCluster) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    for target, name in [(cluster.target, "nxserve.v1.Generation"), (cluster.decode_targets[0], "nxserve.v1.Decode")]:
        with grpc.insecure_channel(target) as ch:
            services = ProtoReflectionDescriptorDatabase(ch).get_services()
        assert name in services and "grpc.health.v1.Health" in services


@pytest.mark.parametrize("method", ["ngram", "draft", "draft-decode-only"])
def test_speculative_decoding_through_services_keeps_greedy_output(model_dir: Path, engine: Engine, method: str) -> None:
    spec = "ngram" if method == "ngram" else f"draft:{model_dir}"  # a draft equal to the target accepts everything
    flags = ["--speculation", spec, "--speculation-length", "3"]
    # draft-decode-only: prefill sends no draft KV, so the decode replica encodes the prompt with its draft itself.
    shared, decode_only = (ENGINE_ARGS, flags) if method == "draft-decode-only" else ([*ENGINE_ARGS, *flags], [])
    batch = prompts(4) + [[9, 10, 11, 12] * 5]
    local = generate(engine, batch, stopping=StoppingCriteria(max_new_tokens=20, ignore_eos=True))
    with LocalCluster(model_dir, decode_replicas=1, engine_args=shared, decode_args=decode_only) as cluster, \
            Client(cluster.target) as client:
        with ThreadPoolExecutor(len(batch)) as pool:
            remote = list(pool.map(lambda p: client.generate_text(p, max_new_tokens=20, ignore_eos=True), batch))
        opted_out = client.generate_text(batch[0], max_new_tokens=20, ignore_eos=True, disable_speculation=True)
        state = wait_all_free(cluster)
    assert [r.output_ids for r in remote] == [r.output_ids for r in local]
    assert opted_out.output_ids == local[0].output_ids
    assert all(s.free_slots == s.total_slots for s in state)
    if method != "ngram":  # every proposal accepted: 4 tokens per step instead of 1
        assert state[0].steps < sum(len(r.output_ids) for r in remote) / 2
