"""Hostile and careless input to the public API: every field out of bounds is refused with its
code and a message naming the field, while a stream already running goes on unchanged and every
service stays SERVING. Then a property-based pass (hypothesis) over arbitrary requests."""

from __future__ import annotations

import math
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nxcore import Engine, StoppingCriteria, generate
from nxserve.cluster import LocalCluster
from nxserve.v1 import generation_pb2 as pb
from tests.services import SEQ_LEN, SLOTS, prompts, wait_all_free

pytestmark = pytest.mark.slow

VOCAB = 512
PROMPT_BYTES = 32 * SEQ_LEN  # the default --max-prompt-bytes of this cluster
INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


def _request(**fields) -> pb.GenerateRequest:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), stopping=pb.StoppingParameters(max_new_tokens=2))
    for name, value in fields.items():
        target, _, leaf = name.rpartition(".")
        message = getattr(request, target) if target else request
        if leaf in ("ids", "stop_strings", "stop_token_ids"):
            getattr(message, leaf).extend(value)
        else:
            setattr(message, leaf, value)
    return request


def _raw(field: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (short payloads)."""
    return bytes([field << 3 | 2, len(payload)]) + payload


GENERATE_CASES: list[tuple[str, pb.GenerateRequest | bytes, grpc.StatusCode, str]] = [
    ("no prompt", pb.GenerateRequest(), INVALID, "no prompt"),
    ("empty token ids", pb.GenerateRequest(token_ids=pb.TokenIds()), INVALID, "prompt is empty"),
    ("token id outside the vocabulary", _request(**{"token_ids.ids": [VOCAB]}), INVALID, "out of range"),
    ("prompt longer than the largest bucket", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * (SEQ_LEN + 1))), INVALID, "largest context bucket"),
    ("text over --max-prompt-bytes", pb.GenerateRequest(text="a" * (PROMPT_BYTES + 1)), INVALID, "--max-prompt-bytes"),
    ("text over the message limit", pb.GenerateRequest(text="a" * (20 << 20)), EXHAUSTED, "larger than max"),
    ("temperature inf", _request(**{"sampling.temperature": math.inf}), INVALID, "sampling.temperature=inf"),
    ("temperature nan", _request(**{"sampling.temperature": math.nan}), INVALID, "sampling.temperature=nan"),
    ("temperature negative", _request(**{"sampling.temperature": -1.0}), INVALID, "sampling.temperature=-1"),
    ("top_p negative", _request(**{"sampling.top_p": -0.5}), INVALID, "sampling.top_p=-0.5"),
    ("top_p nan", _request(**{"sampling.top_p": math.nan}), INVALID, "sampling.top_p=nan"),
    ("top_p above 1", _request(**{"sampling.top_p": 1.5}), INVALID, "sampling.top_p=1.5"),
    ("top_k above max_topk", _request(**{"sampling.top_k": 1000}), INVALID, "sampling.top_k=1000"),
    ("request_id too long", _request(request_id="r" * 129), INVALID, "request_id of 129 bytes"),
    ("request_id with a newline", _request(request_id="forged\nlog line"), INVALID, "printable ASCII"),
    ("17 stop strings", _request(**{"stopping.stop_strings": ["x"] * 17}), INVALID, "stop_strings has 17"),
    ("a 257-byte stop string", _request(**{"stopping.stop_strings": ["x" * 257]}), INVALID, "stop_strings[0] of 257 bytes"),
    ("a stop token outside the vocabulary", _request(**{"stopping.stop_token_ids": [VOCAB + 3]}), INVALID, "stop_token_ids"),
    ("65 stop tokens", _request(**{"stopping.stop_token_ids": [3] * 65}), INVALID, "stop_token_ids has 65"),
    ("stream_interval 65537", _request(stream_interval=65537), INVALID, "stream_interval=65537 is invalid: allowed 0..65536"),
    ("invalid UTF-8 in the text", _raw(2, b"\xff\xfe bad"), INVALID, "malformed nxserve.v1.GenerateRequest"),
    ("not protobuf at all", b"\xff\xff\xff\xff\xff", INVALID, "malformed nxserve.v1.GenerateRequest"),
]

TOKENIZE_CASES: list[tuple[str, pb.TokenizeRequest | bytes, grpc.StatusCode, str]] = [
    ("text over --max-prompt-bytes", pb.TokenizeRequest(text="a" * (PROMPT_BYTES + 1)), INVALID, "--max-prompt-bytes"),
    ("invalid UTF-8", _raw(1, b"\xc3\x28"), INVALID, "malformed nxserve.v1.TokenizeRequest"),
]


def _raw_call(channel: grpc.Channel, method: str, streaming: bool):
    identity = lambda b: b  # noqa: E731
    make = channel.unary_stream if streaming else channel.unary_unary
    return make(f"/nxserve.v1.Generation/{method}", request_serializer=identity, response_deserializer=identity)


def _code(channel: grpc.Channel, method: str, request: object, *, streaming: bool) -> tuple[grpc.StatusCode, str]:
    data = request if isinstance(request, bytes) else request.SerializeToString()  # type: ignore[attr-defined]
    try:
        result = _raw_call(channel, method, streaming)(data, timeout=30)
        if streaming:
            list(result)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def _serving(cluster: LocalCluster) -> bool:
    for target, name in [(cluster.target, "nxserve.v1.Generation"), *[(t, "nxserve.v1.Decode") for t in cluster.decode_targets]]:
        with grpc.insecure_channel(target) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
        if status != health_pb2.HealthCheckResponse.SERVING:
            return False
    return True


def test_every_bad_field_is_refused_with_its_code_while_a_running_stream_goes_on(cluster: LocalCluster, svc_engine: Engine) -> None:
    prompt = prompts(1)[0]
    [expected] = generate(svc_engine, [prompt], stopping=StoppingCriteria(max_new_tokens=150, ignore_eos=True))
    received: list[int] = []
    client = cluster.client()
    stream = client.generate(prompt, max_new_tokens=150, ignore_eos=True)
    received.extend(next(stream).token_ids)  # running before the first bad request
    reader = threading.Thread(target=lambda: received.extend(t for chunk in stream for t in chunk.token_ids))
    reader.start()
    table = []
    with grpc.insecure_channel(cluster.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        for method, cases, streaming in (("Generate", GENERATE_CASES, True), ("Tokenize", TOKENIZE_CASES, False)):
            for case, request, code, detail in cases:
                got, details = _code(channel, method, request, streaming=streaming)
                table.append((method, case, got.name))
                assert (got, detail in details) == (code, True), (case, got, details)
    reader.join(timeout=60)
    client.close()
    assert received == expected.output_ids  # the stream that ran through all of it is unchanged
    assert _serving(cluster) and cluster.exited() == []
    assert all(s.free_slots == SLOTS for s in wait_all_free(cluster))
    print("\n".join(f"{m:9} {case:40} {code}" for m, case, code in table))


finite = st.floats(allow_nan=True, allow_infinity=True, width=32)
uint32 = st.integers(0, 2**32 - 1)
requests = st.builds(
    pb.GenerateRequest,
    request_id=st.one_of(st.just(""), st.text(max_size=200)),
    sampling=st.builds(pb.SamplingParameters, temperature=finite, top_k=uint32, top_p=finite, seed=st.one_of(st.none(), st.integers(0, 2**64 - 1))),
    stopping=st.builds(
        pb.StoppingParameters,
        max_new_tokens=st.one_of(st.integers(0, 4), uint32),
        stop_token_ids=st.lists(uint32, max_size=70),
        stop_strings=st.lists(st.text(max_size=300), max_size=20),
        ignore_eos=st.booleans(),
    ),
    disable_speculation=st.booleans(),
    stream_interval=st.one_of(st.integers(0, 8), uint32),
).flatmap(
    lambda r: st.one_of(
        st.builds(lambda text: _with(r, text=text), st.text(max_size=300)),
        st.builds(lambda ids: _with(r, ids=ids), st.lists(st.one_of(st.integers(0, VOCAB + 10), uint32), max_size=SEQ_LEN + 20)),
    )
)


def _with(request: pb.GenerateRequest, *, text: str | None = None, ids: list[int] | None = None) -> pb.GenerateRequest:
    out = pb.GenerateRequest()
    out.CopyFrom(request)
    if text is not None:
        out.text = text
    else:
        out.token_ids.ids.extend(ids or [])
    if out.stopping.max_new_tokens > 4:  # a long generation is allowed, but would only make the test slow
        out.stopping.max_new_tokens = 4
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=st.one_of(requests, st.binary(max_size=300)))
def test_arbitrary_requests_never_get_unknown_or_internal(cluster: LocalCluster, request: pb.GenerateRequest | bytes) -> None:
    with grpc.insecure_channel(cluster.target) as channel:
        code, details = _code(channel, "Generate", request, streaming=True)
    assert code in (grpc.StatusCode.OK, INVALID), (code, details)


def test_after_the_arbitrary_requests_nothing_leaked(cluster: LocalCluster) -> None:
    assert all(s.free_slots == SLOTS and s.queued_requests == 0 for s in wait_all_free(cluster))
    assert _serving(cluster) and cluster.exited() == []
