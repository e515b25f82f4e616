"""KV transfer between the services: the interface (`transfer`), chunks and the Decode stream's
framing (`codec`), shared memory on one host (`shm`). See `nxserve.kv.transfer` for the picture."""

from nxserve.kv.codec import DEFAULT_CHUNK_BYTES, DecodeRequests, DecodeStub, Layout, add_decode_servicer
from nxserve.kv.transfer import CHUNKS, SHM, KVReceiver, KVSender, OutboundKV, ReceivedKV, Transfer, engine_layout

__all__ = [
    "CHUNKS",
    "DEFAULT_CHUNK_BYTES",
    "SHM",
    "DecodeRequests",
    "DecodeStub",
    "KVReceiver",
    "KVSender",
    "Layout",
    "OutboundKV",
    "ReceivedKV",
    "Transfer",
    "add_decode_servicer",
    "engine_layout",
]
