"""bench.peers: the shared measurement method, the workload checks, vLLM's compute cores, the thread
settings and comparison tables, and a run without vLLM on the tiny model."""

from __future__ import annotations

import argparse
import json
import os
import threading
from pathlib import Path

import pytest
import torch

from bench.peers import vllm_cpu
from bench.peers.local import Threads, applied, cpu_list, engine_config, thread_settings
from bench.peers.method import Figures, measure


def test_measure_subtracts_the_first_token_and_checks_counts() -> None:
    calls = []

    def run(prompts: list[list[int]], n: int) -> tuple[float, int]:
        calls.append((len(prompts), n))
        return 0.010 + 0.002 * (n - 1) * len(prompts), len(prompts) * n  # 10 ms prefill, 2 ms per token per row

    figures = measure(run, [[5, 6]] * 4, 8, repeats=2)
    assert calls[0] == (4, 2)  # the warm-up
    assert figures.ttft_b1_ms == pytest.approx(10.0)
    assert figures.decode_b1_ms == pytest.approx(2.0)
    assert figures.batch_tok_s == pytest.approx(32 / (0.010 + 0.002 * 7 * 4))
    assert figures.ttft_ms == {}
    with pytest.raises(RuntimeError, match="produced 3 tokens"):
        measure(lambda prompts, n: (1.0, 3), [[5]], 2, repeats=1)


def test_measure_times_ttft_per_length_on_fresh_prompts_after_a_warm_up() -> None:
    seen: list[tuple[list[int], int]] = []

    def run(prompts: list[list[int]], n: int) -> tuple[float, int]:
        seen.extend((p, n) for p in prompts)
        first = prompts[0][0]
        # 1 ms per prompt token, the warm-up call (ids 100+) 1 s slower, timed calls 0/1/2 ms apart (median: the middle one)
        return (0.001 * len(prompts[0]) + (1.0 if first >= 100 else 0.001 * (first % 10))) * len(prompts), len(prompts) * n

    ttft = [[[100 + i] * 16, [10] * 16, [12] * 16, [11] * 16] for i in range(1)] + [[[200] * 40, [20] * 40, [21] * 40, [22] * 40]]
    figures = measure(run, [[5, 6]] * 2, 4, repeats=3, ttft_prompts=ttft)
    assert figures.ttft_ms == {16: pytest.approx(17.0), 40: pytest.approx(41.0)}  # the warm-ups are not timed
    ttft_calls = seen[-8:]
    assert ttft_calls == [(p, 1) for group in ttft for p in group]  # each prompt once, one new token, warm-up first
    # the figures survive a JSON round trip (the vLLM worker's result): lengths come back as ints
    assert Figures.from_dict(json.loads(json.dumps(figures.to_dict()))) == figures
    with pytest.raises(ValueError, match="repeats \\+ 1 = 4"):
        measure(run, [[5, 6]], 2, repeats=3, ttft_prompts=[[[7] * 8] * 3])
    with pytest.raises(ValueError, match="lengths repeat"):
        measure(run, [[5, 6]], 2, repeats=1, ttft_prompts=[[[7] * 8] * 2, [[8] * 8] * 2])


def test_ttft_prompts_are_all_different_and_in_the_vocabulary() -> None:
    groups = vllm_cpu.make_ttft_prompts([16, 24], 3, 40, seed=0)
    assert [[len(p) for p in g] for g in groups] == [[16] * 3, [24] * 3]
    firsts = [tuple(p[:16]) for g in groups for p in g]
    assert len(set(firsts)) == 6  # no two prompts share a 16-token start: a prefix cache reuses nothing
    assert all(4 <= t < 40 for g in groups for p in g for t in p)
    assert groups == vllm_cpu.make_ttft_prompts([16, 24], 3, 40, seed=0)  # seeded


