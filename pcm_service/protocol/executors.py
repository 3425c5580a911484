"""The executors' wire models: what a glidein runs (ExecutorInfo), every executor's view of its
workers and work (ExecutorStatus, what `pcm status` and the status page show), and the TaskVine
manager's own facts inside it."""
from __future__ import annotations

import re
from typing import Optional

from pydantic import Field

from pcm_service.protocol.base import Count, Strict
from pcm_service.protocol.states import ExecutorKind

TASKVINE_PORT = 9123  # TaskVine's own default manager port (vine_worker's and vine_status's too)

# TaskVine reports no label a worker may set but its os and arch strings (shown, never matched
# on): a glidein's `pcm worker` puts the glidein id in the os string it gives vine_worker
GLIDEIN_IN_OS = re.compile(r"pcm-glidein=(\S+)")


def glidein_os(glidein_id: str, os_name: str = "linux") -> str:
    return f"{os_name}:pcm-glidein={glidein_id}"


class ExecutorInfo(Strict):
    """What a glidein asks the service first: run a PCM agent, or a ``vine_worker`` against the
    manager at the service's host on ``port`` (the host is the one in the service URL)."""

    kind: ExecutorKind = Field(strict=False)
    port: Optional[Count] = None
    project: Optional[str] = None
    ssl: bool = False


class VineWorkerView(Strict):
    """One TaskVine worker as the manager sees it (``Manager.status("workers")``)."""

    worker_id: Optional[str]  # PCM's record of it
    host: str
    addrport: str
    glidein_id: Optional[str] = None
    cores: Count = 0
    memory_mb: Count = 0
    gpus: Count = 0
    libraries: list[str] = Field(default_factory=list)  # contexts whose library it has run a call in
    calls_running: Count = 0


class TaskVineStatus(Strict):
    """The TaskVine manager's own facts (``Manager.stats``, ``status("workers")``)."""

    port: Count
    project: Optional[str]
    workers_connected: Count = 0
    calls_waiting: Count = 0
    calls_running: Count = 0
    libraries_installed: list[str] = Field(default_factory=list)  # context ids
    workers: list[VineWorkerView] = Field(default_factory=list)


class ExecutorStatus(Strict):
    """Every executor's view of its workers and work, whatever runs them (``Executor.status``).
    Workers are counted from the records the executor keeps in the core (agents, or the
    manager's vine_workers), never the service's own manager record."""

    kind: ExecutorKind = Field(strict=False)
    workers_known: Count = 0  # live records of its workers in the core (not retired nor lost)
    workers_connected: Count = 0  # those it can hand work now (heard from lately; on TaskVine's manager)
    workers_busy: Count = 0  # those running a batch
    batches_in_flight: Count = 0  # leased to its workers and not yet answered
    taskvine: Optional[TaskVineStatus] = None  # the manager's own facts, with the TaskVine executor
