"""The public API end to end: real prefill and decode processes on loopback, real gRPC, compared with
the in-process engine and transformers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from nxcore import Engine, SamplingParams, StoppingCriteria, generate
from nxserve.client import Client
from nxserve.cluster import LocalCluster, _free_ports
from nxserve.v1 import generation_pb2 as pb
from nxserve.v1 import generation_pb2_grpc
from tests.services import ENGINE_ARGS, SEQ_LEN, SLOTS, loads, prompts, sample, scrape, wait_all_free, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_model(svc_model: Path):
    return AutoModelForCausalLM.from_pretrained(svc_model).eval()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=2)
    return out[0, len(prompt) :].tolist()


def test_greedy_single_request_equals_in_process_and_transformers(client: Client, svc_engine: Engine, hf_model) -> None:
    prompt = prompts(1)[0]
    result = client.generate_text(prompt, max_new_tokens=20, ignore_eos=True)
    [local] = generate(svc_engine, [prompt], stopping=StoppingCriteria(max_new_tokens=20, ignore_eos=True))
    assert result.output_ids == local.output_ids
    assert result.output_ids == hf_greedy(hf_model, prompt, 20)
    assert result.finish_reason == "length"
    assert result.usage.prompt_tokens == len(prompt) and result.usage.completion_tokens == 20


def test_sixteen_concurrent_requests_over_two_replicas(client: Client, cluster: LocalCluster, svc_engine: Engine, hf_model) -> None:
    """Their KV goes through prefill's shared-memory arena (both services share --kv-shm-dir)."""
    batch = prompts(16)
    start = loads(cluster.decode_targets)
    before = [s.completed_requests for s in start]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: client.generate_text(p, max_new_tokens=24, ignore_eos=True), batch))
    local = generate(svc_engine, batch, stopping=StoppingCriteria(max_new_tokens=24, ignore_eos=True))
    assert [r.output_ids for r in results] == [r.output_ids for r in local]
    assert [r.output_ids for r in results] == [hf_greedy(hf_model, p, 24) for p in batch]
    after = wait_all_free(cluster)
    served = [a.completed_requests - b for a, b in zip(after, before)]
    assert sum(served) == 16 and all(n > 0 for n in served)  # both replicas took requests
    assert all(s.free_slots == SLOTS for s in after)  # 16 requests > 8 slots, all completed, nothing leaked
    assert sum(a.shared_kv_requests - b.shared_kv_requests for a, b in zip(after, start)) == 16
    assert sum(a.chunked_kv_requests - b.chunked_kv_requests for a, b in zip(after, start)) == 0


def test_seeded_sampling_equals_in_process(client: Client, svc_engine: Engine) -> None:
    batch = prompts(3)
    settings = [SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=s) for s in (1, 2, 3)]
    with ThreadPoolExecutor(3) as pool:
        remote = list(
            pool.map(
                lambda a: client.generate_text(
                    a[0], max_new_tokens=16, ignore_eos=True, temperature=a[1].temperature, top_k=a[1].top_k, top_p=a[1].top_p, seed=a[1].seed
                ),
                zip(batch, settings),
            )
        )
    local = generate(svc_engine, batch, sampling=settings, stopping=StoppingCriteria(max_new_tokens=16, ignore_eos=True))
    assert [r.output_ids for r in remote] == [r.output_ids for r in local]