def test_ttft_lens_default_to_those_the_model_holds() -> None:
    assert vllm_cpu.resolve_ttft_lens(None, 4096) == [128, 512, 2048]
    assert vllm_cpu.resolve_ttft_lens(None, 2048) == [128, 512]  # 2048 + its new token do not fit
    assert vllm_cpu.resolve_ttft_lens([], 2048) == []
    assert vllm_cpu.resolve_ttft_lens([16, 24], None) == [16, 24]
    with pytest.raises(vllm_cpu.UsageError, match="holds 64 positions"):
        vllm_cpu.resolve_ttft_lens([16, 64], 64)
    with pytest.raises(vllm_cpu.UsageError, match="distinct"):
        vllm_cpu.resolve_ttft_lens([16, 16], 64)


def test_vllm_compute_cores_from_the_bind_value() -> None:
    assert vllm_cpu.vllm_compute_cores("auto", 2) == 1  # one core reserved for the front-end processes
    assert vllm_cpu.vllm_compute_cores("auto", 1) == 1
    assert vllm_cpu.vllm_compute_cores("auto", 16) == 15
    assert vllm_cpu.vllm_compute_cores("auto", 16, reserved=4) == 12  # VLLM_CPU_NUM_OF_RESERVED_CPU
    assert vllm_cpu.vllm_compute_cores("0-1", 2) == 2
    assert vllm_cpu.vllm_compute_cores("0,2,3", 8) == 3
    assert vllm_cpu.vllm_compute_cores("0-3,6", 8) == 5
    assert vllm_cpu.vllm_compute_cores("0-1|2-3", 8) == 4  # two ranks
    assert vllm_cpu.vllm_compute_cores("all", 4) == 4
    assert vllm_cpu.vllm_compute_cores("nobind", 4) == 4
    assert vllm_cpu.parse_cpu_list("3,0-1") == [0, 1, 3]
    for bad in ("x", "2-1", "0-"):
        with pytest.raises(vllm_cpu.UsageError, match="CPU list"):
            vllm_cpu.vllm_compute_cores(bad, 4)


def test_vllm_pinning_prefers_what_its_log_says() -> None:
    log = (
        "INFO [ompmultiprocessing.py:185] OpenMP thread binding info: \n"
        "\tVLLM_CPU_OMP_THREADS_BIND='auto', auto_setup=True, skip_setup=False\n"
        "\tlocal_world_size=1, reserve_cpu_num=1\n"
        "(EngineCore pid=28177) INFO 12-05 01:25:26 [ompmultiprocessing.py:185] \tlocal_rank=0, core ids=[0, 1, 2]\n"
        "(EngineCore pid=28177) INFO 12-05 01:25:26 [ompmultiprocessing.py:185] \treserved_cpus=[3]\n"
    )
    assert vllm_cpu.vllm_logged_binding(log) == ([0, 1, 2], [3])
    assert vllm_cpu.vllm_logged_binding("no binding here") is None
    before = vllm_cpu.vllm_pinning({}, 4)
    assert (before["VLLM_CPU_OMP_THREADS_BIND"], before["compute_cores"], before["core_ids"]) == ("auto", 3, None)
    after = vllm_cpu.vllm_pinning({"VLLM_CPU_OMP_THREADS_BIND": "auto"}, 4, log.replace("0, 1, 2", "0, 1"))
    assert (after["compute_cores"], after["derived_compute_cores"], after["core_ids"], after["reserved_cpus"]) == (2, 3, [0, 1], [3])
    assert after["description"].endswith("computes on 2 cores (per its log: cores 0-1; 3 reserved for its front-end processes)")
    assert vllm_cpu.vllm_pinning({"VLLM_CPU_OMP_THREADS_BIND": "0-1"}, 2)["compute_cores"] == 2


