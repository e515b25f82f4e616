"""A gateway process next to a running prefill service, for `nxserve up --openai-port`, tests and
benchmarks: `with GatewayProcess(cluster.target, log_path=...) as gateway:` serves the OpenAI API at
`gateway.base_url` until the block ends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

_PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class GatewayProcess:
    """`python -m nxserve.openai --target TARGET --port PORT` (a free port for 0), up once /health answers 200."""

    def __init__(
        self, target: str, *, port: int = 0, log_path: str | os.PathLike[str], extra: list[str] | None = None, startup_timeout: float = 60.0
    ) -> None:
        self.target = target
        self.port = port or free_port()
        self.log_path = Path(log_path)
        self.extra = list(extra or [])
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> GatewayProcess:
        argv = [sys.executable, "-m", "nxserve.openai", "--target", self.target, "--port", str(self.port), *self.extra]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the OpenAI gateway did not come up: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                return bool(json.load(response).get("status") == "ok")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; the exit code."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(grace)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            code = self.process.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
