"""nxserve: disaggregated LLM serving on nxcore.

The client classes are imported on first use, so `import nxserve` (and the command line) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nxserve.client import AsyncClient, Client, GenerationChunk, GenerationResult, Usage

__all__ = ["AsyncClient", "Client", "GenerationChunk", "GenerationResult", "Usage"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from nxserve import client

        return getattr(client, name)
    raise AttributeError(f"module 'nxserve' has no attribute {name!r}")
