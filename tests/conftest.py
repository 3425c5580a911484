"""Fixtures only (what tests share besides fixtures is in tests/support/): a tiny real model,
workload files, a real `pcm serve` process, a clean environment."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.support import REPO
from tests.support.serve import MODEL_ROOTS, ServeProcess
from tests.support.workloads import write_claims

# the `pool` fixture: a real HTCondor test pool; the session fails if a process it started outlives it
pytest_plugins = ["tests.htcondor_pool.fixtures", "tests.support.leaks"]
TOKEN_ENV = ("PCM_API_TOKEN", "PCM_POOL_TOKEN", "PCM_API_TOKEN_FILE", "PCM_POOL_TOKEN_FILE", "PCM_TOKEN_FILE")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pcm_service.cli.tinymodel import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def write_workload(tmp_path: Path) -> Callable[..., Path]:
    """Write a workload YAML (+ its JSONL inputs) into tmp_path; overrides replace fields."""

    def write(*args: Any, **fields: Any) -> Path:
        return write_claims(tmp_path, *args, **fields)

    return write


@pytest.fixture(scope="session", autouse=True)
def _model_roots(tmp_path_factory: pytest.TempPathFactory) -> None:
    MODEL_ROOTS[:] = [tmp_path_factory.getbasetemp()]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeProcess]:
    s = ServeProcess(tmp_path / "state").start()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PCM_SERVICE_URL", raising=False)
    for name in TOKEN_ENV:  # the developer's own tokens must not leak into tests
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    os.environ.setdefault("PYTHONPATH", str(REPO))
