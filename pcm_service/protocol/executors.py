"""The executors' wire models: where TaskVine workers find the service's manager, and the
manager's own view of its workers (what `pcm status` shows next to the glideins)."""
from __future__ import annotations

import re
from typing import Optional

from pydantic import Field

from pcm_service.protocol.base import Count, Strict
from pcm_service.protocol.states import ExecutorKind

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
    port: Count
    project: Optional[str]
    workers_connected: Count = 0
    calls_waiting: Count = 0
    calls_running: Count = 0
    libraries_installed: list[str] = Field(default_factory=list)  # context ids
    workers: list[VineWorkerView] = Field(default_factory=list)
