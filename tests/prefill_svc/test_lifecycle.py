"""Service lifecycle end to end: graceful SIGTERM, full queues, a lost replica, replicas of another
model, TP on either side, and one trace across client, prefill and decode (exported over real OTLP)."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from nxserve.client import Client
from nxserve.cluster import ClusterError, LocalCluster, _free_ports
from nxserve.testing.model_factory import make_model
from tests.services import wait_until

pytestmark = pytest.mark.slow

ENGINE_ARGS = ["--seq-len", "256", "--batch-size", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(arch="qwen3", preset="tiny", out=tmp_path_factory.mktemp("life") / "tiny-qwen3", seed=5)


def test_full_decode_queue_is_resource_exhausted_and_cluster_stops_cleanly(model_dir: Path) -> None:
    cluster = LocalCluster(model_dir, decode_replicas=1, engine_args=[*ENGINE_ARGS, "--max-queue", "0"])
    before = set(Path(tempfile.gettempdir()).glob("nxserve-cluster-*"))
    cluster.openmp_threads()
    assert set(Path(tempfile.gettempdir()).glob("nxserve-cluster-*")) == before  # a cluster never started leaves no folder
    cluster.start()
    log_dir = cluster.log_dir
    assert (log_dir / "prefill.log").is_file() and (log_dir / "decode-0.log").is_file()
    for name in ("prefill.log", "decode-0.log"):  # started, each froze its start-up heap (nxserve.rpc.gcheap)
        assert "start-up objects out of the garbage collector's walks" in (log_dir / name).read_text()
    try:
        with Client(cluster.target) as client:
            stream = client.generate([5, 6, 7], max_new_tokens=240, ignore_eos=True)
            next(stream)
            next(stream)  # the only slot is taken
            with pytest.raises(grpc.RpcError) as err:
                client.generate_text([8, 9], max_new_tokens=4)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue=0" in err.value.details()
            assert sum(len(c.token_ids) for c in stream) > 0  # the running request is unaffected
    finally:
        cluster.stop(grace=10)
    assert [s.process.returncode for s in cluster.services] == [0, 0]
    assert not log_dir.exists()  # a clean stop removes the temporary logs


def test_sigterm_lets_running_requests_finish(model_dir: Path) -> None:
    cluster = LocalCluster(model_dir, decode_replicas=1, engine_args=ENGINE_ARGS).start()
    try:
        with Client(cluster.target) as client:
            stream = client.generate([5, 6, 7], max_new_tokens=200, ignore_eos=True)
            received = len(next(stream).token_ids) + len(next(stream).token_ids)
            for service in cluster.services:
                service.process.send_signal(signal.SIGTERM)
            chunks = list(stream)
        assert received + sum(len(c.token_ids) for c in chunks) == 200 and chunks[-1].finish_reason == "length"
        for service in cluster.services:
            assert service.process.wait(timeout=30) == 0
    finally:
        cluster.stop(grace=5)


def test_prefill_refuses_decode_replicas_of_another_model(model_dir: Path, tmp_path: Path) -> None:
    other = make_model(arch="qwen3", preset="tiny", out=tmp_path / "other", seed=6)  # same shapes, other weights
    decode_port, prefill_port = _free_ports(2)
    common = [sys.executable, "-m"]
    procs = [
        subprocess.Popen(
            [*common, "decode_svc", "--model", str(other), "--port", str(decode_port), *ENGINE_ARGS],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    procs.append(
        subprocess.Popen(
            [*common, "prefill_svc", "--model", str(model_dir), "--port", str(prefill_port), "--decode", f"127.0.0.1:{decode_port}", *ENGINE_ARGS],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    try:
        with Client(f"127.0.0.1:{prefill_port}") as client:

            def refused() -> grpc.RpcError | None:  # UNAVAILABLE while the services start
                with pytest.raises(grpc.RpcError) as err:
                    client.generate_text([5, 6, 7], max_new_tokens=4, timeout=5)
                return err.value if err.value.code() != grpc.StatusCode.UNAVAILABLE else None

            error = wait_until(refused, timeout=60, what="a refusal other than UNAVAILABLE")
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "serves model" in error.details()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(timeout=30) for proc in procs] == [0, 0]


def test_cluster_start_fails_while_prefill_cannot_route_to_its_replicas(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every service SERVING is not enough: a decode replica of another dtype (another model
    fingerprint) gets no requests, and the cluster says so at start rather than at the first one."""
    monkeypatch.setattr("nxserve.cluster.ROUTE_WAIT_S", 3.0)
    cluster = LocalCluster(model_dir, decode_replicas=1, engine_args=ENGINE_ARGS, decode_args=["--dtype", "bfloat16"])
    with pytest.raises(ClusterError, match=r"prefill routes to 0 of 1 decode replicas(.|\n)*serves model"):
        cluster.start()
    assert all(code is not None for _, code in cluster.exited()) and len(cluster.exited()) == 2