def test_text_stream_and_stop_strings(client: Client, svc_engine: Engine) -> None:
    full = client.generate_text("Once upon a time", max_new_tokens=30, ignore_eos=True)
    chunks = list(client.generate("Once upon a time", max_new_tokens=30, ignore_eos=True))
    assert "".join(c.text for c in chunks) == full.text
    assert [t for c in chunks for t in c.token_ids] == full.output_ids
    assert chunks[0].prompt_token_ids == full.prompt_ids and chunks[-1].finish_reason == "length"
    stop = full.text[len(full.text) // 2 :][:3]
    if stop.strip():
        stopped = client.generate_text("Once upon a time", max_new_tokens=30, ignore_eos=True, stop_strings=[stop])
        assert stopped.finish_reason == "stop"
        assert stopped.text == full.text[: full.text.index(stop)]


def test_stream_interval_batches_the_streamed_tokens(client: Client, svc_engine: Engine) -> None:
    """A request's stream_interval: the first token at once, then at least 4 tokens a message but the
    last, the same tokens as one by one."""
    prompt = prompts(1)[0]
    [local] = generate(svc_engine, [prompt], stopping=StoppingCriteria(max_new_tokens=18, ignore_eos=True))
    chunks = list(client.generate(prompt, max_new_tokens=18, ignore_eos=True, stream_interval=4))
    assert [t for c in chunks for t in c.token_ids] == local.output_ids
    sizes = [len(c.token_ids) for c in chunks]
    body = [n for n in sizes[1:] if n]
    assert sizes[0] == 1 and all(n >= 4 for n in body[:-1]) and len(body) <= 5, sizes  # 17 decoded: 4, 4, 4, 4, 1 at most


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
        assert any(s.free_slots < s.total_slots for s in loads(cluster.decode_targets))
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


def test_kv_goes_as_chunks_where_the_directory_is_not_shared(svc_model: Path, svc_engine: Engine, tmp_path: Path) -> None:
    """Prefill and decode with different --kv-shm-dir: chunks. Then prefill is made to see the
    replica's probe (as if the directory were shared) though the replica cannot open prefill's
    arena: the replica answers FAILED_PRECONDITION + SHM_UNREADABLE and prefill resends as chunks,
    for that request and the next."""
    theirs, ours = tmp_path / "decode-shm", tmp_path / "prefill-shm"
    theirs.mkdir(), ours.mkdir()
    batch = prompts(3)
    expected = [r.output_ids for r in generate(svc_engine, batch, stopping=StoppingCriteria(max_new_tokens=6, ignore_eos=True))]
    with (
        LocalCluster(
            svc_model,
            decode_replicas=1,
            engine_args=ENGINE_ARGS,
            decode_args=["--kv-shm-dir", str(theirs)],
            prefill_args=["--kv-shm-dir", str(ours), "--kv-shm-bytes", "1M"],
        ) as c,
        Client(c.target) as client,
    ):
        assert client.generate_text(batch[0], max_new_tokens=6, ignore_eos=True).output_ids == expected[0]
        [load] = loads(c.decode_targets)
        assert (load.shared_kv_requests, load.chunked_kv_requests) == (0, 1) and load.shm_probe
        (ours / load.shm_probe).mkdir()  # prefill now believes it shares the replica's directory
        (ours / load.shm_probe / "probe").touch()
        wait_until(lambda: "shared memory in" in c.services[-1].log_tail(200), what="the router seeing the probe")
        for prompt, want in zip(batch[1:], expected[1:]):
            assert client.generate_text(prompt, max_new_tokens=6, ignore_eos=True).output_ids == want
        [load] = loads(c.decode_targets)
        assert (load.shared_kv_requests, load.chunked_kv_requests) == (0, 3)
        log = c.services[-1].log_tail(200)
        assert "shared memory in" in log and "chunks over gRPC until it restarts" in log
        assert c.exited() == []


@pytest.mark.parametrize("method", ["ngram", "draft", "draft-decode-only"])
def test_speculative_decoding_through_services_keeps_greedy_output(svc_model: Path, svc_engine: Engine, method: str) -> None:
    spec = "ngram" if method == "ngram" else f"draft:{svc_model}"  # a draft equal to the target accepts everything
    flags = ["--speculation", spec, "--speculation-length", "3"]
    # draft-decode-only: prefill sends no draft KV, so the decode replica encodes the prompt with its draft itself.
    shared, decode_only = (ENGINE_ARGS, flags) if method == "draft-decode-only" else ([*ENGINE_ARGS, *flags], [])
    batch = [*prompts(4), [9, 10, 11, 12] * 5]
    local = generate(svc_engine, batch, stopping=StoppingCriteria(max_new_tokens=20, ignore_eos=True))
    metrics_port = _free_ports(1)[0]
    cluster = LocalCluster(svc_model, decode_replicas=1, engine_args=shared, decode_args=decode_only, metrics_port=metrics_port)
    with cluster, Client(cluster.target) as client:
        with ThreadPoolExecutor(len(batch)) as pool:
            remote = list(pool.map(lambda p: client.generate_text(p, max_new_tokens=20, ignore_eos=True), batch))
        opted_out = client.generate_text(batch[0], max_new_tokens=20, ignore_eos=True, disable_speculation=True)
        state = wait_all_free(cluster)
        decode = scrape(cluster.metrics_ports()["decode-0"])
    proposed = sample(decode, "nxserve_speculation_proposed", "nxserve_speculation_proposed_total")
    accepted = sample(decode, "nxserve_speculation_accepted", "nxserve_speculation_accepted_total")
    assert proposed > 0 and 0 <= accepted <= proposed and proposed % 3 == 0  # rounds of --speculation-length 3
    assert [r.output_ids for r in remote] == [r.output_ids for r in local]
    assert opted_out.output_ids == local[0].output_ids
    assert all(s.free_slots == s.total_slots for s in state)
    if method != "ngram":  # every proposal accepted: 4 tokens per step instead of 1
        assert state[0].steps < sum(len(r.output_ids) for r in remote) / 2
        assert accepted >= 0.8 * proposed  # all but what max_new_tokens cut off
