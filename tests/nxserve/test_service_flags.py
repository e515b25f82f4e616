"""Parsing of the services' shared-memory flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from nxserve.grpc_common import shm_dir_arg
from prefill_svc.__main__ import _size, build_parser


def test_sizes_take_k_m_g_suffixes_and_refuse_nonsense() -> None:
    assert [_size(v) for v in ("4096", "256M", "256MB", "1G", "1.5k")] == [4096, 256 << 20, 256 << 20, 1 << 30, 1536]
    for bad in ("abc", "0", "-1M", "M"):
        with pytest.raises(argparse.ArgumentTypeError):
            _size(bad)


def test_kv_shm_dir_none_turns_shared_memory_off() -> None:
    assert shm_dir_arg("none") is None and shm_dir_arg("None") is None and shm_dir_arg("/x") == Path("/x")
    args = build_parser().parse_args(["--model", "m", "--decode", "h:1", "--kv-shm-dir", "none", "--kv-shm-bytes", "64M"])
    assert args.kv_shm_dir is None and args.kv_shm_bytes == 64 << 20