def test_lost_decode_replica_is_skipped(model_dir: Path, tmp_path: Path) -> None:
    with (
        LocalCluster(model_dir, decode_replicas=2, engine_args=ENGINE_ARGS, log_dir=tmp_path) as cluster,
        Client(cluster.target) as client,
    ):
        assert client.model_info()["decode_replicas_up"] == 2  # the cluster is up once prefill routes to both
        cluster.services[0].process.kill()
        cluster.services[0].process.wait()
        wait_until(lambda: client.model_info()["decode_replicas_up"] == 1, what="prefill dropping the killed replica")
        for _ in range(4):
            result = client.generate_text([5, 6, 7], max_new_tokens=8, ignore_eos=True)
            assert len(result.output_ids) == 8
    assert (tmp_path / "decode-0.log").stat().st_size > 0 and (tmp_path / "prefill.log").stat().st_size > 0  # a given log_dir stays


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace endpoint that keeps what it receives."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, bytes]] = []  # (service.name, span name, trace id)
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                for ss in rs.scope_spans:
                    self.spans.extend((service, s.name, s.trace_id) for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_one_trace_spans_client_prefill_and_decode(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    receiver = _Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    tracer = TracerProvider().get_tracer("test-client")
    try:
        with LocalCluster(model_dir, decode_replicas=1, engine_args=ENGINE_ARGS) as cluster, Client(cluster.target) as client:
            with tracer.start_as_current_span("client-request") as span:
                client.generate_text("Hello there", max_new_tokens=6, ignore_eos=True)
            trace_id = span.get_span_context().trace_id.to_bytes(16, "big")
        # stop() sent SIGTERM: each service flushed its spans before exiting.
        expected = {("nxserve-prefill", n) for n in ("generate", "queue", "context_encoding", "kv_transfer", "decoding")}
        expected |= {("nxserve-decode", n) for n in ("decode", "kv_receive")}

        def ours() -> set[tuple[str, str]]:
            with receiver.lock:
                return {(svc, name) for svc, name, tid in receiver.spans if tid == trace_id}

        wait_until(lambda: expected <= ours(), what=f"spans {sorted(expected)} with the client's trace id")
    finally:
        server.stop(0)


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 1), (1, 2)])
def test_kv_hand_off_between_tp_degrees(model_dir: Path, prefill_tp: int, decode_tp: int) -> None:
    from nxcore import Engine, RuntimeConfig, StoppingCriteria, generate

    prompts = [[5, 6, 7, 8, 9], list(range(10, 40))]
    engine = Engine.from_pretrained(model_dir, RuntimeConfig(batch_size=2, seq_len=256))
    expected = [r.output_ids for r in generate(engine, prompts, stopping=StoppingCriteria(max_new_tokens=12, ignore_eos=True))]
    args = ["--seq-len", "256", "--batch-size", "2"]
    with (
        LocalCluster(
            model_dir, decode_replicas=1, engine_args=args, prefill_args=["--tp", str(prefill_tp)], decode_args=["--tp", str(decode_tp)]
        ) as cluster,
        Client(cluster.target) as client,
    ):
        got = [client.generate_text(p, max_new_tokens=12, ignore_eos=True).output_ids for p in prompts]
    assert got == expected


@pytest.mark.parametrize(
    ("arch", "prefill_args", "decode_args"),
    [
        ("mixtral", ["--tp", "1"], ["--tp", "2", "--ep", "2"]),
        ("qwen3_moe", ["--tp", "2"], ["--tp", "1"]),
    ],
)
def test_moe_through_services_matches_transformers(tmp_path: Path, arch: str, prefill_args: list[str], decode_args: list[str]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = make_model(arch=arch, preset="tiny", out=tmp_path / arch, seed=2)
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = [[5, 6, 7, 8], list(range(20, 45))]
    args = ["--seq-len", "128", "--batch-size", "2"]
    with (
        LocalCluster(model_dir, decode_replicas=1, engine_args=args, prefill_args=prefill_args, decode_args=decode_args) as cluster,
        Client(cluster.target) as client,
    ):
        got = [client.generate_text(p, max_new_tokens=10, ignore_eos=True).output_ids for p in prompts]
    for prompt, output in zip(prompts, got):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=2)
        assert output == ref[0, len(prompt) :].tolist()
