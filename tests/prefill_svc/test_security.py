"""A cluster with TLS on every service, mTLS between prefill and decode and API keys on the public
API (`nxserve up --tls --api-keys-file`'s set-up): the tokens are those of plaintext, and every
caller without the right credentials is refused with the right code."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nxcore import Engine, StoppingCriteria, generate
from nxserve.client import Client
from nxserve.cluster import LocalCluster, _free_ports
from nxserve.pki import CA, ClusterTLS
from nxserve.v1 import decode_pb2, decode_pb2_grpc
from tests.services import ENGINE_ARGS, prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def secured(svc_model: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tls")
    keys = root / "keys"
    keys.write_text("key-one\nkey-two\n")
    tls = ClusterTLS.create(root / "pki")
    health_port = _free_ports(1)[0]
    with LocalCluster(
        svc_model,
        decode_replicas=1,
        engine_args=ENGINE_ARGS,
        tls=tls,
        api_key="key-one",
        prefill_args=["--api-keys-file", str(keys), "--health-port", str(health_port)],
    ) as cluster:
        cluster.health_port = health_port  # type: ignore[attr-defined]
        yield cluster, root


def test_tokens_over_tls_and_mtls_equal_plaintexts(secured, svc_engine: Engine) -> None:
    cluster, _ = secured
    batch = prompts(3)
    expected = generate(svc_engine, batch, stopping=StoppingCriteria(max_new_tokens=12, ignore_eos=True))
    with cluster.client() as client:
        got = [client.generate_text(p, max_new_tokens=12, ignore_eos=True).output_ids for p in batch]
    assert got == [r.output_ids for r in expected]


def test_callers_without_the_right_key_or_ca_are_refused(secured) -> None:
    cluster, root = secured
    for key in (None, "wrong-key"):
        with Client(cluster.target, tls_ca=cluster.tls.ca, api_key=key) as client, pytest.raises(grpc.RpcError) as err:
            client.generate_text([5, 6, 7], max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with Client(cluster.target, tls_ca=cluster.tls.ca, api_key="key-two") as client:
        assert client.model_info()["decode_replicas_up"] == 1
    other = CA.create(root / "other", name="someone else's CA")
    with Client(cluster.target, tls_ca=other.cert, api_key="key-one") as client, pytest.raises(grpc.RpcError) as err:
        client.model_info(timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails: the server is not trusted
    with Client(cluster.target, api_key="key-one") as client, pytest.raises(grpc.RpcError) as err:
        client.model_info(timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
    credentials = grpc.ssl_channel_credentials(cluster.tls.ca.read_bytes())
    with grpc.secure_channel(cluster.target, credentials) as channel:  # probes need no key
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="nxserve.v1.Generation"), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_health_port_answers_health_alone(secured) -> None:
    """--health-port: Kubernetes' gRPC probes (plaintext) see the TLS service's health, and nothing else."""
    cluster, _ = secured
    with grpc.insecure_channel(f"127.0.0.1:{cluster.health_port}") as channel:
        for service in ("", "nxserve.v1.Generation"):
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
    with Client(f"127.0.0.1:{cluster.health_port}", api_key="key-one") as client, pytest.raises(grpc.RpcError) as err:
        client.model_info(timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_only_a_client_certificate_from_the_cluster_ca_reaches_decode(secured) -> None:
    cluster, root = secured
    tls = cluster.tls
    ca = tls.ca.read_bytes()
    other = CA.create(root / "other-ca", name="another CA").issue(root / "stranger", "stranger", client=True)

    def get_load(key: Path | None, cert: Path | None) -> grpc.StatusCode:
        credentials = grpc.ssl_channel_credentials(ca, key.read_bytes() if key else None, cert.read_bytes() if cert else None)
        with grpc.secure_channel(cluster.decode_targets[0], credentials) as channel:
            try:
                decode_pb2_grpc.DecodeStub(channel).GetLoad(decode_pb2.GetLoadRequest(), timeout=5)
                return grpc.StatusCode.OK
            except grpc.RpcError as exc:
                return exc.code()

    assert get_load(tls.client.key, tls.client.cert) == grpc.StatusCode.OK  # prefill's certificate
    assert get_load(None, None) == grpc.StatusCode.UNAVAILABLE
    assert get_load(other.key, other.cert) == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(cluster.decode_targets[0]) as channel, pytest.raises(grpc.RpcError) as err:
        decode_pb2_grpc.DecodeStub(channel).GetLoad(decode_pb2.GetLoadRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
