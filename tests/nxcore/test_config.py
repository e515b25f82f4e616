"""RuntimeConfig validation and JSON round trip."""

from __future__ import annotations

import pytest

from nxcore import RuntimeConfig
from nxcore.config import default_buckets


def test_default_buckets_follow_each_backends_steps_per_octave() -> None:
    assert default_buckets(1000) == (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1000)
    assert default_buckets(1000, "compile") == (64, 96, 128, 192, 256, 384, 512, 768, 1000)
    assert default_buckets(512, "xla") == (64, 96, 128, 192, 256, 384, 512)
    assert default_buckets(20) == (20,)
    assert default_buckets(48, "compile") == (48,)
    assert RuntimeConfig(seq_len=300, backend="compile").buckets == (64, 96, 128, 192, 256, 300)


def test_padding_of_uniform_prompts_stays_within_a_step() -> None:
    """Prompts of every length 32..512 padded to their bucket: the fraction of computed tokens that
    are padding (the issue's bound: 15%)."""

    def padding(buckets: tuple[int, ...]) -> float:
        computed = sum(next(b for b in buckets if b >= n) for n in range(32, 513))
        return 1 - sum(range(32, 513)) / computed

    assert padding(default_buckets(512)) < 0.08
    assert padding(default_buckets(512, "compile")) < 0.15
    assert padding((128, 256, 512)) > 0.25  # powers of two, the previous default


def test_compiled_backends_keep_power_of_two_kv_buckets_unless_buckets_are_given() -> None:
    assert RuntimeConfig(seq_len=1000, backend="compile").kv_buckets == (128, 256, 512, 1000)
    assert RuntimeConfig(seq_len=300).kv_buckets == RuntimeConfig(seq_len=300).buckets
    assert RuntimeConfig(seq_len=128, buckets=(24, 100, 128), backend="compile").kv_buckets == (24, 100, 128)


def test_json_round_trip(tmp_path) -> None:
    config = RuntimeConfig(batch_size=8, ctx_batch_size=2, seq_len=256, buckets=(64, 256), dtype="bfloat16", speculation_length=4)
    config.save(tmp_path / "config.json")
    assert RuntimeConfig.load(tmp_path / "config.json") == config


def test_replace_keeps_default_buckets_in_step_with_seq_len() -> None:
    assert RuntimeConfig(seq_len=256).replace(seq_len=1024).buckets == default_buckets(1024)
    assert RuntimeConfig(seq_len=256).replace(backend="compile").buckets == default_buckets(256, "compile")
    assert RuntimeConfig(seq_len=256, buckets=(64, 256)).replace(seq_len=1024).buckets == (64, 256)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(batch_size=0), r"batch_size=0 is invalid: allowed >= 1"),
        (dict(batch_size=2, ctx_batch_size=3), r"ctx_batch_size=3 is invalid: allowed 1..batch_size \(2\)"),
        (dict(seq_len=128, buckets=(64, 256)), r"buckets=\(64, 256\) is invalid: allowed integers in 1..seq_len \(128\)"),
        (dict(buckets=(256, 128)), r"strictly ascending"),
        (dict(dtype="int8"), r"dtype='int8' is invalid"),
        (dict(backend="tensorrt"), r"backend='tensorrt' is invalid: allowed one of \['eager', 'compile', 'xla'\]"),
        (dict(seq_len=64, speculation_length=64), r"speculation_length=64 is invalid: allowed 0..63"),
        (dict(max_topk=0), r"max_topk=0 is invalid"),
        (dict(tp_degree=0), r"tp_degree=0 is invalid"),
    ],
)
def test_invalid_values_name_field_value_and_range(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RuntimeConfig(**changes)


def test_unknown_fields_in_json_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown RuntimeConfig fields \['slots'\]"):
        RuntimeConfig.from_dict({"slots": 4})
