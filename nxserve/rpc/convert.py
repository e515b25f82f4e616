"""Protobuf <-> nxcore, in one place: the servicers call these and see no `*_pb2` field elsewhere."""

from __future__ import annotations

from collections.abc import Sequence

from nxcore import SamplingParams, StoppingCriteria
from nxcore.generate import FinishReason
from nxserve.v1 import decode_pb2
from nxserve.v1 import generation_pb2 as gen_pb2

DEFAULT_MAX_NEW_TOKENS = 16

FINISH_TO_PB = {
    FinishReason.LENGTH: gen_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: gen_pb2.FINISH_REASON_EOS,
    FinishReason.STOP: gen_pb2.FINISH_REASON_STOP,
}
FINISH_FROM_PB = {v: k for k, v in FINISH_TO_PB.items()}


def sampling_from_pb(pb: gen_pb2.SamplingParameters, *, seed: int | None = None) -> SamplingParams:
    return SamplingParams(
        temperature=pb.temperature,
        top_k=pb.top_k,
        top_p=pb.top_p if pb.top_p > 0 else 1.0,
        seed=pb.seed if pb.HasField("seed") else seed,
    )


def sampling_to_pb(sampling: SamplingParams) -> gen_pb2.SamplingParameters:
    pb = gen_pb2.SamplingParameters(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    if sampling.seed is not None:
        pb.seed = sampling.seed
    return pb


def stopping_from_pb(pb: gen_pb2.StoppingParameters) -> tuple[StoppingCriteria, tuple[str, ...]]:
    criteria = StoppingCriteria(
        max_new_tokens=pb.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        stop_token_ids=tuple(pb.stop_token_ids),
        ignore_eos=pb.ignore_eos,
    )
    return criteria, tuple(pb.stop_strings)


def stopping_to_pb(criteria: StoppingCriteria, stop_strings: Sequence[str]) -> gen_pb2.StoppingParameters:
    return gen_pb2.StoppingParameters(
        max_new_tokens=criteria.max_new_tokens,
        stop_token_ids=list(criteria.stop_token_ids),
        stop_strings=list(stop_strings),
        ignore_eos=criteria.ignore_eos,
    )


def fingerprint_pb(*, digest: str, architecture: str, dtype: str) -> decode_pb2.ModelFingerprint:
    return decode_pb2.ModelFingerprint(digest=digest, architecture=architecture, dtype=dtype)


def decode_header(
    *,
    request_id: str,
    prompt_ids: Sequence[int],
    sampling: SamplingParams,
    stopping: StoppingCriteria,
    stop_strings: Sequence[str],
    first_token: int,
    rng_offset: int,
    fingerprint: decode_pb2.ModelFingerprint,
    disable_speculation: bool = False,
) -> decode_pb2.DecodeHeader:
    """The header of a Decode stream; the KV's layouts (and region) are filled in by `KVSender.send`."""
    return decode_pb2.DecodeHeader(
        request_id=request_id,
        sampling=sampling_to_pb(sampling),
        stopping=stopping_to_pb(stopping, stop_strings),
        prompt_token_ids=list(prompt_ids),
        first_token=first_token,
        rng_offset=rng_offset,
        fingerprint=fingerprint,
        disable_speculation=disable_speculation,
    )
