"""nxcore -> protobuf for the messages the services send; what they receive is read and bounded by
`nxserve.rpc.validate`. The servicers see no `*_pb2` field elsewhere."""

from __future__ import annotations

from collections.abc import Sequence

from nxcore import SamplingParams, StoppingCriteria
from nxcore.generate import FinishReason
from nxserve.v1 import decode_pb2
from nxserve.v1 import generation_pb2 as gen_pb2

FINISH_TO_PB = {
    FinishReason.LENGTH: gen_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: gen_pb2.FINISH_REASON_EOS,
    FinishReason.STOP: gen_pb2.FINISH_REASON_STOP,
}
FINISH_FROM_PB = {v: k for k, v in FINISH_TO_PB.items()}


def sampling_to_pb(sampling: SamplingParams) -> gen_pb2.SamplingParameters:
    pb = gen_pb2.SamplingParameters(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    if sampling.seed is not None:
        pb.seed = sampling.seed
    return pb


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
    stream_interval: int = 1,
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
        stream_interval=stream_interval,
    )
