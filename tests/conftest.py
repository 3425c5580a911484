"""Shared fixtures: a tiny real model, workload files, a real `pcm serve` process."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from pcm_service.client import ServiceClient

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["htcondor_pool.fixtures"]  # the `pool` fixture: a real HTCondor test pool


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pcm_service.cli.tinymodel import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


ENGINE = {"dtype": "float32", "max_model_len": 256, "enforce_eager": True,
          "kv_cache_memory_bytes": 128 * 2**20}


def fake_model(d: Path) -> Path:
    """A directory the service accepts as a model (config.json + a weight file); no engine loads it."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"not really weights")
    return d


@pytest.fixture
def write_workload(tmp_path: Path) -> Callable[..., Path]:
    """Write a workload YAML (+ its JSONL inputs) into tmp_path; overrides replace fields."""

    def write(rows: list[dict[str, Any]] | None = None, model: str | Path = "model",
              raw: str | None = None, name: str = "wl.yaml", **fields: Any) -> Path:
        if rows is None:
            rows = [{"id": f"r{i}", "claim": f"Claim number {i} is true."} for i in range(20)]
        (tmp_path / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if model == "model":  # a directory that passes validation (no engine is started from it)
            fake_model(tmp_path / "model")
        spec: dict[str, Any] = {
            "name": "test", "model": str(model), "engine": dict(ENGINE),
            "sampling": {"temperature": 0, "max_tokens": 8},
            "inputs": {"path": "inputs.jsonl", "template": "Claim: {claim}\nVerdict:", "id_field": "id"},
            "batch_size": 5, "output": "out/results.jsonl",
        }
        spec.update(fields)
        path = tmp_path / name
        path.write_text(raw if raw is not None else yaml.safe_dump(spec))
        return path

    return write


_REFERENCE: dict[str, list[str]] = {}  # one reference run per distinct request in a session


def reference_texts(model: Path, prompts: list[str], engine: dict[str, Any],
                    sampling: dict[str, Any], tmp: Path) -> list[str]:
    """vLLM's own LLM.generate on ``prompts``, in a separate process (tests/reference_generate.py)."""
    key = json.dumps([str(model), prompts, engine, sampling], sort_keys=True)
    if key not in _REFERENCE:
        _REFERENCE[key] = _reference_texts(model, prompts, engine, sampling, tmp)
    return _REFERENCE[key]


def _reference_texts(model: Path, prompts: list[str], engine: dict[str, Any],
                     sampling: dict[str, Any], tmp: Path) -> list[str]:
    from pcm_service.protocol import EngineSettings, SamplingSettings

    (tmp / "prompts.json").write_text(json.dumps(prompts))
    (tmp / "engine.json").write_text(EngineSettings(**engine).model_dump_json())
    (tmp / "sampling.json").write_text(SamplingSettings(**sampling).model_dump_json())
    ref = subprocess.run([sys.executable, str(REPO / "tests" / "reference_generate.py"), str(model),
                          str(tmp / "prompts.json"), str(tmp / "engine.json"), str(tmp / "sampling.json"),
                          str(tmp / "texts.json")],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert ref.returncode == 0, ref.stderr[-3000:]
    return json.loads((tmp / "texts.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MODEL_ROOTS: list[Path] = []  # where tests keep models: pytest's temp root (set per session)


@pytest.fixture(scope="session", autouse=True)
def _model_roots(tmp_path_factory: pytest.TempPathFactory) -> None:
    MODEL_ROOTS[:] = [tmp_path_factory.getbasetemp()]


class ServeProcess:
    """A real `pcm serve` subprocess that can be killed and restarted on the same state.
    Its tokens: the files it generated in state_dir unless the test passes its own. Models may
    come from ``model_roots`` (default: pytest's temp root, where the tests' models are)."""

    def __init__(self, state_dir: Path, *args: str, env: dict[str, str] | None = None,
                 model_roots: list[Path] | None = None, ca_file: Path | None = None) -> None:
        """``ca_file``: the service runs TLS (the test passes --tls-cert/--tls-key); trust this CA."""
        self.state_dir = state_dir
        self.port = free_port()
        self.ca_file = ca_file
        self.url = f"{'https' if ca_file else 'http'}://127.0.0.1:{self.port}"
        roots = MODEL_ROOTS if model_roots is None else model_roots
        args = (*args, *(a for r in roots for a in ("--model-root", str(r))))
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
    def api_token(self) -> str:
        return self.api_token_file.read_text().strip()

    @property
    def pool_token(self) -> str:
        return self.pool_token_file.read_text().strip()

    def client(self, **kw: Any) -> ServiceClient:
        """A client for the user routes (the API token)."""
        return ServiceClient(self.url, token=self.api_token, ca_file=self.ca_file, **kw)

    def worker_client(self, **kw: Any) -> ServiceClient:
        """A client for the worker routes (the pool token)."""
        return ServiceClient(self.url, token=self.pool_token, ca_file=self.ca_file, **kw)

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


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeProcess]:
    s = ServeProcess(tmp_path / "state").start()
    yield s
    s.stop()


TOKEN_ENV = ("PCM_API_TOKEN", "PCM_POOL_TOKEN", "PCM_API_TOKEN_FILE", "PCM_POOL_TOKEN_FILE", "PCM_TOKEN_FILE")


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PCM_SERVICE_URL", raising=False)
    for name in TOKEN_ENV:  # the developer's own tokens must not leak into tests
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    os.environ.setdefault("PYTHONPATH", str(REPO))
