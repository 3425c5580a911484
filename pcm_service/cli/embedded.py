"""`pcm run`: the service, a local factory and its workers, all on this machine."""
from __future__ import annotations

import dataclasses
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import uvicorn

from factory.backends.local import LocalBackend
from factory.config import FactoryConfig
from factory.daemon import Factory
from factory.drill import EvictionSettings
from pcm_service.api import create_app
from pcm_service.cli.executors import make_executor
from pcm_service.client import ServiceClient
from pcm_service.core import ServiceConfig, ServiceCore
from pcm_service.protocol import (
    ExecutorKind,
    FactoryLimits,
    RunHistory,
    WorkloadState,
    WorkloadStatus,
    WorkloadSubmission,
)
from pcm_service.tokens import API, POOL, state_token


class EmbeddedService:
    """The real HTTP service on 127.0.0.1, run in a thread of this process; its pool and API
    tokens live in state_dir (pool.token, api.token: 0600, made on first start)."""

    def __init__(self, state_dir: str | Path, config: Optional[ServiceConfig] = None,
                 host: str = "127.0.0.1", port: int = 0, executor: ExecutorKind = ExecutorKind.NATIVE,
                 context_library: bool = True) -> None:
        self.pool_token = state_token(POOL, Path(state_dir))
        self.api_token = state_token(API, Path(state_dir))
        self.core = ServiceCore(state_dir, config)
        self.executor = make_executor(executor, self.core, self.pool_token.value, port=0, library=context_library)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.url = f"http://{host}:{self._sock.getsockname()[1]}"
        app = create_app(self.core, self.pool_token.value, self.api_token.value, self.executor)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        daemon=True, name="pcm-service")

    def start(self, timeout: float = 30.0) -> "EmbeddedService":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the embedded PCM service did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
        self.core.close()


# `pcm run` on one machine: a short factory cycle, idle workers removed soon, no scale-down delay
# (a pool's factory waits longer: FactoryConfig's defaults)
ONE_MACHINE: dict[str, Any] = {"interval": 0.5, "idle_grace": 5.0, "scale_down_delay": 0.0}


@dataclass
class RunResult:
    status: WorkloadStatus
    state_dir: Path
    makespan: float
    library_starts: dict[str, int]
    history: RunHistory  # the run over time, for `pcm report`'s plots


def run_workload(sub: WorkloadSubmission, state_dir: Path, workers: int = 1,
                 config: Optional[ServiceConfig] = None, worker_args: Optional[list[str]] = None,
                 on_progress: Optional[Callable[[WorkloadStatus], None]] = None,
                 poll: float = 0.25, eviction: Optional[EvictionSettings] = None,
                 executor: ExecutorKind = ExecutorKind.NATIVE, context_library: bool = True) -> RunResult:
    """Submit one workload to a fresh embedded pool and wait for its output file. Without model
    roots in ``config``, the workload's own model directory is the only one; without output
    roots, the directories of its output files are (raises OutputRefused for one in the state dir)."""
    config = config or ServiceConfig()
    if not config.model_roots and sub.context is not None:
        config = dataclasses.replace(config, model_roots=(Path(sub.context.model),))
    if config.output_roots is None:
        files = [sub.output, *([sub.openai.error_output] if sub.openai is not None else [])]
        config = dataclasses.replace(config, output_roots=tuple(Path(f).parent for f in files))
    service = EmbeddedService(state_dir / "service", config, executor=executor,
                              context_library=context_library).start()
    backend = LocalBackend(service.url, state_dir / "glideins", worker_args=worker_args,
                           token_file=service.pool_token.path)
    factory = Factory(ServiceClient(service.url, token=service.api_token.value), backend,
                      FactoryConfig(service=service.url, name="embedded", eviction=eviction, **ONE_MACHINE))
    try:
        service.core.set_factory_limits(FactoryLimits(min_workers=0, max_workers=workers,
                                                      per_cycle=workers))
        t0 = time.monotonic()
        wl = service.core.submit(sub)
        factory_thread = threading.Thread(target=factory.run, daemon=True, name="pcm-factory")
        factory_thread.start()
        while True:
            st = service.core.workload_status(wl.workload_id)
            if on_progress is not None:
                on_progress(st)
            if st.state == WorkloadState.COMPLETED:
                break
            service.core.wait_for_progress(poll)
        makespan = time.monotonic() - t0
        starts = service.core.library_starts()
        factory.stop()
        factory_thread.join(timeout=10)
        return RunResult(status=st, state_dir=state_dir, makespan=makespan, library_starts=starts,
                         history=service.core.history(wl.workload_id))
    finally:
        factory.stop()
        backend.close()
        service.stop()