def test_thread_settings_pin_the_whole_process_and_restore_it() -> None:
    cores = sorted(os.sched_getaffinity(0))
    default = torch.get_num_threads()
    unpinned, one = thread_settings([0, 1], default_threads=default, cores=cores)
    assert (unpinned.pinned, unpinned.count, unpinned.cores) == (False, default, tuple(cores))
    assert (one.pinned, one.count, one.cores, one.label) == (True, 1, (cores[0],), f"1 thread (core {cores[0]})")
    assert unpinned.label == f"{default} thread{'s' if default != 1 else ''}"
    with pytest.raises(ValueError, match="distinct"):
        thread_settings([1, 1], default_threads=default, cores=cores)
    with pytest.raises(ValueError, match="cores to pin to"):
        thread_settings([len(cores) + 1], default_threads=default, cores=cores)

    started, done = threading.Event(), threading.Event()
    worker = threading.Thread(target=lambda: (started.set(), done.wait(10)))  # a thread from before the block (like OpenMP's)
    worker.start()
    started.wait(10)
    try:
        with applied(one, default_threads=default):
            assert os.sched_getaffinity(0) == {cores[0]}
            assert os.sched_getaffinity(worker.native_id) == {cores[0]}
            assert torch.get_num_threads() == 1
        assert os.sched_getaffinity(0) == set(cores)
        assert os.sched_getaffinity(worker.native_id) == set(cores)
        assert torch.get_num_threads() == default
        torch.set_num_threads(1)
        with applied(unpinned, default_threads=default):  # 0: torch's default count back, nothing pinned
            assert torch.get_num_threads() == default
            assert os.sched_getaffinity(0) == set(cores)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(default)
        done.set()
        worker.join()
    assert cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_engine_seq_len_covers_ttft_and_keeps_the_workload_bucket() -> None:
    config = engine_config([[5] * 128] * 32, 64, [128, 512, 2048], backend="eager", dtype="bfloat16", ctx_batch=None)
    assert config.seq_len == 2049
    assert 192 in config.buckets and 2048 in config.buckets  # the workload's decode attends over 192 positions, as before
    assert (config.batch_size, config.ctx_batch_size) == (32, 32)
    assert engine_config([[5] * 16] * 4, 4, [], backend="eager", dtype="float32", ctx_batch=2).seq_len == 16 + 18


def _figures(batch: float, decode: float, ttft: float, by_len: dict[int, float]) -> dict:
    return Figures(batch_tok_s=batch, ttft_b1_ms=ttft, decode_b1_ms=decode, ttft_ms=by_len).to_dict()


def _fake_results(settings: list[Threads]) -> dict[str, dict]:
    vllm = {"engine": "vllm", "version": "0.32.0", **_figures(100.0, 20.0, 40.0, {16: 30.0}), "pinning": vllm_cpu.vllm_pinning({}, 2)}
    results = {"vllm": vllm}
    for t in settings:
        speed = 1.0 if t.count == 1 else 2.0  # nxserve twice as fast on two threads as on one
        results[f"nxserve eager, {t.label}"] = {
            "engine": "nxserve eager",
            **_figures(80.0 * speed, 25.0 / speed, 50.0 / speed, {16: 60.0 / speed}),
            "step_b1_ms": 10.0,
            "step_b4_tok_s": 400.0,
            "pinning": t.to_dict(),
        }
        results[f"transformers, {t.label}"] = {"engine": "transformers", **_figures(40.0, 50.0, 100.0, {16: 120.0}), "pinning": t.to_dict()}
    return results


