"""The service core's facade: one object the HTTP layer, `pcm run` and the tests drive.

It owns all policy and keeps every state change inside one SQLite transaction; its
methods live in the modules beside it, one per part (workloads, workers, leasing, pool).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Optional

from pcm_service.core.batches import BatchOps
from pcm_service.core.config import ServiceConfig
from pcm_service.core.demand import Ramp, ThroughputMeter
from pcm_service.core.factories import FactoryRegistry
from pcm_service.core.history import HistoryOps
from pcm_service.core.leasing import LeaseOps
from pcm_service.core.models import ModelOps
from pcm_service.core.pool_ops import FactoryOps
from pcm_service.core.results import maybe_complete
from pcm_service.core.workers import WorkerOps
from pcm_service.core.workloads import WorkloadOps
from pcm_service.protocol import (
    LIVE_WORKER_STATES,
    WorkloadState,
)
from pcm_service.store import Store, in_list
from pcm_service.weights.modelpaths import ModelPolicy
from pcm_service.weights.replicas import ReplicaMap


def _now() -> float:
    return time.time()


class ServiceCore(WorkloadOps, ModelOps, BatchOps, WorkerOps, LeaseOps, FactoryOps, HistoryOps):
    def __init__(self, state_dir: str | Path, config: Optional[ServiceConfig] = None,
                 clock: Callable[[], float] = _now) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config = config or ServiceConfig()
        self.clock = clock
        self.store = Store(self.state_dir / "pcm.sqlite3")
        self.store.set_clock(clock)
        self.factories = FactoryRegistry(self.store)
        models = ModelPolicy.of(self.config.model_roots, (self.state_dir, *self.config.secret_paths))
        self.replicas = ReplicaMap(self.store, self.config.transfers, clock, models)
        self.throughput = ThroughputMeter(self.config.demand)
        self.ramp = Ramp(self.config.demand)
        self._progress = threading.Condition()
        self._worker_tokens: dict[str, str] = {}  # worker → its credential's digest (a cache of the table)
        self._recover()

    def _recover(self) -> None:
        """Give known workers a full timeout to reconnect and finish interrupted completions."""
        now = self.clock()
        with self.store.transaction() as db:
            live, states = in_list(LIVE_WORKER_STATES)
            db.execute(f"UPDATE workers SET last_heartbeat=? WHERE state IN {live}", (now, *states))
            pending = [r["workload_id"] for r in db.execute(
                "SELECT workload_id FROM workloads WHERE state=? AND rows_done=rows_total",
                (WorkloadState.RUNNING.value,))]
            for wl in pending:
                maybe_complete(db, now, wl)  # not before its open audits
        self.discard_staged()  # submissions a crash interrupted were never acknowledged

    def close(self) -> None:
        self.store.close()
