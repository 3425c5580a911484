"""What every part of the service core shares: its state."""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Callable, Iterable, Optional

from pcm_service.core.config import ServiceConfig
from pcm_service.core.demand import Ramp, ThroughputMeter
from pcm_service.core.factories import FactoryRegistry
from pcm_service.protocol import (
    ContextSpec,
    Demand,
    FactoryLimits,
    Heartbeat,
    NamedModel,
    OpenAIOutput,
    RowIn,
    SamplingSettings,
    SubmitResponse,
    WorkerState,
)
from pcm_service.store import Store
from pcm_service.weights.replicas import ReplicaMap


class CoreBase:
    """The state the parts of ServiceCore share (set by ``ServiceCore.__init__``)."""

    state_dir: Path
    config: ServiceConfig
    clock: Callable[[], float]
    store: Store
    factories: FactoryRegistry
    replicas: ReplicaMap
    throughput: ThroughputMeter
    ramp: Ramp
    _progress: threading.Condition
    _worker_tokens: dict[str, str]

    # what one part of the core calls on another (each defined in the part named)
    def _live_worker(self, db: sqlite3.Connection, worker_id: str) -> sqlite3.Row:  # workers
        raise NotImplementedError

    def retire(self, worker_id: str, state: WorkerState = WorkerState.RETIRED) -> int:  # workers
        raise NotImplementedError

    def library_starts(self, worker_id: Optional[str] = None) -> dict[str, int]:  # workers
        raise NotImplementedError

    def _reconcile(self, db: sqlite3.Connection, worker_id: str, hb: Heartbeat) -> None:  # leasing
        raise NotImplementedError

    def named_model(self, name: str) -> NamedModel:  # models
        raise NotImplementedError

    def has_model(self, name: str) -> bool:  # models
        raise NotImplementedError

    def context_of(self, model: Optional[str], context: Optional[ContextSpec]) -> ContextSpec:  # workloads
        raise NotImplementedError

    def check_chat(self, context: ContextSpec, model: Optional[str]) -> None:  # workloads
        raise NotImplementedError

    def insert_workload(self, name: str, context: ContextSpec, model: Optional[str], sampling: SamplingSettings,
                        batch_size: int, output: str, openai: Optional[OpenAIOutput],
                        rows: Iterable[RowIn]) -> SubmitResponse:  # workloads
        raise NotImplementedError

    def _settle_cancelling(self, db: sqlite3.Connection, now: float,
                           wl_id: Optional[str] = None) -> None:  # batches
        raise NotImplementedError

    def factory_limits(self) -> FactoryLimits:  # pool_ops
        raise NotImplementedError

    def demand(self) -> Demand:  # pool_ops
        raise NotImplementedError
