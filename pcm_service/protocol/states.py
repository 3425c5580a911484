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


class ExecutorKind(str, enum.Enum):
    """Who runs the leased batches: PCM's own worker agents, or TaskVine workers of the
    service's TaskVine manager (`pcm serve --executor`)."""

    NATIVE = "native"
    TASKVINE = "taskvine"


class WorkerKind(str, enum.Enum):
    """What a worker record stands for."""

    AGENT = "agent"  # a `pcm worker` agent (the native executor)
    VINE_WORKER = "vine_worker"  # a TaskVine worker, as the service's manager sees it
    VINE_MANAGER = "vine_manager"  # the TaskVine manager: holds the leases of its function calls


class WorkloadState(str, enum.Enum):
    RUNNING = "running"
    CANCELLING = "cancelling"  # nothing more is leased; waits for the batches in flight
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # its completion window passed; unfinished rows failed as expired


class BatchState(str, enum.Enum):
    STAGED = "staged"  # its workload is still arriving: not leased until the last row is stored
    QUEUED = "queued"  # waiting for a worker with its context
    LEASED = "leased"  # held by a worker
    DONE = "done"  # every row has its final result
    CANCELLED = "cancelled"  # its workload was cancelled before it was leased


class RowState(str, enum.Enum):
    PENDING = "pending"
    DONE = "done"  # its one final result (text or error) is recorded


class RowErrorCode(str, enum.Enum):
    """Why a row ended with an error (its OpenAI error line follows from it)."""

    REJECTED = "engine_rejected"  # the engine refused the request (HTTP 400 in OpenAI's terms)
    FAILED = "failed"  # PCM gave up on it: poisoned, or its batch lost too often (500)
    EXPIRED = "batch_expired"  # the completion window passed first
    CANCELLED = "batch_cancelled"  # its batch was cancelled first


class ChatRole(str, enum.Enum):
    SYSTEM = "system"
    DEVELOPER = "developer"  # OpenAI's newer name for system
    USER = "user"
    ASSISTANT = "assistant"


class BatchEndpoint(str, enum.Enum):
    """The OpenAI endpoints a batch may target (the others are refused with ``invalid_value``)."""

    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"


class OpenAIBatchStatus(str, enum.Enum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


class GlideinState(str, enum.Enum):
    IDLE = "idle"  # queued in the batch system, not running yet
    RUNNING = "running"
    HELD = "held"
    EXITED = "exited"  # completed or removed; reported once, then forgotten


# named groups of worker states


LIVE_WORKER_STATES = (WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY, WorkerState.DRAINING)


STAYING_WORKER_STATES = (WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY)  # live, not leaving


READY_WORKER_STATES = (WorkerState.IDLE, WorkerState.BUSY)  # engine loaded


OPEN_BATCH_STATES = (BatchState.QUEUED, BatchState.LEASED)  # rows still to run (not done, not cancelled)
