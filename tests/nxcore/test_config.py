"""RuntimeConfig validation and JSON round trip."""

from __future__ import annotations

import pytest

from nxcore import RuntimeConfig
from nxcore.config import default_buckets


def test_default_buckets_are_powers_of_two_plus_seq_len() -> None:
    assert default_buckets(1000) == (128, 256, 512, 1000)
    assert default_buckets(512) == (128, 256, 512)
    assert default_buckets(64) == (64,)
    assert RuntimeConfig(seq_len=300).buckets == (128, 256, 300)


def test_json_round_trip(tmp_path) -> None:
    config = RuntimeConfig(batch_size=8, ctx_batch_size=2, seq_len=256, buckets=(64, 256), dtype="bfloat16", speculation_length=4)
    config.save(tmp_path / "config.json")
    assert RuntimeConfig.load(tmp_path / "config.json") == config


def test_replace_keeps_default_buckets_in_step_with_seq_len() -> None:
    assert RuntimeConfig(seq_len=256).replace(seq_len=1024).buckets == (128, 256, 512, 1024)
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
