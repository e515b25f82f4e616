"""What can go wrong with a request, by kind: the one error taxonomy of nxserve's serving side.

Domain code (the prefill worker and router, the decode loop, KV transfer) raises these and never
touches a gRPC status code; `nxserve.rpc.status` maps each kind to exactly one code at the
servers' edge, and back when a service reads another's status. The message says what was wrong
and what to do, naming the value and the limit where there is one.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A request that cannot be served as asked. Subclasses say why, and so which status a caller gets."""


class InvalidRequest(ServiceError):
    """A field out of its bounds, or a request the model cannot run as given (INVALID_ARGUMENT)."""


class Unauthenticated(ServiceError):
    """No API key, or one the service does not know (UNAUTHENTICATED)."""


class Overloaded(ServiceError):
    """Queues, slots or a caller's share are full: retry later or elsewhere (RESOURCE_EXHAUSTED).
    The status carries `grpc-retry-pushback-ms`, which gRPC's client-side retries honour."""

    def __init__(self, message: str, *, retry_after_ms: int = 250) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class NotReady(ServiceError):
    """The service is still loading its model, or shutting down (UNAVAILABLE)."""


class NoReplica(ServiceError):
    """No decode replica can take the request now: none up, or every one tried failed (UNAVAILABLE)."""


class ReplicaFailed(ServiceError):
    """A decode replica failed or went away while it held the request (UNAVAILABLE)."""


class EngineFailure(ServiceError):
    """The engine failed while running the request (a step raised, a TP rank died): this service
    cannot finish it, another one may (UNAVAILABLE)."""


class ModelMismatch(ServiceError):
    """The peer serves another model, dtype or KV layout (FAILED_PRECONDITION)."""


class Unsupported(ServiceError):
    """The served model cannot do what the request asks, such as tokenize text without tokenizer
    files (FAILED_PRECONDITION)."""


class SharedMemoryUnreadable(ServiceError):
    """The decode replica cannot open the sender's shared-memory arena (it does not share the
    directory): the sender should send the KV as chunks instead (FAILED_PRECONDITION)."""


class LeaseExpired(ServiceError):
    """The sender's lease on the shared-memory region ran out (or nearly): the region may already
    hold another request's KV (ABORTED)."""


class KVCorrupted(ServiceError):
    """KV that fails its checks: a CRC-32, a size, a range, cells missing at the commit (DATA_LOSS)."""


class DeadlineExceeded(ServiceError):
    """The request's deadline passed (DEADLINE_EXCEEDED)."""


class Cancelled(ServiceError):
    """The caller cancelled the request (CANCELLED)."""


class Internal(ServiceError):
    """A fault of the service itself, not of the request (INTERNAL): the log has the details."""
