"""The compile backend: AOTInductor graphs from a keyed artifact cache.

One cache is filled once per module through `nxserve compile` (3 small graphs); the other tests
load it, check the tokens against eager, and check that every key change misses with an error
that names what differs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nxcore import Engine, RequestRng, RuntimeConfig, SamplingParams, SequenceRequest, StoppingCriteria, generate
from nxcore.compiled import MANIFEST, ArtifactError, ArtifactKey, ArtifactStore, graph_keys
from nxcore.graphs import GraphKey, GraphKind
from nxserve.cli import main as cli_main
from tests.conftest import MOE_VARIANTS, VARIANTS, Checkpoint, random_prompt, write_checkpoint

pytestmark = pytest.mark.slow

CONFIG = RuntimeConfig(batch_size=2, seq_len=32, buckets=(32,), dtype="float32", backend="compile")
FLAGS = ["--batch-size", "2", "--ctx-batch-size", "1", "--seq-len", "32", "--buckets", "32", "--dtype", "float32"]
STOP = StoppingCriteria(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def cache(checkpoints: dict[str, Checkpoint], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compiled")
    model = str(checkpoints["llama"].path)
    assert cli_main(["compile", "--model", model, "--compile-cache", str(root), "--for", "engine", *FLAGS]) == 0
    return root


def test_graph_keys_cover_every_call() -> None:
    config = RuntimeConfig(batch_size=4, ctx_batch_size=2, seq_len=64, buckets=(16, 64), speculation_length=3)
    keys = graph_keys(config)
    assert GraphKey(GraphKind.CONTEXT, 2, 16, 16) in keys and GraphKey(GraphKind.CONTEXT, 1, 64, 64) in keys
    assert {GraphKey(GraphKind.TOKEN_GENERATION, r, 1, kv) for r in (1, 2, 4) for kv in (16, 64)} <= set(keys)
    assert GraphKey(GraphKind.SPECULATION, 4, 4, 64) in keys and GraphKey(GraphKind.SCORING, 1, 4, 16) in keys
    assert len(keys) == len(set(keys)) == 2 * 2 + 3 * 2 + 2 * 3 * 2
    context, decode = graph_keys(config, "context"), graph_keys(config, "decode")
    assert {k.kind for k in context} == {GraphKind.CONTEXT}
    assert {k.kind for k in decode} == {GraphKind.TOKEN_GENERATION, GraphKind.SPECULATION, GraphKind.SCORING}
    with pytest.raises(ValueError, match="'contxt' is not a valid GraphKind"):  # a mistyped kind is an error, never a fallback
        GraphKey("contxt", 1, 1, 2)  # type: ignore[arg-type]
    assert sorted(context + decode) == sorted(keys)
    with pytest.raises(ValueError, match="graph set 'prefill' is not one of all, context, decode"):
        graph_keys(config, "prefill")


def test_compile_command_fills_the_cache(cache: Path, checkpoints: dict[str, Checkpoint], capsys) -> None:
    [entry] = [p for p in cache.iterdir() if p.is_dir()]
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["key"]["batch_size"] == 2 and manifest["key"]["torch"] == torch.__version__
    assert sorted(GraphKey(*k) for k in manifest["graphs"]) == sorted(graph_keys(CONFIG))
    # weights are not in the packages: no package holds the bytes of any layer's weights
    hf = checkpoints["llama"].hf_model
    samples = [
        w.detach().reshape(-1)[-64:].numpy().tobytes()
        for w in (  # (row 0 of embed is the zero pad row)
            hf.model.embed_tokens.weight,
            hf.model.layers[0].self_attn.q_proj.weight,
            hf.model.layers[1].mlp.down_proj.weight,
        )
    ]
    for key in graph_keys(CONFIG):
        package = (entry / key.file_name).read_bytes()
        assert not any(sample in package for sample in samples), key
    capsys.readouterr()
    assert (
        cli_main(["compile", "--model", str(checkpoints["llama"].path), "--compile-cache", str(cache), "--for", "engine", *FLAGS, "--dry-run"]) == 0
    )
    assert "0 graph(s) to compile (all graphs)" in capsys.readouterr().err


@pytest.mark.parametrize("target, graphs", [("decode", "decode"), ("prefill", "context")])
def test_each_service_compiles_only_its_graph_set(checkpoints: dict[str, Checkpoint], tmp_path: Path, capsys, target: str, graphs: str) -> None:
    """Decode fills its slots from prefill's KV: its services' cache needs no context graphs, and
    prefill's no token-generation graphs."""
    assert (
        cli_main(["compile", "--model", str(checkpoints["llama"].path), "--compile-cache", str(tmp_path), "--for", target, *FLAGS, "--dry-run"]) == 0
    )
    listing, messages = capsys.readouterr()  # the dry run lists the graphs on stdout, one per line
    listed = {line.split()[0] for line in listing.splitlines() if line.strip()}
    assert f"({graphs} graphs)" in messages and listed == ({"context"} if graphs == "context" else {"token_generation"})


