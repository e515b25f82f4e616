"""Forged Decode streams (what a caller that reaches decode's internal API without mTLS could send):
each refused at its header with a precise code before any KV is read or memory is reserved, the
replica's memory flat, its slots free, and arbitrary headers and chunks (hypothesis) never UNKNOWN."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nxcore import Engine
from nxserve.cluster import LocalCluster
from nxserve.v1 import decode_pb2, decode_pb2_grpc
from tests.decode_svc.test_server import COMMIT, KV_BYTES, _header
from tests.services import SEQ_LEN, SLOTS, wait_all_free

pytestmark = pytest.mark.slow

INVALID, MISMATCH, LOSS = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DATA_LOSS


def _forged(engine: Engine, **changes) -> decode_pb2.DecodeRequest:
    """A header valid in every field but those changed (scalars and repeated fields set, messages merged)."""
    request = _header(engine)
    header = request.header
    for name, value in changes.items():
        target, _, leaf = name.rpartition(".")
        message = header
        for part in filter(None, target.split(".")):
            message = getattr(message, part)
        field = getattr(message, leaf)
        if isinstance(value, list):
            del field[:]
            field.extend(value)
        elif hasattr(field, "CopyFrom"):
            field.CopyFrom(value)
        else:
            setattr(message, leaf, value)
    return request


def _cases(engine: Engine) -> list[tuple[str, decode_pb2.DecodeRequest, grpc.StatusCode, str]]:
    huge = decode_pb2.KvLayout(num_layers=100000, num_kv_heads=1000, head_dim=1000, n_tokens=3, dtype="float32")
    return [
        ("first_token outside the vocabulary", _forged(engine, first_token=100000), INVALID, "first_token"),
        ("temperature nan", _forged(engine, **{"sampling.temperature": math.nan}), INVALID, "sampling.temperature=nan"),
        ("top_k above max_topk", _forged(engine, **{"sampling.top_k": 100000}), INVALID, "sampling.top_k"),
        ("rng_offset 2^32-1", _forged(engine, rng_offset=2**32 - 1), INVALID, "rng_offset"),
        ("stream_interval 2^32-1", _forged(engine, stream_interval=2**32 - 1), INVALID, "stream_interval=4294967295"),
        ("a 1 MB request_id", _forged(engine, request_id="r" * (1 << 20)), INVALID, "request_id"),
        ("prompt ids outside the vocabulary", _forged(engine, prompt_token_ids=[5, 6, 100000]), INVALID, "prompt_token_ids"),
        ("an empty prompt", _forged(engine, prompt_token_ids=[]), INVALID, "prompt of 0 tokens"),
        ("a prompt filling seq_len", _forged(engine, prompt_token_ids=[5] * SEQ_LEN), INVALID, f"allowed 1..{SEQ_LEN - 1}"),
        ("a layout of another shape", _forged(engine, **{"layout.head_dim": 32}), MISMATCH, "KV layout"),
        ("KV for 4 tokens and a prompt of 3", _forged(engine, **{"layout.n_tokens": 4}), MISMATCH, "KV layout"),
        ("a huge draft layout", _forged(engine, draft_layout=huge), MISMATCH, "no draft model"),
        ("17 stop strings", _forged(engine, **{"stopping.stop_strings": ["x"] * 17}), INVALID, "stop_strings has 17"),
        ("another model", _forged(engine, **{"fingerprint.digest": "0" * 16}), MISMATCH, "fingerprint mismatch"),
    ]


def _send(stub: decode_pb2_grpc.DecodeStub, messages: list) -> tuple[grpc.StatusCode, str]:
    try:
        list(stub.Decode(iter(messages), timeout=30))
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def _rss_mb(pid: int) -> float:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024


def test_forged_headers_are_refused_at_the_header_and_memory_stays_flat(cluster: LocalCluster, svc_engine: Engine) -> None:
    decode = cluster.services[0]
    with grpc.insecure_channel(cluster.decode_targets[0], options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = decode_pb2_grpc.DecodeStub(channel)
        for case, header, code, detail in _cases(svc_engine):  # each also followed by a commit, as a sender would write
            got, details = _send(stub, [header, COMMIT])
            assert (got, detail in details) == (code, True), (case, got, details[:200])
        before = _rss_mb(decode.process.pid)
        for _ in range(40):
            for header in (_forged(svc_engine, rng_offset=2**32 - 1), _forged(svc_engine, **{"layout.num_layers": 100000})):
                assert _send(stub, [header, COMMIT])[0] in (INVALID, MISMATCH)
        after = _rss_mb(decode.process.pid)
        data = bytes(KV_BYTES)
        bad_set = decode_pb2.DecodeRequest(
            chunk=decode_pb2.KvChunk(layer_start=0, layer_end=2, token_start=0, token_end=3, data=data, crc32=zlib.crc32(data), kv_set=5)
        )
        assert _send(stub, [_header(svc_engine), bad_set, COMMIT])[0] == LOSS
    assert after - before < 20, f"decode grew from {before:.0f} to {after:.0f} MB under 80 forged headers"
    assert all(s.free_slots == SLOTS for s in wait_all_free(cluster))


fields = st.fixed_dictionaries(
    {
        "first_token": st.integers(0, 2**32 - 1),
        "rng_offset": st.integers(0, 2**32 - 1),
        "stream_interval": st.integers(0, 2**32 - 1),
        "request_id": st.text(max_size=50),
        "prompt_token_ids": st.lists(st.integers(0, 600), max_size=12),
        "sampling.temperature": st.floats(width=32),
        "sampling.top_p": st.floats(width=32),
        "sampling.top_k": st.integers(0, 2**32 - 1),
        "layout.n_tokens": st.integers(0, 20),
        "stopping.max_new_tokens": st.integers(0, 3),
    }
)
chunks = st.lists(
    st.builds(
        lambda l0, l1, t0, t1, data, crc, kv: _chunk_of(l0, l1, t0, t1, data, crc, kv),
        st.integers(0, 3),
        st.integers(0, 3),
        st.integers(0, 4),
        st.integers(0, 4),
        st.binary(max_size=900),
        st.booleans(),
        st.integers(0, 2),
    ),
    max_size=3,
)


def _chunk_of(l0: int, l1: int, t0: int, t1: int, data: bytes, good_crc: bool, kv_set: int) -> decode_pb2.DecodeRequest:
    crc = zlib.crc32(data) if good_crc else zlib.crc32(data) ^ 1
    return decode_pb2.DecodeRequest(
        chunk=decode_pb2.KvChunk(layer_start=l0, layer_end=l1, token_start=t0, token_end=t1, data=data, crc32=crc, kv_set=kv_set)
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(changes=fields, body=chunks, commit=st.booleans(), raw=st.one_of(st.none(), st.binary(max_size=64)))
def test_arbitrary_headers_and_chunks_never_get_unknown_or_internal(
    cluster: LocalCluster, svc_engine: Engine, changes: dict, body: list, commit: bool, raw: bytes | None
) -> None:
    messages: list = [_forged(svc_engine, **changes), *body, *([COMMIT] if commit else [])]
    if raw is not None:
        messages = [raw]
    with grpc.insecure_channel(cluster.decode_targets[1]) as channel:
        identity = lambda b: b  # noqa: E731
        call = channel.stream_stream("/nxserve.v1.Decode/Decode", request_serializer=identity, response_deserializer=identity)
        try:
            list(call(iter(m if isinstance(m, bytes) else m.SerializeToString() for m in messages), timeout=30))
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
    assert code in (grpc.StatusCode.OK, INVALID, MISMATCH, LOSS), code


def test_after_the_arbitrary_streams_nothing_leaked(cluster: LocalCluster) -> None:
    assert all(s.free_slots == SLOTS and s.queued_requests == 0 for s in wait_all_free(cluster))
    assert cluster.exited() == []
    with cluster.client() as client:
        assert client.generate_text([5, 6, 7], max_new_tokens=3, ignore_eos=True).finish_reason == "length"
