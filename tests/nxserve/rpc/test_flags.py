"""Engine flags declared once: every command gets the same flags, they build the runtime config,
and `nxserve up` forwards every one of them to the services it starts."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from decode_svc.__main__ import build_parser as decode_parser
from nxserve.cli import build_parser as cli_parser
from nxserve.commands.serving import _cluster_from_args
from nxserve.rpc.flags import ENV_COMPILE_CACHE, EngineFlags, shm_dir_arg
from prefill_svc.__main__ import build_parser as prefill_parser

EVERY_FLAG = EngineFlags(
    dtype="bfloat16",
    batch_size=3,
    ctx_batch_size=2,
    seq_len=512,
    buckets=(128, 512),
    backend="compile",
    compile_cache="/tmp/cc",
    compile_on_demand=True,
    batch_invariant=True,
    max_topk=64,
    tp=2,
    ep=2,
    moe_capacity_factor=1.5,
    threads=1,
    speculation="ngram",
    speculation_length=3,
)


def _argv(flags: EngineFlags) -> list[str]:
    return EngineFlags.set_in(argparse.Namespace(**dataclasses.asdict(flags)))


def test_every_field_differs_from_its_default_in_the_fixture() -> None:
    """The tests below would miss a flag left at its default."""
    for f in dataclasses.fields(EngineFlags):
        assert getattr(EVERY_FLAG, f.name) != f.default, f.name


def test_flags_round_trip_through_every_service_and_generate() -> None:
    argv = _argv(EVERY_FLAG)
    for parser, own in ((decode_parser(), []), (prefill_parser(), ["--decode", "h:1"])):
        assert EngineFlags.from_args(parser.parse_args(["--model", "m", *own, *argv])) == EVERY_FLAG
    args = cli_parser().parse_args(["generate", "--model", "m", *argv])
    assert EngineFlags.from_args(args) == EVERY_FLAG


def test_up_forwards_every_engine_flag_to_every_service(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({}))
    args = cli_parser().parse_args(["up", "--model", str(tmp_path), *_argv(EVERY_FLAG), "--kv-shm-dir", "none"])
    cluster = _cluster_from_args(args)
    decode = decode_parser().parse_args(["--model", "m", *cluster.engine_args, *cluster.decode_args])
    prefill = prefill_parser().parse_args(["--model", "m", "--decode", "h:1", *cluster.engine_args, *cluster.prefill_args])
    for parsed in (decode, prefill):
        assert EngineFlags.from_args(parsed) == EVERY_FLAG
        assert parsed.kv_shm_dir is None
    args = cli_parser().parse_args(["up", "--model", str(tmp_path), "--prefill-tp", "2", "--decode-tp", "1"])
    cluster = _cluster_from_args(args)
    assert cluster.engine_args == [] and cluster.prefill_args == ["--tp", "2"] and cluster.decode_args == ["--tp", "1"]
    one_side = ["--backend", "compile", "--prefill-backend", "eager", "--max-prefill-tokens", "512", "--stream-interval", "4"]
    args = cli_parser().parse_args(["up", "--model", str(tmp_path), *one_side])
    cluster = _cluster_from_args(args)
    decode = decode_parser().parse_args(["--model", "m", *cluster.engine_args, *cluster.decode_args])
    prefill = prefill_parser().parse_args(["--model", "m", "--decode", "h:1", *cluster.engine_args, *cluster.prefill_args])
    assert (decode.backend, prefill.backend, prefill.max_prefill_tokens, prefill.stream_interval) == ("compile", "eager", 512, 4)
    args = cli_parser().parse_args(["up", "--model", str(tmp_path), "--decode-backend", "compile"])
    cluster = _cluster_from_args(args)
    assert cluster.engine_args == [] and cluster.prefill_args == [] and cluster.decode_args == ["--backend", "compile"]


def test_unset_flags_take_each_services_defaults_and_the_environment_gives_the_cache() -> None:
    decode = EngineFlags.from_args(decode_parser().parse_args(["--model", "m"]))
    prefill = EngineFlags.from_args(prefill_parser().parse_args(["--model", "m", "--decode", "h:1"]), environ={ENV_COMPILE_CACHE: "/c"})
    assert decode.service_config("decode", max_positions=4096).batch_size == 8
    assert prefill.service_config("prefill", max_positions=4096).batch_size == 4
    assert prefill.service_config("prefill", max_positions=512).seq_len == 512  # capped by the model
    assert prefill.compile_cache == "/c" and decode.compile_cache is None
    spec = dataclasses.replace(decode, speculation="ngram", speculation_length=2)
    assert spec.service_config("decode", max_positions=4096).speculation_length == 2
    assert spec.service_config("prefill", max_positions=4096).speculation_length == 0


def test_help_shows_each_flags_default_once(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        decode_parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 8)" in out and "(default: 256)" in out and "(default: eager)" in out
    assert "default: 8) (default" not in out


def test_kv_shm_dir_none_turns_shared_memory_off() -> None:
    assert shm_dir_arg("none") is None and shm_dir_arg("None") is None and shm_dir_arg("/x") == Path("/x")
    args = prefill_parser().parse_args(["--model", "m", "--decode", "h:1", "--kv-shm-dir", "none", "--kv-shm-bytes", "64M"])
    assert args.kv_shm_dir is None and args.kv_shm_bytes == 64 << 20


def test_core_turns_wait_is_checked_when_the_flags_are_parsed(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad --core-turns-wait-s stops the service before it loads a model, naming the value."""
    parser = decode_parser()
    args = parser.parse_args(["--model", "m", "--core-turns", "/tmp/t", "--core-turns-wait-s", "2.5"])
    assert args.core_turns_wait_s == 2.5
    for bad in ("0", "-1", "nan", "soon"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--model", "m", "--core-turns-wait-s", bad])
        assert "--core-turns-wait-s" in capsys.readouterr().err


def test_stream_interval_is_checked_when_the_flags_are_parsed(capsys: pytest.CaptureFixture[str]) -> None:
    """--stream-interval takes 1..65536 (what a request's stream_interval and decode's header allow)."""
    parser = prefill_parser()
    assert parser.parse_args(["--model", "m", "--decode", "h:1"]).stream_interval == 1
    assert parser.parse_args(["--model", "m", "--decode", "h:1", "--stream-interval", "65536"]).stream_interval == 65536
    for bad in ("0", "-2", "65537", "four"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--model", "m", "--decode", "h:1", "--stream-interval", bad])
        assert "--stream-interval" in capsys.readouterr().err