def test_a_decode_engine_loads_and_warms_only_decode_graphs(
    cache: Path, checkpoints: dict[str, Checkpoint], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What the decode service loads: only token-generation graphs are required and preloaded, its
    warm-up fills slots with import_kv, and context encoding is a clear error."""
    from decode_svc.__main__ import _warm_up
    from nxcore.errors import EngineError

    path = checkpoints["llama"].path
    [entry] = [p for p in cache.iterdir() if p.is_dir()]
    decode_only = tmp_path / entry.name  # the decode service's cache: no context graphs in it
    decode_only.mkdir()
    (decode_only / MANIFEST).write_text((entry / MANIFEST).read_text())
    for key in graph_keys(CONFIG, "decode"):
        (decode_only / key.file_name).symlink_to(entry / key.file_name)
    with pytest.raises(ArtifactError, match="1 of 3 graphs are missing"):
        Engine.from_pretrained(path, CONFIG, compile_cache=tmp_path)

    def no_compiling(*args, **kwargs):
        raise AssertionError("a warm cache must not compile")

    monkeypatch.setattr(ArtifactStore, "compile", no_compiling)
    engine = Engine.from_pretrained(path, CONFIG, compile_cache=tmp_path, graphs="decode")
    assert sorted(engine.executor.runner._graphs) == sorted(graph_keys(CONFIG, "decode"))
    _warm_up(engine)
    assert engine.slot_lengths == [None, None]
    with pytest.raises(EngineError, match="loaded with the 'decode' graph set, which has no context graphs"):
        engine.context_encode([SequenceRequest(slot=0, token_ids=[1, 2], sampling=SamplingParams(), rng=RequestRng(0))])
    # a prompt's KV from a full engine, then decoding here: the tokens a full engine generates
    full = Engine.from_pretrained(path, CONFIG, compile_cache=cache)
    prompt, greedy = random_prompt(9, seed=3), SamplingParams()
    [first] = full.context_encode([SequenceRequest(slot=0, token_ids=prompt, sampling=greedy, rng=RequestRng(0))])
    engine.import_kv(1, full.export_kv(0, len(prompt)))
    token_here = token_there = first
    for _ in range(4):
        [token_there] = full.token_generate([SequenceRequest(slot=0, token_ids=[token_there], sampling=greedy, rng=RequestRng(0))])
        [token_here] = engine.token_generate([SequenceRequest(slot=1, token_ids=[token_here], sampling=greedy, rng=RequestRng(0))])
        assert token_here == token_there


@pytest.mark.parametrize("extra", [[], ["--batch-size", "2", "--ctx-batch-size", "1", "--seq-len", "64"]])
def test_compile_for_all_builds_each_services_config(checkpoints: dict[str, Checkpoint], tmp_path: Path, capsys, extra: list[str]) -> None:
    """With the same flags, `nxserve compile` fills exactly the configs the two services will look up."""
    from decode_svc.__main__ import build_parser as decode_parser
    from nxcore.checkpoint import read_hf_config
    from nxserve.rpc.flags import EngineFlags
    from prefill_svc.__main__ import build_parser as prefill_parser

    path = str(checkpoints["llama"].path)
    flags = ["--dtype", "float32", *extra]
    assert cli_main(["compile", "--model", path, "--compile-cache", str(tmp_path), *flags, "--dry-run"]) == 0
    err = capsys.readouterr().err
    max_positions = read_hf_config(path).max_position_embeddings
    for service, parser, own in (("decode", decode_parser, []), ("prefill", prefill_parser, ["--decode", "127.0.0.1:1"])):
        c = EngineFlags.from_args(parser().parse_args(["--model", path, *own, *flags])).service_config(service, max_positions=max_positions)
        assert f"for batch size {c.batch_size}, context batch {c.ctx_batch_size}, seq_len {c.seq_len} into" in err


def test_compiled_greedy_equals_eager_and_loads_without_compiling(
    cache: Path, checkpoints: dict[str, Checkpoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_compiling(*args, **kwargs):
        raise AssertionError("a warm cache must not compile")

    monkeypatch.setattr(ArtifactStore, "compile", no_compiling)
    path = checkpoints["llama"].path
    compiled = Engine.from_pretrained(path, CONFIG, compile_cache=cache)
    eager = Engine.from_pretrained(path, CONFIG.replace(backend="eager"))
    prompts = [random_prompt(n, seed=n) for n in (5, 19)]
    expected = generate(eager, prompts, stopping=STOP)
    actual = generate(compiled, prompts, stopping=STOP)
    assert [r.output_ids for r in actual] == [r.output_ids for r in expected]
    assert expected[0].output_ids == checkpoints["llama"].hf_greedy(prompts[0], STOP.max_new_tokens)
    # a sampled row next to a greedy one, then a batch of sampled rows: the graph's sampling branch
    # (top-k, top-p, inverse CDF on the request's uniforms) draws what eager draws
    for sampling in (
        [SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=7), SamplingParams()],
        [SamplingParams(temperature=1.3, seed=s) for s in (1, 2)],
    ):
        expected = generate(eager, prompts, sampling=sampling, stopping=STOP)
        actual = generate(compiled, prompts, sampling=sampling, stopping=STOP)
        assert [r.output_ids for r in actual] == [r.output_ids for r in expected]
    assert actual[0].output_ids != actual[1].output_ids


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "llama"] + sorted(MOE_VARIANTS))
def test_every_architecture_compiles_to_eagers_tokens(checkpoints: dict[str, Checkpoint], tmp_path: Path, name: str) -> None:
    """Sliding windows, llama3 and linear rope scaling, MQA with tied embeddings, biases, q/k norms
    and experts all go through the compiled graphs: greedy tokens equal eager's and transformers',
    sampled ones eager's."""
    ckpt = checkpoints[name] if name in VARIANTS else write_checkpoint(tmp_path / name, *MOE_VARIANTS[name])
    compiled = Engine.from_pretrained(ckpt.path, CONFIG, compile_cache=tmp_path / "cache", compile_on_demand=True)
    eager = Engine.from_pretrained(ckpt.path, CONFIG.replace(backend="eager"))
    prompts = [random_prompt(n, seed=n) for n in (5, 19)]
    expected = generate(eager, prompts, stopping=STOP)
    assert [r.output_ids for r in generate(compiled, prompts, stopping=STOP)] == [r.output_ids for r in expected]
    assert [r.output_ids for r in expected] == [ckpt.hf_greedy(p, STOP.max_new_tokens) for p in prompts]
    sampling = [SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=7), SamplingParams(temperature=1.2, seed=3)]
    expected = generate(eager, prompts, sampling=sampling, stopping=STOP)
    assert [r.output_ids for r in generate(compiled, prompts, sampling=sampling, stopping=STOP)] == [r.output_ids for r in expected]


