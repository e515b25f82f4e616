"""The one mapping between nxserve's errors (`nxserve.rpc.errors`) and gRPC status codes.

Servers install `ErrorInterceptor`: a handler raises a `ServiceError` (or lets nxcore's errors
through) and the interceptor aborts the call with the kind's code, its message, and the kind's
name in the trailing metadata `nxserve-error`, so that a service reading another's status
(`error_from_rpc`) gets back the exact kind, not only the code. Anything else a handler raises is
a fault of the service: INTERNAL, with an error id that the log line carrying the traceback
repeats. No call ends with UNKNOWN.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeAlias

import grpc

from nxcore.errors import EngineError, TPRankError
from nxserve.rpc.errors import (
    Cancelled,
    DeadlineExceeded,
    EngineFailure,
    Internal,
    InvalidRequest,
    KVCorrupted,
    LeaseExpired,
    ModelMismatch,
    NoReplica,
    NotReady,
    Overloaded,
    ReplicaFailed,
    ServiceError,
    SharedMemoryUnreadable,
    Unauthenticated,
    Unsupported,
)

log = logging.getLogger(__name__)

Code: TypeAlias = grpc.StatusCode

STATUS_CODES: dict[type[ServiceError], Code] = {
    InvalidRequest: Code.INVALID_ARGUMENT,
    Unauthenticated: Code.UNAUTHENTICATED,
    Overloaded: Code.RESOURCE_EXHAUSTED,
    NotReady: Code.UNAVAILABLE,
    NoReplica: Code.UNAVAILABLE,
    ReplicaFailed: Code.UNAVAILABLE,
    EngineFailure: Code.UNAVAILABLE,
    ModelMismatch: Code.FAILED_PRECONDITION,
    SharedMemoryUnreadable: Code.FAILED_PRECONDITION,
    Unsupported: Code.FAILED_PRECONDITION,
    KVCorrupted: Code.DATA_LOSS,
    LeaseExpired: Code.ABORTED,
    DeadlineExceeded: Code.DEADLINE_EXCEEDED,
    Cancelled: Code.CANCELLED,
    Internal: Code.INTERNAL,
}
"""Each kind of error and the status a caller gets for it."""

_FROM_CODE: dict[Code, type[ServiceError]] = {
    Code.INVALID_ARGUMENT: InvalidRequest,
    Code.RESOURCE_EXHAUSTED: Overloaded,
    Code.UNAUTHENTICATED: Unauthenticated,
    Code.UNAVAILABLE: ReplicaFailed,
    Code.FAILED_PRECONDITION: ModelMismatch,
    Code.DATA_LOSS: KVCorrupted,
    Code.DEADLINE_EXCEEDED: DeadlineExceeded,
    Code.CANCELLED: Cancelled,
}
"""The kind a status without `nxserve-error` metadata (from a server that is not nxserve's) stands for."""

_BY_NAME = {kind.__name__: kind for kind in STATUS_CODES}
PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""Trailing metadata of RESOURCE_EXHAUSTED: milliseconds to wait before a retry (gRPC's retry policy reads it)."""
KIND_KEY = "nxserve-error"
"""Trailing metadata key carrying the error kind's name (e.g. SharedMemoryUnreadable)."""


def as_service_error(exc: BaseException) -> ServiceError:
    """`exc` as a kind of the taxonomy: nxcore's own errors translated; anything else is Internal,
    logged here with its traceback under the error id its message gives."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, EngineError):  # a request the engine cannot run as given
        return InvalidRequest(str(exc))
    if isinstance(exc, TPRankError):
        return EngineFailure(str(exc))
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s: %s: %s", error_id, type(exc).__name__, exc, exc_info=exc)
    return Internal(f"internal error {error_id} ({type(exc).__name__}): the service's log has the details")


def status_of(error: ServiceError) -> tuple[Code, str, tuple[tuple[str, str], ...]]:
    """(code, details, trailing metadata) of a call that ends with `error`."""
    kind = next(k for k in type(error).__mro__ if k in STATUS_CODES)
    metadata: tuple[tuple[str, str], ...] = ((KIND_KEY, kind.__name__),)
    if isinstance(error, Overloaded):
        metadata += ((PUSHBACK_KEY, str(error.retry_after_ms)),)
    return STATUS_CODES[kind], str(error) or kind.__name__, metadata


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """End the call with the status `exc` maps to."""
    code, details, metadata = status_of(as_service_error(exc))
    await context.abort(code, details, metadata)
    raise AssertionError("unreachable: abort raises")


def error_from_rpc(code: Code, details: str, trailing_metadata: Iterable[tuple[str, Any]] | None, *, peer: str) -> ServiceError:
    """The error another service's status stands for, its message prefixed with `peer`."""
    names = [value for key, value in (trailing_metadata or ()) if key == KIND_KEY]
    kind = _BY_NAME.get(names[0]) if names else None
    if kind is None:
        kind = _FROM_CODE.get(code, Internal)
    return kind(f"{peer}: {details or code.name}")


async def error_of_call(call: grpc.aio.Call, *, peer: str) -> ServiceError:
    """The error a finished (failed) call stands for."""
    return error_from_rpc(await call.code(), await call.details() or "", await call.trailing_metadata(), peer=peer)


@dataclass(frozen=True)
class Malformed:
    """A request message that did not parse (not protobuf, or invalid UTF-8 in a string field), as
    `safe_deserializer` hands it to the handler instead of failing inside gRPC (UNKNOWN, and a
    traceback in the log per request): the interceptor, or the stream's reader, refuses it."""

    message: str
    """The message type it should have been."""
    error: str

    def refusal(self) -> InvalidRequest:
        return InvalidRequest(f"malformed {self.message}: {self.error}")


def safe_deserializer(parse: Callable[[bytes], Any], message: str) -> Callable[[bytes], Any]:
    """`parse`, returning a Malformed instead of raising."""

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # DecodeError, UnicodeDecodeError, ValueError: the bytes are not the message
            return Malformed(message, f"{type(exc).__name__}: {exc}"[:200])

    return deserialize


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Ends every call whose handler raises with the status `status_of` gives (see the module)."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        for field in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behaviour = getattr(handler, field)
            if behaviour is not None:
                return handler._replace(**{field: _mapped(behaviour)})
        return handler


def _mapped(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                if isinstance(request, Malformed):
                    raise request.refusal()
                async for response in behaviour(request, context):
                    yield response
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                await abort(context, exc)

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, Malformed):
                raise request.refusal()
            return await behaviour(request, context)
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await abort(context, exc)

    return call
