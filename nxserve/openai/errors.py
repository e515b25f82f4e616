"""Errors of the OpenAI-compatible API: OpenAI's error JSON, with the HTTP status each gRPC code maps to.

The gateway refuses what it cannot serve itself (400 for a field it does not support, 404 for a
model it does not serve) and passes everything else to prefill, whose status codes come from
nxserve's one error taxonomy (`nxserve.rpc.status`); `from_rpc` is the one mapping from those
codes to HTTP. The body is OpenAI's: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

import grpc

from nxserve.rpc.status import PUSHBACK_KEY

# gRPC code -> (HTTP status, OpenAI error type). The types are those OpenAI's API returns for the
# same status; the openai client picks its exception class from the status alone.
_FROM_CODE: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),  # bounds, prompt too long, bad sampling values
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),  # e.g. text without tokenizer files
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),  # no or unknown API key
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),  # queues full, per-key limit
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),  # no decode replica, loading, draining
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
"""Trailing metadata of RESOURCE_EXHAUSTED: the wait prefill asks for, sent on as Retry-After."""


class ApiError(Exception):
    """A request the API answers with an error: HTTP status, message, and OpenAI's type, param and code."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code
        self.headers: dict[str, str] = {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def sse(self) -> bytes:
        """The error as a server-sent event, for a stream whose 200 status is already on the wire."""
        return b"data: " + json.dumps(self.body()).encode() + b"\n\n"


def invalid(message: str, *, param: str | None = None) -> ApiError:
    """400 for a request field the gateway refuses (unsupported or out of bounds)."""
    return ApiError(400, message, param=param)


def from_rpc(error: grpc.aio.AioRpcError) -> ApiError:
    """The HTTP error for a failed gRPC call: status and type from the code, prefill's message as is."""
    code = error.code()
    status, kind = _FROM_CODE.get(code, (500, "server_error"))
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (error.details() or ""):
        status, kind = 413, "invalid_request_error"  # gRPC's own message-size limit (a prompt past --max-prompt-bytes), not a full queue
    out = ApiError(status, error.details() or HTTPStatus(status).phrase, type=kind, code=code.name.lower())
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        pushback = dict(error.trailing_metadata() or ()).get(PUSHBACK_KEY)
        if isinstance(pushback, str) and pushback.isdigit():
            out.headers["Retry-After"] = str(max(1, -(-int(pushback) // 1000)))  # whole seconds, rounded up
    return out