def test_comparisons_pair_vllm_with_the_matching_thread_setting(capsys: pytest.CaptureFixture[str]) -> None:
    settings = [Threads(0, 2, (0, 1)), Threads(1, 1, (0,))]
    results = _fake_results(settings)
    rows = vllm_cpu.table_rows(4, [16])
    assert [key for key, _, _ in rows] == ["batch_tok_s", "decode_b1_ms", "ttft_b1_ms", "ttft_16_ms"]

    tables = vllm_cpu.comparisons(results, settings, 1, rows)  # vLLM computes on one core (auto on 2 cores)
    assert set(tables) == {"defaults", "like_for_like"}
    defaults, like = tables["defaults"], tables["like_for_like"]
    assert defaults["engines"] == ["vllm", "nxserve eager, 2 threads", "transformers, 2 threads"]
    assert like["engines"] == ["vllm", "nxserve eager, 1 thread (core 0)", "transformers, 1 thread (core 0)"]
    assert defaults["ratios"]["nxserve eager, 2 threads / vllm"] == pytest.approx(
        {"batch_tok_s": 1.6, "decode_b1_ms": 20 / 12.5, "ttft_b1_ms": 40 / 25, "ttft_16_ms": 1.0}
    )
    assert like["ratios"]["nxserve eager, 1 thread (core 0) / vllm"] == pytest.approx(
        {"batch_tok_s": 0.8, "decode_b1_ms": 0.8, "ttft_b1_ms": 0.8, "ttft_16_ms": 0.5}
    )
    assert like["ratios"]["nxserve eager, 1 thread (core 0) / transformers, 1 thread (core 0)"]["ttft_16_ms"] == pytest.approx(2.0)
    assert like["pinning"]["vllm"].startswith("VLLM_CPU_OMP_THREADS_BIND=auto: computes on 1 core")
    assert "pinned to core 0 (sched_setaffinity)" in like["pinning"]["nxserve eager, 1 thread (core 0)"]

    vllm_cpu.print_comparisons(results, tables, rows, results["vllm"]["pinning"])
    out = capsys.readouterr().out
    assert "== defaults:" in out and "== like for like, 1 compute core each:" in out
    assert "TTFT b1 16 (ms)" in out and "eager/vLLM" in out and "eager/hf" in out
    assert "0.50x" in out and "1.60x" in out

    # VLLM_CPU_OMP_THREADS_BIND=0-1: two compute cores, paired with the 2-thread run, printed once
    tables = vllm_cpu.comparisons(results, settings, 2, rows)
    assert set(tables) == {"defaults", "like_for_like", "threads_1"}  # the 1-thread run in a table of its own
    assert tables["like_for_like"]["engines"] == tables["defaults"]["engines"]
    vllm_cpu.print_comparisons(results, tables, rows, results["vllm"]["pinning"])
    out = capsys.readouterr().out
    assert (
        out.count("\n== ") == 2
        and "== defaults, also like for like (2 cores computing each): vLLM" in out
        and "== nxserve and transformers at 1 thread (core 0)" in out
    )

    # a pinned setting with as many threads as vLLM's cores is preferred; the others get their own table
    settings = [Threads(0, 2, (0, 1)), Threads(1, 1, (0,)), Threads(2, 2, (0, 1))]
    tables = vllm_cpu.comparisons(_fake_results(settings), settings, 2, rows)
    assert set(tables) == {"defaults", "like_for_like", "threads_1"}
    assert tables["like_for_like"]["threads"]["setting"] == 2


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    vllm_cpu.add_arguments(p)
    return p.parse_args(list(argv))


def test_workload_file_with_flags_on_top(tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"requests": 32, "prompt_len": 128, "output_len": 64, "temperature": 0.0, "ignore_eos": True}))
    w = vllm_cpu.load_workload(_args("--workload", str(path), "--requests", "4"))
    assert (w.requests, str(w.prompt_len), str(w.output_len)) == (4, "128", "64")
    path.write_text(json.dumps({"requests": 8, "prompt_len": "32..512"}))
    with pytest.raises(vllm_cpu.UsageError, match="fixed prompt_len"):
        vllm_cpu.load_workload(_args("--workload", str(path)))
    path.write_text(json.dumps({"requests": 8, "no_such_key": 1}))
    with pytest.raises(vllm_cpu.UsageError, match="unknown workload keys"):
        vllm_cpu.load_workload(_args("--workload", str(path)))
    args = _args()
    assert (args.threads, args.ttft_lens) == ([0, 1], None)
    assert _args("--threads", "0", "1", "2", "--ttft-lens").ttft_lens == []


def test_missing_vllm_venv_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 512}))
    assert (
        vllm_cpu.main(
            [
                "--model",
                str(model),
                "--venv",
                str(tmp_path / "none"),
                "--engines",
                "vllm",
                "--requests",
                "2",
                "--prompt-len",
                "8",
                "--new-tokens",
                "2",
            ]
        )
        == 2
    )
    assert "--setup" in capsys.readouterr().err
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 512, "max_position_embeddings": 64}))
    assert vllm_cpu.main(["--model", str(model), "--engines", "nxserve", "--ttft-lens", "16", "64"]) == 2
    assert "holds 64 positions" in capsys.readouterr().err


