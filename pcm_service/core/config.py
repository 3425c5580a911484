"""The service's settings: one home for every default (the CLI takes its defaults from here)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pcm_service.core.demand import DemandPolicy
from pcm_service.core.trust import WorkerTrust
from pcm_service.weights.replicas import TransferPolicy

RUN_IDLE_TIMEOUT = 30.0  # `pcm run`: an idle worker on this machine retires sooner than in a pool


@dataclass
class ServiceConfig:
    heartbeat_interval: float = 2.0
    worker_timeout: float = 10.0  # no heartbeat for this long: the worker is lost, its leases expire
    idle_timeout: float = 60.0  # a worker with nothing to do retires after this
    max_attempts: int = 3  # an engine that fails to start this often fails its context's rows
    poison_after: int = 2  # a row in flight at this many library crashes is failed, not retried
    # a batch whose worker was lost this often is failed (it may be what kills them). Only a safety
    # net: the head of the queue is re-leased by every replacement, so an eviction storm hits the
    # same batches over and over; a row that kills its engine is caught by poison_after instead
    max_losses: int = 50
    demand: DemandPolicy = field(default_factory=DemandPolicy)
    transfers: TransferPolicy = field(default_factory=TransferPolicy)  # model weights
    trust: WorkerTrust = field(default_factory=WorkerTrust)  # what a worker may say of itself
    # model weights are read only from directories under these (ModelPolicy); never from the
    # state directory or these secret files (token files, the TLS key), whatever the roots
    model_roots: tuple[Path, ...] = ()
    secret_paths: tuple[Path, ...] = ()
    # a workload's output files are written only under these (None: anywhere, for a core in a
    # test or `pcm run`'s own); never inside the state directory nor over a secret file
    output_roots: Optional[tuple[Path, ...]] = None
    max_request_bytes: int = 64 * 2**20  # larger request bodies get 413
    max_submission_bytes: int = 2**30  # the same for a workload submission (it holds every row)
