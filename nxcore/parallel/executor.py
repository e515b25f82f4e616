"""Tensor-parallel execution: one process per rank over torch.distributed (gloo on CPU, NCCL on
CUDA), started and driven by the engine's process.

Every call goes to every rank (the same graph call with the same inputs); rank 0 answers. Rank
processes that die, or fail a call, make the executor fail fast with a clear error; every rank is
then stopped, since the group cannot continue without it.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import time
import traceback
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from nxcore import native
from nxcore.compiled import ArtifactStore
from nxcore.config import RuntimeConfig
from nxcore.errors import EngineError, TPRankError
from nxcore.graphs import GraphInputs, GraphKey
from nxcore.kv_cache import KVSnapshot
from nxcore.model_config import ModelConfig
from nxcore.parallel.plan import ShardPlan, describe, make_plan

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = timedelta(seconds=60)
POLL_S = 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TPExecutor:
    def __init__(self, model_dir: str | Path, model_config: ModelConfig, config: RuntimeConfig, *, start_timeout: float = 300) -> None:
        self.config = config
        self.plan: ShardPlan = make_plan(model_config, config.tp_degree, config.ep_degree)
        log.info("%s", describe(self.plan, model_config))
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._commands = [ctx.Queue() for _ in range(config.tp_degree)]
        self._results = ctx.Queue()
        threads = max(1, (os.cpu_count() or 1) // config.tp_degree)
        self._procs = [
            ctx.Process(
                target=_rank_main,
                args=(rank, port, str(model_dir), model_config, config, threads, native.settings(), self._commands[rank], self._results),
                name=f"nxcore-tp-rank{rank}",
                daemon=True,
            )
            for rank in range(config.tp_degree)
        ]
        for p in self._procs:
            p.start()
        self.closed = False
        ready = self._collect("load", timeout=start_timeout)
        self.fingerprint: str = ready[0]
        self.scratch_slot: int = config.batch_size
        self.store: ArtifactStore | None = None
        """TP runs the eager backend only (see Engine.from_pretrained)."""

    # ------------------------------------------------------------------ calls

    def run(self, key: GraphKey, inputs: GraphInputs) -> tuple[torch.Tensor, ...]:
        return self._call("run", (key, inputs))[0]

    def compile(self, key: GraphKey) -> None:
        raise EngineError("the compile backend runs at tp_degree=1 only")

    def export_kv(self, slot: int, n_tokens: int, out: KVSnapshot | None = None) -> KVSnapshot:
        """Every rank's slice, reassembled into the logical layout (no replicas, no padding), into
        `out` when given."""
        shards: list[KVSnapshot] = self._call("export", (slot, n_tokens))
        where = self.plan.logical_kv_positions()
        keys = torch.stack([shards[r].keys[:, h] for r, h in where], dim=1, out=None if out is None else out.keys)
        values = torch.stack([shards[r].values[:, h] for r, h in where], dim=1, out=None if out is None else out.values)
        return KVSnapshot(keys=keys, values=values)

    def import_kv(self, slot: int, kv: KVSnapshot) -> None:
        self._call("import", (slot, kv))

    def prompt_logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        return self._call("prompt_logits", list(token_ids))[0]

    def profile(self, key: GraphKey, inputs: GraphInputs, steps: int) -> dict[str, float]:
        """Rank 0's figures (see GraphRunner.profile); every rank runs the same calls."""
        return self._call("profile", (key, inputs, steps))[0]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for q in self._commands:
            q.put(("stop", None))
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    # ------------------------------------------------------------------ plumbing

    def _call(self, op: str, payload: Any) -> list[Any]:
        if self.closed:
            raise TPRankError("the TP engine is closed: a rank failed earlier or close() was called; load it again")
        for q in self._commands:
            q.put((op, payload))
        return self._collect(op)

    def _collect(self, op: str, timeout: float | None = None) -> list[Any]:
        """Each rank's answer to `op`, in rank order; fails fast when a rank dies or errs."""
        answers: dict[int, Any] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(answers) < len(self._procs):
            try:
                rank, ok, value = self._results.get(timeout=POLL_S)
            except queue.Empty:
                self._raise_if_dead(op)
                if deadline is not None and time.monotonic() > deadline:
                    self._abort()
                    raise TPRankError(f"TP ranks did not finish {op!r} within {timeout:.0f}s") from None
                continue
            if not ok:
                # A peer's death surfaces first as a connection error on the others: name the dead rank.
                end = time.monotonic() + 1.0
                while time.monotonic() < end:
                    self._raise_if_dead(op)
                    time.sleep(POLL_S)
                self._abort()
                raise TPRankError(f"TP rank {rank} failed during {op!r}:\n{value}")
            answers[rank] = value
        return [answers[r] for r in range(len(self._procs))]

    def _raise_if_dead(self, op: str) -> None:
        dead = [(i, p.exitcode) for i, p in enumerate(self._procs) if not p.is_alive()]
        if dead:
            self._abort()
            raise TPRankError(
                f"TP rank {dead[0][0]} exited with code {dead[0][1]} during {op!r}: the engine stopped all "
                f"{len(self._procs)} ranks; check memory and the logs above, then load it again"
            )

    def _abort(self) -> None:
        self.closed = True
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=5)


def _rank_main(
    rank: int,
    port: int,
    model_dir: str,
    model_config: ModelConfig,
    config: RuntimeConfig,
    threads: int,
    native_settings: native.Settings,
    commands: mp.Queue,
    results: mp.Queue,
) -> None:
    """A TP rank: join the group, load this rank's slice, then serve commands until `stop`."""
    import torch.distributed as dist

    native.configure(native_settings)  # the engine's process's choice, not this process's environment
    from nxcore.executor import GraphRunner
    from nxcore.loader import load_rank

    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=config.tp_degree, timeout=COLLECTIVE_TIMEOUT)
        model, fingerprint = load_rank(model_dir, model_config, config, rank=rank, group=dist.group.WORLD)
        runner = GraphRunner(model, config)
        plan = model.comm.plan
        results.put((rank, True, fingerprint))
    except Exception:
        results.put((rank, False, traceback.format_exc()))
        return
    while True:
        op, payload = commands.get()
        if op == "stop":
            break
        value: Any
        try:
            if op == "run":
                outputs = runner.run(*payload)
                value = outputs if rank == 0 else None
            elif op == "export":
                value = runner.export_local(*payload)
            elif op == "import":
                slot, kv = payload
                runner.import_heads(slot, kv, plan.kv_heads[rank])
                value = None
            elif op == "profile":
                value = runner.profile(*payload)
            elif op == "prompt_logits":
                value = runner.prompt_logits(payload)
                value = value if rank == 0 else None
            else:
                raise ValueError(f"unknown TP command {op!r}")
            results.put((rank, True, value))
        except Exception:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()