def test_packaged_graphs_run_through_nxcores_runner_or_torchs(cache: Path, checkpoints: dict[str, Checkpoint]) -> None:
    """Graphs run through nxcore's AOTIGraph (which releases the GIL during the call) where the C++
    ops are built, else through torch's package runner: the same tokens as eager either way."""
    from nxcore import native
    from nxcore.compiled import PackagedGraph, module_tensors

    path = checkpoints["llama"].path
    prompts = [random_prompt(n, seed=n) for n in (5, 19)]
    expected = [r.output_ids for r in generate(Engine.from_pretrained(path, CONFIG.replace(backend="eager")), prompts, stopping=STOP)]
    compiled = Engine.from_pretrained(path, CONFIG, compile_cache=cache)
    graphs = compiled.executor.runner._graphs
    assert graphs and all(isinstance(g, PackagedGraph) and g.releases_gil == native.available() for g in graphs.values())
    assert [r.output_ids for r in generate(compiled, prompts, stopping=STOP)] == expected
    for key in list(graphs):
        tensors = module_tensors(compiled.executor.runner._module(key.kind))  # the module the graph was exported from
        graphs[key] = PackagedGraph(compiled.executor.runner.store.dir / key.file_name, nxcore_runner=False)
        graphs[key].bind({n: tensors[n] for n in graphs[key].constant_fqns()})
        assert not graphs[key].releases_gil
    assert [r.output_ids for r in generate(compiled, prompts, stopping=STOP)] == expected


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(batch_size=4), "batch_size=2 (this engine: 4)"),
        (dict(buckets=(16, 32)), "buckets=[32] (this engine: [16, 32])"),
        (dict(dtype="bfloat16"), "dtype='float32' (this engine: 'bfloat16')"),  # (and the fingerprint)
        (dict(max_topk=64), "max_topk=256 (this engine: 64)"),
    ],
)
def test_a_changed_config_misses_with_a_clear_error(cache: Path, checkpoints: dict[str, Checkpoint], change, named) -> None:
    with pytest.raises(ArtifactError, match="no compiled artifacts") as err:
        Engine.from_pretrained(checkpoints["llama"].path, CONFIG.replace(**change), compile_cache=cache)
    assert named in str(err.value) and "nxserve compile" in str(err.value)


