"""A worker's settings and defaults in one place (`pcm worker` takes its option defaults from
here), and the resources it reports."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from pcm_service.protocol import Resources


def detect_resources() -> Resources:
    assigned = os.environ.get("_CONDOR_AssignedGPUs") or os.environ.get("CUDA_VISIBLE_DEVICES", "")
    gpus = [g for g in assigned.split(",") if g and g != "10000"]  # HTCondor's "no GPU" marker
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return Resources(cpus=int(os.environ.get("_CONDOR_NPROCS", cpus)), memory_mb=mem_mb, gpus=gpus)


@dataclass
class PeerSettings:
    """How this worker gets weights from peers and serves them to newcomers."""

    serve: bool = True  # run a blob server (peers must be able to connect to it)
    host: Optional[str] = None  # address peers reach it on (default: the one facing the service)
    port: int = 0
    url: Optional[str] = None  # the URL peers use, when it differs from host:port (NAT, forwarding)
    upload_rate: float = 0.0  # bytes/s for all uploads together, 0: unlimited
    upload_slots: int = 2  # uploads at once
    fetch_parallel: int = 4  # downloads at once


@dataclass(frozen=True)
class AgentDefaults:
    """The agent's defaults, in one place (`pcm worker` takes its option defaults from here)."""

    target_rows: int = 0  # rows kept in flight in the engine; 0: twice its max_num_seqs
    max_batches: int = 1024  # batches in flight at most
    start_timeout: float = 900.0  # seconds allowed for the engine to start
    drain_timeout: float = 1.0  # on SIGTERM: seconds for in-flight rows before handing the rest back


DEFAULTS = AgentDefaults()
