"""A local nxserve deployment: N decode_svc processes and one prefill_svc process on 127.0.0.1.

    with LocalCluster("/tmp/tiny-llama", decode_replicas=2) as cluster:
        Client(cluster.target).generate_text("Hello")

Every service starts at once. The cluster is up when each reports SERVING and prefill's router
routes to every decode replica (ModelInfo's decode_replicas_up), so the first request finds them
all. Each child writes stdout and stderr to its own log file.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from nxserve.omp_env import oversubscribed, share_cores

if TYPE_CHECKING:
    import grpc

    from nxserve.client import Client
    from nxserve.pki import ClusterTLS

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
ROUTE_WAIT_S = 15.0
"""How long prefill may take, once every service is SERVING, to route to every replica: its router
polls them every 0.5 s, and a channel that found a replica not yet listening retries after gRPC's
reconnect backoff (1 s, then 1.6 s, 2.6 s, ...). Longer means it never will (another model)."""
# Reconnect quickly while a service is still starting (gRPC's default backoff grows to minutes).
_PROBE_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _flag(args: Sequence[str], name: str) -> str | None:
    """The value of the last `name VALUE` or `name=VALUE` in args."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


class ClusterError(RuntimeError):
    """A service exited or did not become SERVING in time."""


@dataclass
class _Service:
    name: str  # "decode-0", ..., "prefill"
    module: str  # run as `python -m module`
    health_name: str  # the gRPC service whose health is checked
    port: int
    log_dir: Callable[[], Path]
    """The cluster's log folder (made on first use)."""
    process: subprocess.Popen | None = None
    log_file: IO[bytes] | None = None
    extra: list[str] | None = None
    """The flags it was started with beyond the cluster's (for a restart)."""

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir() / f"{self.name}.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _free_ports(n: int) -> list[int]:
    """n distinct ports free on HOST right now (the sockets are held until all are picked)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalCluster:
    """Start, health-check and stop a prefill process and `decode_replicas` decode processes.

    `port` is prefill's (public) port, 0 for a free one; `engine_args` (e.g. ["--dtype", "float32",
    "--seq-len", "512"]) go to every service, so both sides build the same KV layout. Logs go to
    `log_dir`, or to a temporary directory that is removed when every service stopped cleanly.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        decode_replicas: int = 2,
        port: int = 0,
        engine_args: Sequence[str] = (),
        prefill_args: Sequence[str] = (),
        decode_args: Sequence[str] = (),
        log_dir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 120.0,
        tls: ClusterTLS | None = None,
        api_key: str | None = None,
        metrics_port: int | None = None,
    ) -> None:
        if decode_replicas < 1:
            raise ValueError(f"decode_replicas must be >= 1, got {decode_replicas}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {port}")
        model = Path(model_dir)
        # The services read the model (nxcore.checkpoint); this only fails early, without importing torch.
        if not ((model / "config.json").is_file() or (model.is_file() and model.suffix == ".gguf") or (model.is_dir() and any(model.glob("*.gguf")))):
            raise FileNotFoundError(f"{model / 'config.json'} does not exist: not a Hugging Face checkpoint, nor a GGUF file (or a folder of one)")
        self.model_dir = str(model_dir)
        self.engine_args = list(engine_args)
        self.prefill_args = list(prefill_args)
        """Extra flags for prefill only (e.g. ["--tp", "2"])."""
        self.decode_args = list(decode_args)
        """Extra flags for every decode replica only."""
        self.startup_timeout = startup_timeout
        self.tls = tls
        """TLS on every service and mTLS between prefill and decode (`ClusterTLS.create` makes throwaway certificates)."""
        self.api_key = api_key
        """The key this cluster's own checks send, when prefill_args name an --api-keys-file."""
        self.metrics_port = metrics_port
        """Prefill serves Prometheus metrics on this port, decode replica i on this + 1 + i (None: none)."""
        self._owns_log_dir = log_dir is None
        self._log_dir = None if log_dir is None else Path(log_dir)
        *decode_ports, free_port = _free_ports(decode_replicas + 1)
        self._decodes = [_Service(f"decode-{i}", "decode_svc", "nxserve.v1.Decode", p, self._log_folder) for i, p in enumerate(decode_ports)]
        self._prefill = _Service("prefill", "prefill_svc", "nxserve.v1.Generation", port or free_port, self._log_folder)

    @property
    def log_dir(self) -> Path:
        """Where the services log: the `log_dir` given, or a temporary folder, made when first asked
        for (a cluster that never starts leaves nothing behind)."""
        return self._log_folder()

    def _log_folder(self) -> Path:
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix="nxserve-cluster-"))
        self._log_dir.mkdir(parents=True, exist_ok=True)
        return self._log_dir

    def client(self, **kwargs: Any) -> Client:
        """A client of the public API with this cluster's CA and API key."""
        from nxserve.client import Client

        return Client(self.target, tls_ca=self.tls.ca if self.tls else None, api_key=self.api_key, **kwargs)

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments of `Client`/`AsyncClient` for this cluster (CA, API key)."""
        return {"tls_ca": self.tls.ca if self.tls else None, "api_key": self.api_key}

    def _channel(self, service: _Service) -> grpc.Channel:
        """A blocking channel to one of the services, for start-up checks (mTLS to decode)."""
        import grpc

        if self.tls is None:
            return grpc.insecure_channel(service.target, options=_PROBE_OPTIONS)
        client = self.tls.client if service.module == "decode_svc" else None
        credentials = grpc.ssl_channel_credentials(
            self.tls.ca.read_bytes(), client.key.read_bytes() if client else None, client.cert.read_bytes() if client else None
        )
        return grpc.secure_channel(service.target, credentials, options=_PROBE_OPTIONS)

    @property
    def target(self) -> str:
        """Public address (prefill's Generation service)."""
        return self._prefill.target

    @property
    def decode_targets(self) -> list[str]:
        return [s.target for s in self._decodes]

    @property
    def services(self) -> list[_Service]:
        return [*self._decodes, self._prefill]

    def start(self) -> LocalCluster:
        """Start every service at once and wait until all are SERVING and prefill routes to every
        decode replica; on failure stop them and raise ClusterError. (Prefill used to start once
        the replicas served, which took both startups in a row.)"""
        atexit.register(self._kill)
        deadline = time.monotonic() + self.startup_timeout
        try:
            tls_decode, tls_prefill = (self.tls.decode_args(), self.tls.prefill_args()) if self.tls else ([], [])
            for s in self._decodes:
                self._spawn(s, [*tls_decode, *self.decode_args])
            self._spawn(self._prefill, ["--decode", ",".join(self.decode_targets), *tls_prefill, *self.prefill_args])
            self._wait_serving(self.services, deadline)
            self._wait_routed(min(deadline, time.monotonic() + ROUTE_WAIT_S))
        except BaseException:
            self.stop(grace=2)
            raise
        log.info("cluster up: prefill %s, decode %s (logs in %s)", self.target, ", ".join(self.decode_targets), self.log_dir)
        return self

    def openmp_threads(self) -> int:
        """OpenMP threads of every engine process this cluster starts: each service's --threads (torch's
        default: one per core) times its --tp rank processes."""
        return self._engine_threads(self.prefill_args) + len(self._decodes) * self._engine_threads(self.decode_args)

    def _engine_threads(self, extra: list[str]) -> int:
        """OpenMP threads of one service's engine: its --threads times its --tp rank processes."""
        args = [*self.engine_args, *extra]
        return int(_flag(args, "--threads") or os.cpu_count() or 1) * int(_flag(args, "--tp") or 1)

    def _spawn(self, service: _Service, extra: list[str]) -> None:
        argv = [sys.executable, "-m", service.module, "--model", self.model_dir, "--port", str(service.port), *self.engine_args, *extra]
        if self.metrics_port is not None:
            argv += ["--metrics-port", str(self.metrics_ports()[service.name])]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # Each service keeps a service.name of its own: OTEL_SERVICE_NAME, when set, becomes its
        # prefix (name-prefill, name-decode), and the instance (decode-0, ...) goes into the resource.
        role = service.module.removesuffix("_svc")
        if env.get("OTEL_SERVICE_NAME"):
            env["OTEL_SERVICE_NAME"] = f"{env['OTEL_SERVICE_NAME']}-{role}"
        env["OTEL_RESOURCE_ATTRIBUTES"] = ",".join(filter(None, [env.get("OTEL_RESOURCE_ATTRIBUTES"), f"service.instance.id={service.name}"]))
        # Engines whose threads together outnumber the cores take turns computing (nxserve.rpc.turns),
        # so each computes alone and keeps libgomp's spinning; one whose own threads (its ranks')
        # outnumber them spins less (nxserve.omp_env).
        if oversubscribed(self.openmp_threads()) and _flag(argv, "--core-turns") is None:
            argv += ["--core-turns", str(self.log_dir / "core-turns")]
        if share_cores(env, threads=self._engine_threads(extra)):
            log.debug("%s: GOMP_SPINCOUNT=%s, its engine's threads outnumber the cores", service.name, env["GOMP_SPINCOUNT"])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
        service.extra = extra
        if service.log_file:
            service.log_file.close()
        service.log_file = open(service.log_path, "ab" if service.process else "wb")  # noqa: SIM115 (closed in stop); a restart appends
        log.debug("starting %s: %s", service.name, " ".join(argv))
        # A session of their own: the parent decides when they stop (a terminal's Ctrl-C reaches only it).
        service.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=service.log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def _wait_serving(self, services: list[_Service], deadline: float) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        pending = {s.name: s for s in services}
        channels = {s.name: self._channel(s) for s in services}
        try:
            while pending:
                self._raise_if_exited(pending.values(), "before serving")
                for name, s in list(pending.items()):
                    stub = health_pb2_grpc.HealthStub(channels[name])
                    try:
                        status = stub.Check(health_pb2.HealthCheckRequest(service=s.health_name), timeout=1.0).status
                    except grpc.RpcError:  # not listening yet, or the service not registered yet
                        continue
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        log.info("%s SERVING on %s", name, s.target)
                        del pending[name]
                if pending and time.monotonic() > deadline:
                    tails = "\n".join(f"--- {s.log_path}:\n{s.log_tail()}" for s in pending.values())
                    raise ClusterError(f"{', '.join(pending)} not SERVING after {self.startup_timeout:.0f}s\n{tails}")
                if pending:
                    time.sleep(0.1)
        finally:
            for channel in channels.values():
                channel.close()

    def _wait_routed(self, deadline: float) -> None:
        """Until prefill's ModelInfo counts every decode replica as up (its router polls them every
        0.5 s, so it may not have seen the last one start serving yet)."""
        import grpc

        from nxserve.v1 import generation_pb2, generation_pb2_grpc

        want, up = len(self._decodes), -1
        auth = (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()
        with self._channel(self._prefill) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            while True:
                self._raise_if_exited(self.services, "after serving")
                try:
                    up = stub.ModelInfo(generation_pb2.ModelInfoRequest(), timeout=1.0, metadata=auth).decode_replicas_up
                except grpc.RpcError as exc:
                    log.debug("prefill ModelInfo: %s", exc)
                if up == want:
                    return
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"prefill routes to {max(up, 0)} of {want} decode replicas, though every service reports SERVING; "
                        f"last lines of {self._prefill.log_path}:\n{self._prefill.log_tail()}"
                    )
                time.sleep(0.1)

    @staticmethod
    def _raise_if_exited(services: Iterable[_Service], when: str) -> None:
        for s in services:
            if s.process is not None and s.process.poll() is not None:
                raise ClusterError(f"{s.name} exited with code {s.process.returncode} {when}; last lines of {s.log_path}:\n{s.log_tail()}")

    def service(self, name: str) -> _Service:
        """The service called `name` ("prefill", "decode-0", ...)."""
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(f"no service {name!r}: the cluster has {', '.join(s.name for s in self.services)}")

    def metrics_ports(self) -> dict[str, int]:
        """Each service's Prometheus port (with `metrics_port`)."""
        if self.metrics_port is None:
            return {}
        return {"prefill": self.metrics_port, **{s.name: self.metrics_port + 1 + i for i, s in enumerate(self._decodes)}}

    def restart(self, name: str, *, timeout: float | None = None) -> None:
        """Start a service that exited (killed, say) again, with the same flags and port, and wait
        until it reports SERVING."""
        s = self.service(name)
        if s.process is not None and s.process.poll() is None:
            raise ClusterError(f"{name} is still running (pid {s.process.pid}): stop it first")
        self._spawn(s, s.extra or [])
        self._wait_serving([s], time.monotonic() + (timeout or self.startup_timeout))

    def exited(self) -> list[tuple[str, int]]:
        """(name, exit code) of every started service that is no longer running."""
        return [(s.name, s.process.returncode) for s in self.services if s.process and s.process.poll() is not None]

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every service, wait up to `grace` seconds, then SIGKILL what is left."""
        running = [(s, s.process) for s in self.services if s.process and s.process.poll() is None]
        for _, process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for s, process in running:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs: killing it", s.name, grace)
        self._kill()
        atexit.unregister(self._kill)
        clean = all(s.process is None or s.process.returncode == 0 for s in self.services)
        if self._log_dir is None:
            return
        if self._owns_log_dir and clean:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None
        elif not clean:
            log.info("service logs kept in %s", self._log_dir)

    def _kill(self) -> None:
        for s in self.services:
            if s.process and s.process.poll() is None:
                s.process.kill()
                s.process.wait()
            if s.log_file:
                s.log_file.close()
                s.log_file = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
