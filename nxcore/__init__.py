"""nxcore: a decoder-LLM engine built as a few static-shape graphs over a static BHSD KV cache.

The public surface: `RuntimeConfig`, `Engine`, `SamplingParams`, `generate`.
"""

from nxcore.config import RuntimeConfig
from nxcore.engine import Engine, SequenceRequest
from nxcore.errors import EngineError
from nxcore.generate import GenerationResult, generate
from nxcore.kv_cache import KVSnapshot
from nxcore.sampling import RequestRng, SamplingParams
from nxcore.stopping import StoppingCriteria

__all__ = [
    "Engine",
    "EngineError",
    "GenerationResult",
    "KVSnapshot",
    "RequestRng",
    "RuntimeConfig",
    "SamplingParams",
    "SequenceRequest",
    "StoppingCriteria",
    "generate",
]