def test_tp_degree_torch_version_and_code_are_part_of_the_key(cache: Path, checkpoints: dict[str, Checkpoint]) -> None:
    fingerprint = Engine.from_pretrained(checkpoints["llama"].path, CONFIG, compile_cache=cache).fingerprint
    key = ArtifactKey(fingerprint, CONFIG)
    assert ArtifactKey(fingerprint, CONFIG.replace(tp_degree=2)).dirname != key.dirname
    with pytest.raises(ArtifactError, match=r"tp_degree=1 \(this engine: 2\)"):
        ArtifactStore(cache, ArtifactKey(fingerprint, CONFIG.replace(tp_degree=2)))
    with pytest.raises(ArtifactError, match=r"torch='.*' \(this engine: '2.0.0'\)"):
        ArtifactStore(cache, ArtifactKey(fingerprint, CONFIG, torch_version="2.0.0"))
    with pytest.raises(ArtifactError, match=r"nxcore_code='.*' \(this engine: 'changed'\)"):
        ArtifactStore(cache, ArtifactKey(fingerprint, CONFIG, code="changed"))  # graphs traced from other code
    with pytest.raises(ArtifactError, match=r"nxcore_native_ops=True \(this engine: False\)"):
        ArtifactStore(cache, ArtifactKey(fingerprint, CONFIG, native_ops=False))  # a process without the C++ ops
    with pytest.raises(ArtifactError, match=f"fingerprint='{fingerprint}' \\(this engine: '0000000000000000'\\)"):
        ArtifactStore(cache, ArtifactKey("0" * 16, CONFIG))  # another model
    with pytest.raises(Exception, match="tp_degree=1 only"):
        Engine.from_pretrained(checkpoints["llama"].path, CONFIG.replace(tp_degree=2), compile_cache=cache)


