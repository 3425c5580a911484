"""Every state a PCM object can be in, and the named groups of them the service queries by.

SQL never spells a state: it binds these values (``store.in_list``).
"""
from __future__ import annotations

import enum


class ContextState(str, enum.Enum):
    """Where a worker stands with its context (DESIGN: absent → … → ready)."""

    ABSENT = "absent"
    FETCHING = "fetching"
    CACHED = "cached"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    RETIRED = "retired"
    LOST = "lost"


class WorkloadState(str, enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"


class BatchState(str, enum.Enum):
    QUEUED = "queued"  # waiting for a worker with its context
    LEASED = "leased"  # held by a worker
    DONE = "done"  # every row has its final result


class RowState(str, enum.Enum):
    PENDING = "pending"
    DONE = "done"  # its one final result (text or error) is recorded


class GlideinState(str, enum.Enum):
    IDLE = "idle"  # queued in the batch system, not running yet
    RUNNING = "running"
    HELD = "held"
    EXITED = "exited"  # completed or removed; reported once, then forgotten


# named groups of worker states


LIVE_WORKER_STATES = (WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY, WorkerState.DRAINING)


STAYING_WORKER_STATES = (WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY)  # live, not leaving


READY_WORKER_STATES = (WorkerState.IDLE, WorkerState.BUSY)  # engine loaded
