"""Measures vLLM inside its own virtualenv, where only vllm and the stdlib are importable.

    VENV/bin/python -m bench.peers.vllm_worker SPEC.json RESULT.json     (from the repository root)

SPEC: {"model", "dtype", "prompts" (token ids), "new_tokens", "repeats", "ttft_prompts" (per prompt
length, repeats + 1 prompts of token ids; see bench.peers.method.measure), "llm_kwargs"}. RESULT: the
bench.peers.method figures plus vLLM's version and load time. Prompts go in as token ids, greedy,
ignore_eos, no detokenization (nxserve's engine does not detokenize either).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench.peers.method import measure


def vllm_figures(spec: dict) -> dict:
    import vllm
    from vllm import LLM, SamplingParams, TokensPrompt

    prompts, new_tokens, ttft_prompts = spec["prompts"], spec["new_tokens"], spec.get("ttft_prompts", [])
    workload_len = max(len(p) for p in prompts) + new_tokens
    # the longest sequence: a workload prompt and its new tokens, or the longest TTFT prompt and its one token
    longest = max([workload_len] + [len(group[0]) + 1 for group in ttft_prompts])
    start = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        dtype=spec["dtype"],
        seed=0,
        max_model_len=longest,
        max_num_seqs=len(prompts),
        max_num_batched_tokens=max(2048, workload_len * len(prompts), longest),
        **spec.get("llm_kwargs", {}),
    )
    load_s = time.perf_counter() - start

    def run(batch: list[list[int]], n: int) -> tuple[float, int]:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
        inputs = [TokensPrompt(prompt_token_ids=p) for p in batch]
        start = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs)

    figures = measure(run, prompts, new_tokens, repeats=spec["repeats"], ttft_prompts=ttft_prompts)
    return {"version": vllm.__version__, "load_s": load_s, **figures.to_dict()}


def main(argv: list[str]) -> int:
    spec_path, result_path = map(Path, argv)
    result = vllm_figures(json.loads(spec_path.read_text()))
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # vLLM spawns processes that re-import the main module: run nothing on import
    sys.exit(main(sys.argv[1:]))
