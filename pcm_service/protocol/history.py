"""A run over time, from the service's records: what `pcm report` plots."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from pcm_service.protocol.base import Count, Strict
from pcm_service.protocol.states import ContextState, WorkerState
from pcm_service.protocol.workloads import WorkloadStatus


class WorkerChange(Strict):
    """A worker entered ``state`` (or its context ``context_state``) at ``at``."""
    worker_id: str
    at: float
    state: WorkerState = Field(strict=False)
    context_state: ContextState = Field(strict=False)


class EngineStart(Strict):
    """An engine start that ended at ``at`` (ready or failed) after ``seconds``."""
    worker_id: str
    context_id: str
    at: float
    seconds: float
    ok: bool


class RowsDone(Strict):
    """Rows of a workload finished in [at, at + width) seconds."""
    workload_id: str
    at: float
    rows: Count
    failed: Count


class BytesMoved(Strict):
    """Weight bytes that arrived in [at, at + width), from the origin or from peers."""
    at: float
    origin_bytes: Count
    peer_bytes: Count


class RunHistory(Strict):
    start: float  # the first record's time (unix seconds, or the service's clock)
    end: float
    width: float  # seconds per RowsDone / BytesMoved bucket
    workloads: list[WorkloadStatus] = Field(default_factory=list)
    workers: list[WorkerChange] = Field(default_factory=list)
    engines: list[EngineStart] = Field(default_factory=list)
    rows: list[RowsDone] = Field(default_factory=list)
    transfers: list[BytesMoved] = Field(default_factory=list)
    workload_id: Optional[str] = None  # the one workload it covers; None: the whole service