def test_mismatched_or_incomplete_artifacts_are_errors(cache: Path, checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    fingerprint = Engine.from_pretrained(checkpoints["llama"].path, CONFIG, compile_cache=cache).fingerprint
    [entry] = [p for p in cache.iterdir() if p.is_dir()]
    # a folder whose manifest was built for other settings (copied or edited by hand)
    forged = tmp_path / entry.name
    forged.mkdir()
    manifest = json.loads((entry / MANIFEST).read_text())
    (forged / MANIFEST).write_text(json.dumps({**manifest, "key": {**manifest["key"], "seq_len": 64}}))
    with pytest.raises(ArtifactError, match=r"built for different settings: seq_len=64 \(this engine: 32\)"):
        ArtifactStore(tmp_path, ArtifactKey(fingerprint, CONFIG))
    # a folder missing one graph
    (forged / MANIFEST).write_text(json.dumps(manifest))
    for key in graph_keys(CONFIG)[1:]:
        (forged / key.file_name).symlink_to(entry / key.file_name)
    with pytest.raises(ArtifactError, match="1 of 3 graphs are missing"):
        Engine.from_pretrained(checkpoints["llama"].path, CONFIG, compile_cache=tmp_path)


def test_bfloat16_compiled_logits_stay_close_to_eager(checkpoints: dict[str, Checkpoint], tmp_path: Path, cache: Path) -> None:
    """Also: on CPUs where nxcore's fused ops and AMX prefill attention run, bf16 context encoding
    runs the eager module on the compile backend (measured faster than its AOTInductor graph),
    token generation the compiled graph; the context graph is still built, and float32 keeps
    every graph."""
    from nxcore.compiled import PackagedGraph
    from nxcore.modules import fused

    config = RuntimeConfig(batch_size=1, seq_len=32, buckets=(32,), dtype="bfloat16", backend="compile", on_device_sampling=False)
    path = checkpoints["qwen3"].path
    compiled = Engine.from_pretrained(path, config, compile_cache=tmp_path, compile_on_demand=True)
    eager = Engine.from_pretrained(path, config.replace(backend="eager"))
    greedy = SamplingParams()
    prompt = random_prompt(11, seed=4)
    for engine in (compiled, eager):
        engine.context_encode([SequenceRequest(slot=0, token_ids=prompt, sampling=greedy, rng=RequestRng(0))])
    token = [prompt[-1]]
    for _ in range(4):
        step = [SequenceRequest(slot=0, token_ids=token, sampling=greedy, rng=RequestRng(0))]
        expected = eager.token_generate_logits(step)
        actual = compiled.token_generate_logits(step)
        assert torch.allclose(actual, expected, atol=5e-2, rtol=2e-2), (actual - expected).abs().max()
        token = [int(expected.argmax())]
    runner = compiled.executor.runner
    context = next(k for k in runner._graphs if k.kind is GraphKind.CONTEXT)
    generation = next(k for k in runner._graphs if k.kind is not GraphKind.CONTEXT)  # the logits-returning token generation
    assert runner.runs_eagerly(context) == fused.attention_supported()
    assert isinstance(runner._graphs[context], PackagedGraph) != fused.attention_supported()
    assert isinstance(runner._graphs[generation], PackagedGraph) and not runner.runs_eagerly(generation)
    assert context in graph_keys(config)  # still built by `nxserve compile` and required at load without compile_on_demand
    fp32 = Engine.from_pretrained(checkpoints["llama"].path, CONFIG, compile_cache=cache)
    assert not any(fp32.executor.runner.runs_eagerly(key) for key in graph_keys(CONFIG))
