"""The decode service's life: NOT_SERVING while it loads, SERVING once warm, exit code 0 on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nxserve.cluster import _free_ports
from nxserve.testing.model_factory import make_model

pytestmark = pytest.mark.slow


def test_health_reports_not_serving_while_loading_then_serving_and_sigterm_exits_0(tmp_path: Path) -> None:
    model_dir = make_model(arch="qwen3", preset="tiny", out=tmp_path / "tiny-qwen3", seed=5)
    [port] = _free_ports(1)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "decode_svc",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--seq-len",
            "256",
            "--batch-size",
            "1",
            "--threads",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    seen: list[int] = []
    try:
        # Watch streams every status change from the moment the server answers: NOT_SERVING while
        # the model loads, then SERVING. Reconnect fast while the process starts.
        fast = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.min_reconnect_backoff_ms", 20), ("grpc.max_reconnect_backoff_ms", 50)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=fast) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service="nxserve.v1.Decode"), timeout=60, wait_for_ready=True)
            for update in watch:
                seen.append(update.status)
                if update.status == health_pb2.HealthCheckResponse.SERVING:
                    watch.cancel()
                    break
        assert seen[0] == health_pb2.HealthCheckResponse.NOT_SERVING
        assert seen[-1] == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()[-2000:]
