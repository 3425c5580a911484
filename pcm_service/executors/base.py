"""The executor contract: one small interface every executor implements (as a Parsl provider
does for its batch system), with one typed status whatever runs the batches.

What every executor does with the core (``ServiceCore``, the only place state lives):

1. **Takes leases.** Batches are leased with ``core.lease_batch`` under a worker record the
   executor keeps in the core. Native: each agent leases for itself over HTTP (the worker
   routes call the core); the service runs no loop for them. TaskVine: the executor's own loop
   leases under its manager record and hands each batch to TaskVine as a call.
2. **Runs them** on its workers: an agent's engine, or a TaskVine Library's.
3. **Reports results** with ``core.report``: the first result per row wins, rows handed back
   are requeued, crashes are counted; so exactly-once, ordering and outputs hold whatever the
   executor.
4. **Reports its workers' states** through the core: ``register`` when one joins,
   ``heartbeat`` (context, state, batches in flight) while it lives, ``library_event`` for its
   engine, ``retire`` when it leaves; one that goes silent is declared lost by the core's
   reaper, which requeues its leases.

``status()`` is the executor's view of those workers and of the work in flight
(``ExecutorStatus``), what `pcm status`, the status page and ``/metrics`` show for any executor.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Iterable

from pcm_service.core import ServiceCore
from pcm_service.protocol import (
    LIVE_WORKER_STATES,
    ExecutorInfo,
    ExecutorKind,
    ExecutorStatus,
    WorkerKind,
    WorkerStatus,
)

SILENT_AFTER = 2.0  # heartbeat intervals without news after which a worker no longer counts as connected


class Executor(ABC):
    """Runs the batches the core leases; see the module for what it does with the core."""

    kind: ClassVar[ExecutorKind]
    worker_kind: ClassVar[WorkerKind]  # the records of its workers in the core

    def __init__(self, core: ServiceCore) -> None:
        self.core = core

    @abstractmethod
    def start(self) -> None:
        """Begin running leased batches (called when the service starts)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop taking leases; what it held goes back to the queue (called when the service stops)."""

    @abstractmethod
    def info(self) -> ExecutorInfo:
        """What a glidein needs to join: sent to `pcm worker` before anything else."""

    @abstractmethod
    def status(self) -> ExecutorStatus:
        """Its workers (known, connected, busy) and its batches in flight, now."""

    @abstractmethod
    def describe(self) -> str:
        """One line for `pcm serve`'s start-up: the executor and how workers join it."""


def count_workers(kind: ExecutorKind, workers: Iterable[WorkerStatus], silent_after: float) -> ExecutorStatus:
    """An ExecutorStatus from the core's records of an executor's workers: known (live),
    connected (heard from within ``silent_after`` seconds), busy (a batch in flight)."""
    live = [w for w in workers if w.state in LIVE_WORKER_STATES]
    return ExecutorStatus(
        kind=kind, workers_known=len(live),
        workers_connected=sum(w.last_heartbeat_age <= silent_after for w in live),
        workers_busy=sum(w.inflight_batches > 0 for w in live),
        batches_in_flight=sum(w.inflight_batches for w in live))


class NativeExecutor(Executor):
    """PCM's own worker agents (`pcm worker`): each registers, leases, heartbeats, reports and
    retires itself over HTTP (api/worker_routes.py, worker_image/agent.py), so the service runs
    no loop for them. Its status is the core's view of the agents' records: a lease or a report
    counts as news as a heartbeat does, and a state change (busy or idle) sends one at once."""

    kind = ExecutorKind.NATIVE
    worker_kind = WorkerKind.AGENT

    def start(self) -> None:
        """Nothing to start: the agents pull their leases through the worker routes."""

    def stop(self) -> None:
        """Nothing to stop: an agent whose service went away retries, then exits; the leases it
        held expire with it (the core's reaper, after a restart)."""

    def info(self) -> ExecutorInfo:
        return ExecutorInfo(kind=self.kind)

    def status(self) -> ExecutorStatus:
        agents = [w for w in self.core.status().workers if w.kind == self.worker_kind]
        return count_workers(self.kind, agents, SILENT_AFTER * self.core.config.heartbeat_interval)

    def describe(self) -> str:
        return ("executor: native (workers: `pcm worker --service URL --token-file POOL_TOKEN_FILE`,"
                " or glideins of `pcm factory`)")
