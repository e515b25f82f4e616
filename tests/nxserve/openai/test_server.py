"""The OpenAI gateway driven by the official `openai` client: completions and chat, streamed and not,
equal to `nxserve generate` (greedy and seeded), and each error with its HTTP status.

One cluster (prefill with two API keys, each allowed 2 calls in flight, and one decode replica)
and one gateway process serve the module."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from aiohttp import web
from transformers import AutoTokenizer

from nxserve import cli
from nxserve.client import AsyncClient
from nxserve.cluster import LocalCluster
from nxserve.openai.launch import GatewayProcess, free_port
from nxserve.openai.server import Gateway
from tests.services import ENGINE_ARGS

KEY, OTHER_KEY = "key-a", "key-b"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def gateway(svc_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"{KEY}\n{OTHER_KEY}\n")
    with (
        LocalCluster(
            svc_model,
            decode_replicas=1,
            engine_args=ENGINE_ARGS,
            prefill_args=["--api-keys-file", str(keys), "--max-inflight-per-key", "2"],
            api_key=KEY,
        ) as cluster,
        GatewayProcess(cluster.target, log_path=cluster.log_dir / "openai.log") as gw,
    ):
        yield gw
        assert gw.process is not None and gw.process.poll() is None
    assert gw.process.returncode == 0  # stopped cleanly on SIGTERM


@pytest.fixture(scope="module")
def api(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)


def http(url: str, body: dict | None = None, *, raw: bytes | None = None, key: str | None = None) -> tuple[int, dict]:
    """Status and JSON of a GET (or a POST of `body`, or of `raw` bytes), with `key` as Bearer when given."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def generate_cli(capsys: pytest.CaptureFixture[str], model: Path, *args: str) -> dict:
    """`nxserve generate --json` (in-process) with the services' engine flags."""
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(model), "--json", "--dtype", "float32", "--threads", "1", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_p": 0.9, "seed": 7}], ids=["greedy", "seeded"])
def test_completion_equals_nxserve_generate(api: openai.OpenAI, svc_model: Path, capsys: pytest.CaptureFixture[str], sampling: dict) -> None:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in sampling.items()]
    expected = generate_cli(capsys, svc_model, "--prompt", PROMPT, "--max-new-tokens", "12", "--ignore-eos", *flags)
    kwargs = {"model": svc_model.name, "prompt": PROMPT, "max_tokens": 12, "extra_body": {"ignore_eos": True}, "temperature": 0.0, **sampling}
    whole = api.completions.create(**kwargs)
    assert whole.choices[0].text == expected["text"] and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(expected["prompt_ids"]), 12)
    chunks = list(api.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected["text"]
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage == whole.usage


def test_stream_interval_sends_fewer_larger_chunks(api: openai.OpenAI, svc_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """vLLM's stream_interval extension: 12 tokens at 5 a message from decode come in at most 6
    chunks (the first token's, 5, 5, 1, the finish reason, one spare), against about one per token
    without it; the same text either way; values outside 1..65536 are 400."""
    expected = generate_cli(capsys, svc_model, "--prompt", PROMPT, "--max-new-tokens", "12", "--ignore-eos")
    kwargs = {"model": svc_model.name, "prompt": PROMPT, "max_tokens": 12, "temperature": 0.0, "stream": True}
    chunks = list(api.completions.create(**kwargs, extra_body={"ignore_eos": True, "stream_interval": 5}))
    singles = list(api.completions.create(**kwargs, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == "".join(c.choices[0].text for c in singles) == expected["text"]
    assert len(chunks) <= 6 < len(singles) and chunks[-1].choices[0].finish_reason == "length"
    for bad in (0, 65537, "4"):
        with pytest.raises(openai.BadRequestError, match="stream_interval"):
            api.completions.create(**kwargs, extra_body={"stream_interval": bad})


def test_chat_uses_the_chat_template(api: openai.OpenAI, svc_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ids = AutoTokenizer.from_pretrained(svc_model).apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = generate_cli(capsys, svc_model, "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", "10", "--ignore-eos")
    kwargs = {"model": svc_model.name, "messages": messages, "max_completion_tokens": 10, "temperature": 0, "extra_body": {"ignore_eos": True}}
    whole = api.chat.completions.create(**kwargs)
    assert whole.choices[0].message.content == expected["text"] and whole.choices[0].message.role == "assistant"
    assert whole.usage is not None and whole.usage.prompt_tokens == len(ids)
    chunks = list(api.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected["text"]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_gateway_froze_its_startup_heap(gateway: GatewayProcess) -> None:
    assert "start-up objects out of the garbage collector's walks" in gateway.log_path.read_text()  # nxserve.rpc.gcheap


def test_models_and_health(api: openai.OpenAI, gateway: GatewayProcess, svc_model: Path) -> None:
    assert [m.id for m in api.models.list().data] == [svc_model.name]
    assert http(f"http://127.0.0.1:{gateway.port}/health") == (200, {"status": "ok"})


def test_errors_map_to_http_statuses(api: openai.OpenAI, gateway: GatewayProcess, svc_model: Path) -> None:
    model = svc_model.name
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        api.completions.create(model=model, prompt="a", n=2)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        api.chat.completions.create(model=model, messages=[{"role": "user", "content": "a"}], logprobs=True)
    with pytest.raises(openai.BadRequestError, match="out of range"):  # refused by prefill: INVALID_ARGUMENT
        api.completions.create(model=model, prompt=[10**6])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        api.completions.create(model="no-such-model", prompt="a")
    with pytest.raises(openai.AuthenticationError):  # prefill's UNAUTHENTICATED, the key passed through
        openai.OpenAI(base_url=gateway.base_url, api_key="wrong", max_retries=0).completions.create(model=model, prompt="a")
    status, body = http(f"{gateway.base_url}/completions", {"prompt": "a"})  # no key at all
    assert status == 401 and body["error"]["type"] == "authentication_error"
    # Two streams in flight for OTHER_KEY (prefill's --max-inflight-per-key 2), a third is refused.
    other = openai.OpenAI(base_url=gateway.base_url, api_key=OTHER_KEY, max_retries=0)
    long = {"model": model, "prompt": "a", "max_tokens": 200, "stream": True, "extra_body": {"ignore_eos": True}}
    streams = [other.completions.create(**long) for _ in range(2)]
    try:
        with pytest.raises(openai.RateLimitError) as err:
            other.completions.create(model=model, prompt="a")
        assert err.value.response.headers["Retry-After"].isdigit()
    finally:
        for stream in streams:
            stream.close()


def test_hostile_bodies_are_400_before_any_work(api: openai.OpenAI, gateway: GatewayProcess, svc_model: Path) -> None:
    """Values no request message can hold, numbers past float's range, JSON nested past the parser,
    and messages longer than any prompt the server takes: each an OpenAI error with status 400
    (never a 500), the chat template not rendered for the last."""
    model = svc_model.name
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model=model, prompt="a", max_tokens=2**70)
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model=model, prompt=[2**70])
    with pytest.raises(openai.BadRequestError, match="temperature must be in"):
        api.completions.create(model=model, prompt="a", extra_body={"temperature": 10**400})
    status, body = http(f"{gateway.base_url}/completions", None, raw=b"[" * 100_000, key=KEY)
    assert status == 400 and "not JSON" in body["error"]["message"]
    many = [{"role": "user", "content": "x"}] * 100_000
    with pytest.raises(openai.BadRequestError, match=r"messages of .* bytes in 100000 messages are too long"):
        api.chat.completions.create(model=model, messages=many)


def test_unreachable_prefill_is_503() -> None:
    async def run() -> int:
        client = AsyncClient(f"127.0.0.1:{free_port()}", timeout=5)
        runner = web.AppRunner(Gateway(client).app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            api = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.InternalServerError) as err:
                await api.completions.create(model="m", prompt="a")
            return err.value.status_code
        finally:
            await runner.cleanup()
            await client.close()

    assert asyncio.run(run()) == 503
