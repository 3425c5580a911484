"""A real `pcm serve` subprocess that tests can stop, kill and restart on the same state."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pcm_service.client import ServiceClient
from pcm_service.protocol import RegisterResponse, WorkerRegistration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MODEL_ROOTS: list[Path] = []  # where tests keep models: pytest's temp root (set per session)


class ServeProcess:
    """A real `pcm serve` subprocess that can be killed and restarted on the same state.
    Its tokens: the files it generated in state_dir unless the test passes its own. Models may
    come from ``model_roots`` (default: pytest's temp root, where the tests' models are)."""

    def __init__(self, state_dir: Path, *args: str, env: dict[str, str] | None = None,
                 model_roots: list[Path] | None = None, ca_file: Path | None = None,
                 output_roots: list[Path] | None = None) -> None:
        """``ca_file``: the service runs TLS (the test passes --tls-cert/--tls-key); trust this CA.
        ``output_roots``: where outputs may be written (default: pytest's temp root, where the
        tests write them, else the state dir's parent)."""
        self.state_dir = state_dir
        self.port = free_port()
        self.ca_file = ca_file
        self.url = f"{'https' if ca_file else 'http'}://127.0.0.1:{self.port}"
        roots = MODEL_ROOTS if model_roots is None else model_roots
        outputs = output_roots if output_roots is not None else (MODEL_ROOTS or [state_dir.parent])
        args = (*args, *(a for r in roots for a in ("--model-root", str(r))),
                *(a for r in outputs for a in ("--output-root", str(r))))
        self.args = args
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = state_dir.parent / "serve.log"

    @property
    def api_token_file(self) -> Path:
        return self.state_dir / "api.token"

    @property
    def pool_token_file(self) -> Path:
        return self.state_dir / "pool.token"

    @property
    def metrics_token(self) -> str:
        return (self.state_dir / "metrics.token").read_text().strip()

    @property
    def api_token(self) -> str:
        return self.api_token_file.read_text().strip()

    @property
    def pool_token(self) -> str:
        return self.pool_token_file.read_text().strip()

    def client(self, **kw: Any) -> ServiceClient:
        """A client for the user routes (the API token)."""
        return ServiceClient(self.url, token=self.api_token, ca_file=self.ca_file, **kw)

    def worker_client(self, **kw: Any) -> ServiceClient:
        """A client for a glidein's routes (the pool token): register, executor, manifests."""
        return ServiceClient(self.url, token=self.pool_token, ca_file=self.ca_file, **kw)

    def join(self, reg: WorkerRegistration, **kw: Any) -> tuple[str, ServiceClient]:
        """Register a worker: its id and a client with its own credential, for its routes."""
        resp = self.worker_client().request("POST", "/workers", reg, RegisterResponse)
        return resp.worker_id, ServiceClient(self.url, token=resp.worker_token, ca_file=self.ca_file, **kw)

    def start(self) -> "ServeProcess":
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pcm_service.cli", "serve", "--state-dir", str(self.state_dir),
             "--port", str(self.port), *self.args], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **self.env})
        client = ServiceClient(self.url, timeout=5.0, ca_file=self.ca_file)
        deadline = time.monotonic() + 60
        try:
            while not client.healthy():  # until the server answers, or the process exits
                try:
                    code = self.proc.wait(0.1)
                except subprocess.TimeoutExpired:
                    code = None
                if code is not None or time.monotonic() > deadline:
                    raise AssertionError(f"pcm serve did not start (exit {code}):"
                                         f" {self.log_path.read_text()[-2000:]}")
        finally:
            client.close()
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill(signal.SIGTERM)
