from nxserve.v1 import generation_pb2 as _generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelFingerprint(_message.Message):
    __slots__ = ("digest", "architecture", "dtype")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    digest: str
    architecture: str
    dtype: str
    def __init__(self, digest: _Optional[str] = ..., architecture: _Optional[str] = ..., dtype: _Optional[str] = ...) -> None: ...

class KvLayout(_message.Message):
    __slots__ = ("num_layers", "num_kv_heads", "head_dim", "n_tokens", "dtype")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    n_tokens: int
    dtype: str
    def __init__(self, num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., n_tokens: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class DecodeHeader(_message.Message):
    __slots__ = ("request_id", "sampling", "stopping", "prompt_token_ids", "first_token", "rng_offset", "fingerprint", "layout", "disable_speculation", "draft_layout", "shared_kv", "stream_interval")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RNG_OFFSET_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DISABLE_SPECULATION_FIELD_NUMBER: _ClassVar[int]
    DRAFT_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    SHARED_KV_FIELD_NUMBER: _ClassVar[int]
    STREAM_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    sampling: _generation_pb2.SamplingParameters
    stopping: _generation_pb2.StoppingParameters
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    first_token: int
    rng_offset: int
    fingerprint: ModelFingerprint
    layout: KvLayout
    disable_speculation: bool
    draft_layout: KvLayout
    shared_kv: SharedKv
    stream_interval: int
    def __init__(self, request_id: _Optional[str] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParameters, _Mapping]] = ..., stopping: _Optional[_Union[_generation_pb2.StoppingParameters, _Mapping]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., first_token: _Optional[int] = ..., rng_offset: _Optional[int] = ..., fingerprint: _Optional[_Union[ModelFingerprint, _Mapping]] = ..., layout: _Optional[_Union[KvLayout, _Mapping]] = ..., disable_speculation: _Optional[bool] = ..., draft_layout: _Optional[_Union[KvLayout, _Mapping]] = ..., shared_kv: _Optional[_Union[SharedKv, _Mapping]] = ..., stream_interval: _Optional[int] = ...) -> None: ...

class SharedKv(_message.Message):
    __slots__ = ("name", "offset", "nbytes", "crc32", "lease_expires_unix_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    nbytes: int
    crc32: int
    lease_expires_unix_ms: int
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., crc32: _Optional[int] = ..., lease_expires_unix_ms: _Optional[int] = ...) -> None: ...

class KvChunk(_message.Message):
    __slots__ = ("layer_start", "layer_end", "token_start", "token_end", "data", "crc32", "kv_set")
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    KV_SET_FIELD_NUMBER: _ClassVar[int]
    layer_start: int
    layer_end: int
    token_start: int
    token_end: int
    data: bytes
    crc32: int
    kv_set: int
    def __init__(self, layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ..., kv_set: _Optional[int] = ...) -> None: ...

class Commit(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("header", "chunk", "commit")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    header: DecodeHeader
    chunk: KvChunk
    commit: Commit
    def __init__(self, header: _Optional[_Union[DecodeHeader, _Mapping]] = ..., chunk: _Optional[_Union[KvChunk, _Mapping]] = ..., commit: _Optional[_Union[Commit, _Mapping]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("slot", "queue_ms")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    slot: int
    queue_ms: float
    def __init__(self, slot: _Optional[int] = ..., queue_ms: _Optional[float] = ...) -> None: ...

class TokenBatch(_message.Message):
    __slots__ = ("token_ids", "rng_offset")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RNG_OFFSET_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    rng_offset: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., rng_offset: _Optional[int] = ...) -> None: ...

class DecodeFinal(_message.Message):
    __slots__ = ("finish_reason", "decoded_tokens", "steps", "proposed_tokens", "accepted_tokens")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    DECODED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    finish_reason: _generation_pb2.FinishReason
    decoded_tokens: int
    steps: int
    proposed_tokens: int
    accepted_tokens: int
    def __init__(self, finish_reason: _Optional[_Union[_generation_pb2.FinishReason, str]] = ..., decoded_tokens: _Optional[int] = ..., steps: _Optional[int] = ..., proposed_tokens: _Optional[int] = ..., accepted_tokens: _Optional[int] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("ack", "tokens", "final")
    ACK_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    ack: Ack
    tokens: TokenBatch
    final: DecodeFinal
    def __init__(self, ack: _Optional[_Union[Ack, _Mapping]] = ..., tokens: _Optional[_Union[TokenBatch, _Mapping]] = ..., final: _Optional[_Union[DecodeFinal, _Mapping]] = ...) -> None: ...

class GetLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLoadResponse(_message.Message):
    __slots__ = ("free_slots", "total_slots", "queued_requests", "max_queue", "fingerprint", "completed_requests", "steps", "shm_probe", "shared_kv_requests", "chunked_kv_requests")
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SLOTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SHM_PROBE_FIELD_NUMBER: _ClassVar[int]
    SHARED_KV_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKED_KV_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    free_slots: int
    total_slots: int
    queued_requests: int
    max_queue: int
    fingerprint: str
    completed_requests: int
    steps: int
    shm_probe: str
    shared_kv_requests: int
    chunked_kv_requests: int
    def __init__(self, free_slots: _Optional[int] = ..., total_slots: _Optional[int] = ..., queued_requests: _Optional[int] = ..., max_queue: _Optional[int] = ..., fingerprint: _Optional[str] = ..., completed_requests: _Optional[int] = ..., steps: _Optional[int] = ..., shm_probe: _Optional[str] = ..., shared_kv_requests: _Optional[int] = ..., chunked_kv_requests: _Optional[int] = ...) -> None: ...