@pytest.mark.slow
def test_runs_nxserve_and_transformers_on_the_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nxserve.testing.model_factory import make_model

    tiny = make_model(arch="llama", preset="tiny", out=tmp_path / "tiny")
    out = tmp_path / "peers.json"
    args = ["--model", str(tiny), "--engines", "nxserve", "transformers", "--dtype", "float32"]
    args += ["--requests", "4", "--prompt-len", "16", "--new-tokens", "4", "--threads", "0", "1", "--ttft-lens", "16", "24"]
    args += ["--vllm-env", "VLLM_CPU_OMP_THREADS_BIND=0", "--json", str(out)]  # vLLM (not run) would compute on one core
    default, core = torch.get_num_threads(), min(os.sched_getaffinity(0))
    assert vllm_cpu.main(args) == 0
    assert torch.get_num_threads() == default and os.sched_getaffinity(0) == set(range(os.cpu_count() or 1)) & os.sched_getaffinity(0)
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())

    many, one = f"{default} thread{'s' if default != 1 else ''}", f"1 thread (core {core})"
    engines = report["engines"]
    assert set(engines) == {f"nxserve eager, {many}", f"nxserve eager, {one}", f"transformers, {many}", f"transformers, {one}"}
    for name, r in engines.items():
        assert r["batch_tok_s"] > 0 and r["decode_b1_ms"] > 0 and r["ttft_b1_ms"] > 0
        assert set(r["ttft_ms"]) == {"16", "24"} and all(ms > 0 for ms in r["ttft_ms"].values())
        assert r["pinning"]["threads"] == (1 if name.endswith(one) else default)
    assert engines[f"nxserve eager, {one}"]["pinning"] | {"description": ""} == {
        "setting": 1,
        "threads": 1,
        "cores": [core],
        "pinned": True,
        "description": "",
    }
    assert engines[f"nxserve eager, {many}"]["pinning"]["pinned"] is False
    assert report["ttft_lens"] == [16, 24] and report["vllm_compute_cores"] == 1
    assert report["vllm_pinning"]["VLLM_CPU_OMP_THREADS_BIND"] == "0"

    comparisons = report["comparisons"]
    assert comparisons["defaults"]["engines"] == [f"nxserve eager, {many}", f"transformers, {many}"]
    assert comparisons["like_for_like"]["engines"] == [f"nxserve eager, {one}", f"transformers, {one}"]
    for table in ("defaults", "like_for_like"):
        nx, hf = comparisons[table]["engines"]
        ratios = comparisons[table]["ratios"][f"{nx} / {hf}"]
        assert set(ratios) == {"batch_tok_s", "decode_b1_ms", "ttft_b1_ms", "ttft_16_ms", "ttft_24_ms"}
        assert ratios["ttft_24_ms"] == pytest.approx(engines[hf]["ttft_ms"]["24"] / engines[nx]["ttft_ms"]["24"])
        assert ratios["batch_tok_s"] == pytest.approx(engines[nx]["batch_tok_s"] / engines[hf]["batch_tok_s"])
    assert "TTFT b1 24 (ms)" in printed and "vLLM: not run (VLLM_CPU_OMP_THREADS_BIND=0: computes on 1 core)" in printed


