"""The public API from another ecosystem: Node's @grpc/grpc-js, with stubs loaded from protos/ at
run time (not nxserve's), and `buf curl` finding the API through reflection v1 alone."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from nxserve.client import Client
from nxserve.cluster import LocalCluster
from tests.node import ROOT, buf, node_modules

pytestmark = pytest.mark.slow

GRPC_JS_CLIENT = r"""
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");
const [protos, target, request] = process.argv.slice(1);  // node -e: no script path in argv
const options = { includeDirs: [protos], keepCase: true, longs: Number, enums: String, defaults: true };
const definition = loader.loadSync(`${protos}/nxserve/v1/generation.proto`, options);
const v1 = grpc.loadPackageDefinition(definition).nxserve.v1;
const client = new v1.Generation(target, grpc.credentials.createInsecure());
const metadata = new grpc.Metadata();
metadata.set("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
const messages = [];
const call = client.Generate(JSON.parse(request), metadata, { deadline: Date.now() + 60000 });
call.on("data", (m) => messages.push(m));
call.on("error", (e) => { console.log(JSON.stringify({ code: e.code, details: e.details })); process.exit(0); });
call.on("end", () => { console.log(JSON.stringify({ messages })); process.exit(0); });
"""


def _node(target: str, request: dict) -> dict:
    modules = node_modules()
    done = subprocess.run(
        ["node", "-e", GRPC_JS_CLIENT, str(ROOT / "protos"), target, json.dumps(request)],
        env={"NODE_PATH": str(modules), "PATH": "/usr/bin:/bin:/usr/local/bin"},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_grpc_js_client_gets_the_same_tokens(cluster: LocalCluster, client: Client) -> None:
    prompt = [5, 17, 230, 41, 9]
    expected = client.generate_text(prompt, max_new_tokens=10, ignore_eos=True).output_ids
    out = _node(cluster.target, {"request_id": "node-1", "token_ids": {"ids": prompt}, "stopping": {"max_new_tokens": 10, "ignore_eos": True}})
    assert "messages" in out, out
    messages = out["messages"]
    assert [t for m in messages for t in m["token_ids"]] == expected
    assert {m["request_id"] for m in messages} == {"node-1"} and messages[0]["prompt_token_ids"] == prompt
    assert messages[-1]["finish_reason"] == "FINISH_REASON_LENGTH" and messages[-1]["usage"]["completion_tokens"] == 10

    refused = _node(cluster.target, {"token_ids": {"ids": prompt}, "sampling": {"temperature": -1}})
    assert refused["code"] == 3 and "temperature" in refused["details"]  # INVALID_ARGUMENT, saying which field


def test_buf_curl_through_reflection_v1(cluster: LocalCluster) -> None:
    """buf curl asks the server for the schema with grpc.reflection.v1 only, and calls with it."""
    for target, method, body in [
        (cluster.target, "nxserve.v1.Generation/ModelInfo", "{}"),
        (cluster.target, "nxserve.v1.Generation/Tokenize", '{"text": "hello"}'),
        (cluster.decode_targets[0], "grpc.health.v1.Health/Check", "{}"),
    ]:
        done = subprocess.run(
            [
                buf(),
                "curl",
                "--protocol",
                "grpc",
                "--http2-prior-knowledge",
                "--reflect",
                "--reflect-protocol",
                "grpc-v1",
                "-d",
                body,
                f"http://{target}/{method}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=Path("/"),
        )
        assert done.returncode == 0, (method, done.stderr)
        answer = json.loads(done.stdout)
        if method.endswith("ModelInfo"):
            assert answer["model"] == Path(cluster.model_dir).name and answer["architecture"] == "llama"
        elif method.endswith("Check"):
            assert answer["status"] == "SERVING"
        else:
            assert answer["tokenIds"]
