"""TLS, mTLS and API keys: the services' credentials, and the gate every public call passes.

- `TLSFiles` serve TLS (and, with a client CA, require client certificates signed by it: mTLS).
  The files are read again when they change, at the next connection's handshake (gRPC's dynamic
  server credentials), so certificates rotated on disk (cert-manager, a renewed Secret) take
  effect without a restart; connections already open keep the certificate they started with.
- `ChannelTLS` is a caller's side: the CA it trusts, and its own certificate for mTLS. gRPC fixes
  a channel's credentials when it is made, so the prefill service makes new channels to its decode
  replicas when these files change (`DecodeRouter`).
- `ApiKeys` reads one key per line from a file, again when the file changes (a mounted Kubernetes
  Secret is replaced that way). `ClientGate` checks `authorization: Bearer KEY` on the calls of
  the services it guards (health and reflection stay open for probes) and caps the calls each key
  has in flight.

A TLS handshake that fails (an untrusted or expired certificate, a missing client certificate)
never reaches a handler: the caller sees UNAVAILABLE, gRPC's code for a connection it could not make.
"""

from __future__ import annotations

import hmac
import inspect
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from nxserve.rpc.errors import Overloaded, Unauthenticated

log = logging.getLogger(__name__)


def _stamp(paths: Iterable[Path | None]) -> tuple[tuple[int, int, int], ...]:
    """What changes when any of the files is replaced or rewritten (symlinks followed)."""
    out = []
    for path in paths:
        if path is not None:
            st = os.stat(path)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class TLSFiles:
    """A server's certificate chain and key (PEM), and the CA its clients' certificates must be
    signed by (None: no client certificate asked for)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def _configuration(self) -> Any:
        ca = _read(self.client_ca, "client CA (--tls-client-ca)") if self.client_ca else None
        pair = (_read(self.key, "TLS key (--tls-key)"), _read(self.cert, "TLS certificate (--tls-cert)"))
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that re-read the files at a handshake after they changed."""
        files = (self.cert, self.key, self.client_ca)
        state = {"stamp": _stamp(files)}
        lock = threading.Lock()

        def fetch() -> Any:
            try:
                with lock:
                    stamp = _stamp(files)
                    if stamp == state["stamp"]:
                        return None
                    configuration = self._configuration()
                    state["stamp"] = stamp
                log.info("TLS: certificate files changed on disk; new connections use them (%s)", self.cert)
                return configuration
            except (OSError, ValueError) as exc:  # mid-rotation (a file missing for a moment): keep the old ones
                log.warning("TLS: keeping the current certificate, the new files cannot be read yet: %s", exc)
                return None

        return grpc.dynamic_ssl_server_credentials(self._configuration(), fetch, require_client_authentication=self.client_ca is not None)


@dataclass(frozen=True)
class ChannelTLS:
    """A caller's TLS: the CA to trust (None: the system's roots), its own certificate and key for mTLS."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None
    """The name to check the server's certificate against, when it is not the address dialled."""

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key and the key its certificate (--decode-tls-cert with --decode-tls-key)")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA") if self.ca else None,
            private_key=_read(self.key, "client key") if self.key else None,
            certificate_chain=_read(self.cert, "client certificate") if self.cert else None,
        )

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def stamp(self) -> tuple[tuple[int, int, int], ...]:
        """Changes when any of the files changes (channels are then made again)."""
        return _stamp((self.ca, self.cert, self.key))


def secure_or_insecure_channel(target: str, tls: ChannelTLS | None, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])


class ApiKeys:
    """Keys from a file, one per line (blank lines and # comments ignored), read again when the file
    changes: checked at most every `recheck_s` seconds, so a call costs a stat at most that often."""

    def __init__(self, path: Path, *, recheck_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.recheck_s = recheck_s
        self.clock = clock
        self._lock = threading.Lock()
        self._keys = self._load()
        self._stamp = _stamp([self.path])
        self._checked = clock()

    def _load(self) -> tuple[bytes, ...]:
        lines = _read(self.path, "API keys file (--api-keys-file)").decode().splitlines()
        keys = tuple(line.strip().encode() for line in lines if line.strip() and not line.strip().startswith("#"))
        if not keys:
            raise ValueError(f"the API keys file {self.path} has no keys (one per line)")
        return keys

    def keys(self) -> tuple[bytes, ...]:
        now = self.clock()
        with self._lock:
            if now - self._checked >= self.recheck_s:
                self._checked = now
                try:
                    stamp = _stamp([self.path])
                    if stamp != self._stamp:
                        self._keys, self._stamp = self._load(), stamp
                        log.info("API keys: %d key(s) read again from %s", len(self._keys), self.path)
                except (OSError, ValueError) as exc:
                    log.warning("API keys: keeping the current keys, %s cannot be read: %s", self.path, exc)
            return self._keys

    def check(self, metadata: Iterable[tuple[str, Any]] | None) -> str:
        """The caller's key; Unauthenticated unless `authorization: Bearer KEY` names a known one."""
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            raise Unauthenticated("this service needs an API key: send the metadata 'authorization: Bearer KEY'")
        value = values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")
        scheme, _, key = value.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise Unauthenticated("the authorization metadata must be 'Bearer KEY'")
        given = key.strip().encode()
        known = False
        for k in self.keys():  # every key compared, in constant time each: no timing hint of which is close
            known |= hmac.compare_digest(given, k)
        if not known:
            raise Unauthenticated("unknown API key")
        return key.strip()


class ClientGate(grpc.aio.ServerInterceptor):
    """For the calls of `services` (full names): the API key (when `keys` is given) and a cap of
    `max_inflight` calls in flight per key (0: none; without keys every caller shares one). Raises
    the taxonomy's errors; the error interceptor, outside this one, maps them."""

    ANONYMOUS = ""

    def __init__(self, *, services: Iterable[str], keys: ApiKeys | None = None, max_inflight: int = 0) -> None:
        self.prefixes = tuple(f"/{s}/" for s in services)
        self.keys = keys
        self.max_inflight = max_inflight
        self.inflight: Counter[str] = Counter()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self.prefixes) or (self.keys is None and not self.max_inflight):
            return handler
        metadata = handler_call_details.invocation_metadata
        for field in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behaviour = getattr(handler, field)
            if behaviour is not None:
                return handler._replace(**{field: self._gated(behaviour, metadata)})
        return handler

    def _admit(self, metadata: Any) -> str:
        key = self.keys.check(metadata) if self.keys is not None else self.ANONYMOUS
        if self.max_inflight and self.inflight[key] >= self.max_inflight:
            raise Overloaded(f"this API key already has {self.inflight[key]} calls in flight (--max-inflight-per-key={self.max_inflight})")
        self.inflight[key] += 1
        return key

    def _release(self, key: str) -> None:
        self.inflight[key] -= 1
        if self.inflight[key] <= 0:
            del self.inflight[key]

    def _gated(self, behaviour: Callable[..., Any], metadata: Any) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behaviour):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                key = self._admit(metadata)
                try:
                    async for response in behaviour(request, context):
                        yield response
                finally:
                    self._release(key)

            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            key = self._admit(metadata)
            try:
                return await behaviour(request, context)
            finally:
                self._release(key)

        return call