def test_vllm_worker_sizes_the_model_for_the_ttft_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's code around vLLM, on a stand-in `vllm` module that records LLM()'s arguments."""
    import types

    from bench.peers import vllm_worker

    made: dict = {}

    class LLM:
        def __init__(self, **kwargs: object) -> None:
            made.update(kwargs)

        def generate(self, inputs: list, params: types.SimpleNamespace, use_tqdm: bool) -> list:
            out = types.SimpleNamespace(token_ids=[7] * params.max_tokens)
            return [types.SimpleNamespace(outputs=[out]) for _ in inputs]

    fake = types.ModuleType("vllm")
    fake.__dict__.update(
        __version__="0.0-test",
        LLM=LLM,
        SamplingParams=lambda **kw: types.SimpleNamespace(**kw),
        TokensPrompt=lambda prompt_token_ids: prompt_token_ids,
    )
    monkeypatch.setitem(__import__("sys").modules, "vllm", fake)
    spec = {
        "model": "m",
        "dtype": "float32",
        "prompts": [[5] * 16] * 4,
        "new_tokens": 4,
        "repeats": 1,
        "ttft_prompts": vllm_cpu.make_ttft_prompts([16, 300], 2, 512, seed=0),
    }
    result = json.loads(json.dumps(vllm_worker.vllm_figures(spec)))
    assert (made["max_model_len"], made["max_num_seqs"], made["max_num_batched_tokens"]) == (301, 4, 2048)
    assert result["version"] == "0.0-test" and set(Figures.from_dict(result).ttft_ms) == {16, 300}


def test_vllm_gets_tcmalloc_and_intel_openmp_preloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.peers import vllm_env

    libs = tmp_path / "sys"
    libs.mkdir()
    (libs / "libtcmalloc_minimal.so.4").write_bytes(b"")
    real_is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda p: real_is_file(libs / p.name) if p.name.startswith("libtcmalloc") else real_is_file(p))
    venv = tmp_path / "venv"
    site = venv / "lib" / "python3.11" / "site-packages"
    (site / "vllm").mkdir(parents=True)
    env = vllm_env.with_allocator({"LD_PRELOAD": "/x/libgomp.so"}, venv)
    assert env["LD_PRELOAD"].startswith("/x/libgomp.so:") and env["LD_PRELOAD"].endswith("libtcmalloc_minimal.so.4")
    assert vllm_env.with_allocator({"LD_PRELOAD": "/y/libtcmalloc.so.4"}, venv) == {"LD_PRELOAD": "/y/libtcmalloc.so.4"}  # already preloaded
    (site / "vllm" / "libs").mkdir()
    (site / "vllm" / "libs" / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert vllm_env.with_allocator({}, venv) == {}  # vLLM preloads its own copy
    # Intel OpenMP from the venv on x86, after TCMalloc, unless an OpenMP is preloaded already
    (venv / "lib" / "libiomp5.so").write_bytes(b"")
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert vllm_env.with_allocator({}, venv) == {"LD_PRELOAD": str(venv / "lib" / "libiomp5.so")}
    assert vllm_env.with_allocator({"LD_PRELOAD": "/x/libgomp.so"}, venv) == {"LD_PRELOAD": "/x/libgomp.so"}
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert vllm_env.with_allocator({}, venv) == {}


def test_serving_rounds_summarize_the_median_ratio_and_its_range() -> None:
    from bench.peers import vllm_serve

    def row(server: str, rate: str, k: int, tok_s: float, ttft_p99: float) -> dict:
        keys = {f"{m}_{p}_ms": 10.0 for m, _ in vllm_serve.METRICS for p in ("p50", "p99")}
        return {"server": server, "rate": rate, "round": k, **keys, "ttft_p99_ms": ttft_p99, "output_tok_s": tok_s}

    rows = [
        row("nxserve", "inf", 1, 400.0, 100.0),
        row("vllm", "inf", 1, 400.0, 200.0),
        row("nxserve", "inf", 2, 600.0, 100.0),
        row("vllm", "inf", 2, 300.0, 100.0),
        row("nxserve", "inf", 3, 450.0, 150.0),
        row("vllm", "inf", 3, 300.0, 100.0),
        row("nxserve", "1", 1, 60.0, 80.0),  # vLLM missing at this rate in every round: no ratio
    ]
    text = vllm_serve.ratio_summary(rows)
    assert text.startswith("nxserve/vLLM over 3 rounds")
    heads = next(line for line in text.splitlines() if line.startswith("| rate")).split(" | ")
    inf = next(line for line in text.splitlines() if line.startswith("| inf")).split(" | ")
    assert inf[heads.index("output tok/s |")].rstrip(" |") == "1.50x (1.00-2.00)"
    assert inf[heads.index("TTFT p99 ms")] == "1.00x (0.50-1.50)"
    one = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    assert set(one.strip("| ").split(" | ")[1:]) == {"-"}
    # each round's own table pairs the servers of that round only
    ratio_line = next(line for line in vllm_serve.table([r for r in rows if r["round"] == 1]).splitlines() if "nxserve/vLLM" in line)
    assert ratio_line.startswith("| inf |") and ratio_line.endswith("| 1.00x |")


def test_rounds_summarize_each_ratio_over_the_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    settings = [Threads(0, 2, (0, 1)), Threads(1, 1, (0,))]
    rows = vllm_cpu.table_rows(4, [16])
    rounds = []
    for vllm_tok_s in (100.0, 50.0, 80.0):  # vLLM's batch figure drifts from round to round
        results = _fake_results(settings)
        results["vllm"]["batch_tok_s"] = vllm_tok_s
        rounds.append(vllm_cpu.comparisons(results, settings, 1, rows))
    summary = vllm_cpu.round_summary(rounds, rows)
    batch = summary["like_for_like"]["ratios"]["nxserve eager, 1 thread (core 0) / vllm"]["batch_tok_s"]
    assert batch["rounds"] == pytest.approx([0.8, 1.6, 1.0]) and batch == {**batch, "median": pytest.approx(1.0), "min": 0.8, "max": 1.6}
    steady = summary["like_for_like"]["ratios"]["nxserve eager, 1 thread (core 0) / vllm"]["ttft_16_ms"]
    assert steady["min"] == steady["max"] == steady["median"] == pytest.approx(0.5)
    vllm_cpu.print_round_summary(summary, rows, 3)
    out = capsys.readouterr().out
    assert "over 3 rounds" in out and "1.00x (0.80-1.60)" in out


@pytest.mark.parametrize("vllm_last", [False, True])
def test_rounds_alternate_whether_vllm_runs_first(monkeypatch: pytest.MonkeyPatch, vllm_last: bool) -> None:
    order: list[str] = []
    monkeypatch.setattr(vllm_cpu, "run_vllm", lambda *a, **k: order.append("vllm") or {"engine": "vllm"})
    monkeypatch.setattr(vllm_cpu, "nxserve_figures", lambda *a, **k: order.append("nxserve") or {})
    args = _args("--model", "m", "--engines", "vllm", "nxserve")
    results = vllm_cpu.run_engines(args, [[1]], 2, [], [Threads(0, 1, (0,))], default_threads=1, cpus=1, vllm_last=vllm_last)
    assert order == (["nxserve", "vllm"] if vllm_last else ["vllm", "nxserve"])
    assert next(iter(results)) == "vllm"  # the tables list it first either way


def test_two_rounds_on_the_tiny_model_report_each_round_and_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nxserve.testing.model_factory import make_model

    tiny = make_model(arch="llama", preset="tiny", out=tmp_path / "tiny")
    out = tmp_path / "peers.json"
    args = ["--model", str(tiny), "--engines", "nxserve", "transformers", "--dtype", "float32", "--requests", "2", "--prompt-len", "8"]
    args += ["--new-tokens", "2", "--threads", "1", "--ttft-lens", "8", "--rounds", "2", "--json", str(out)]
    assert vllm_cpu.main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert len(report["rounds"]) == 2 and report["engines"] == report["rounds"][-1]["engines"]
    pair = next(iter(report["summary"]["like_for_like"]["ratios"].values()))
    assert len(pair["batch_tok_s"]["rounds"]) == 2 and pair["batch_tok_s"]["min"] <= pair["batch_tok_s"]["median"] <= pair["batch_tok_s"]["max"]
    assert printed.count("=== round ") == 2 and "over 2 rounds" in printed
    assert vllm_cpu.main([*args[:-2], "--rounds", "0"]) == 2
