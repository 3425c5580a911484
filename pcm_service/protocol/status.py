"""What `pcm status` shows: workers, workloads, demand, glideins, transfers."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from pcm_service.protocol.base import Count, Strict
from pcm_service.protocol.executors import ExecutorStatus
from pcm_service.protocol.factory import Demand, Glidein
from pcm_service.protocol.states import ContextState, WorkerKind, WorkerState
from pcm_service.protocol.weights import EnvironmentFetch, FetchProgress, TransferStats
from pcm_service.protocol.workloads import WorkloadStatus


class WorkerStatus(Strict):
    worker_id: str
    host: str
    glidein_id: Optional[str]
    gpus: list[str] = Field(default_factory=list)
    state: WorkerState = Field(strict=False)
    context_id: Optional[str]
    context_state: ContextState = Field(strict=False)
    inflight_batches: Count
    rows_done: Count
    library_starts: Count
    idle_seconds: float
    last_heartbeat_age: float
    fetch: Optional[FetchProgress] = None  # while its context is fetching
    kind: WorkerKind = Field(default=WorkerKind.AGENT, strict=False)


class HostAudit(Strict):
    """Spot-check audits of one host's batches (core/audit.py)."""

    host: str  # its address, or the name a worker on the service's machine declares
    audited: Count  # its batches run again by another host
    disagreements: Count  # audits decided against it (strikes)
    barred: bool  # its workers get no more leases


class ServiceStatus(Strict):
    workers: list[WorkerStatus]
    workloads: list[WorkloadStatus]
    demand: Demand
    glideins: list[Glidein] = Field(default_factory=list)  # from the factories' last reports
    transfers: TransferStats = Field(default_factory=TransferStats)
    bootstrapping: list[EnvironmentFetch] = Field(default_factory=list)  # glideins fetching the environment
    executor: Optional[ExecutorStatus] = None  # the executor's view (the API adds it; the core has none)
    audits: list[HostAudit] = Field(default_factory=list)  # hosts audited or barred
