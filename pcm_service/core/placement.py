"""Which context a worker should load when several have work.

Workers spread over the contexts in proportion to the work each has left (in seconds, from
the rows left and the measured rows/s per worker): a context nobody runs comes first, then
the one whose workers each have the most work once this one joins. A worker done with its
context switches to another only if the workers already warm for it will not finish it
before its new engine is ready and has paid for itself (the demand model's rule, for one
more worker; a new worker is not asked again: the demand model decided by that rule that it
was worth starting); a worker whose disk already holds the model gets ready sooner, so it
is preferred and its start is judged by the engine's load time alone.
"""
from __future__ import annotations

import sqlite3
from collections import Counter, defaultdict
from dataclasses import dataclass
from statistics import mean
from typing import Callable, Optional

from pcm_service.core.demand import DemandPolicy, ThroughputMeter
from pcm_service.core.views import load_time, time_to_ready
from pcm_service.protocol import (
    STAYING_WORKER_STATES,
    BatchState,
    ContextSpec,
    ContextState,
    WorkloadState,
)
from pcm_service.store import MANAGER_KIND, RUNS_ROWS, in_list
from pcm_service.weights.replicas import ReplicaMap, held_by

# a worker in one of these is (or soon will be) running its context
WARM_CONTEXT_STATES = (ContextState.FETCHING, ContextState.CACHED, ContextState.LOADING, ContextState.READY)
RATE_MIN_SPAN = 1.0  # seconds of reports before a worker's rate counts for placement


@dataclass(frozen=True)
class ContextWork:
    spec: ContextSpec
    rows_left: int  # rows of its running workloads not yet done
    queued_batches: int
    first_batch: int  # its oldest queued batch: the tie-break, older work first
    warm: int  # other staying workers fetching, loading or running it
    rate: Optional[float]  # rows/s per worker (measured on it, else pool-wide; None: not yet)
    cached: bool  # the asking worker's disk already holds its model


def worth_starting(c: ContextWork, time_to_ready: float, policy: DemandPolicy) -> bool:
    """Whether one more worker for ``c``, ready after ``time_to_ready``, still finds work worth
    its start: with n warm workers at rate r the rows left last W/r worker-seconds; the
    newcomer works (W/r - n*T) / (n+1) after its start and must work at least ``useful_ratio``*T."""
    if c.queued_batches == 0:
        return False
    if c.warm == 0:
        return True
    if c.rate is None:  # before any throughput is measured: the demand model's rule of thumb
        return c.queued_batches > c.warm * policy.batches_per_worker
    a, t = policy.useful_ratio, max(time_to_ready, 1e-3)
    return c.rows_left / c.rate >= t * (c.warm + a * (c.warm + 1))


def choose_context(options: list[ContextWork], time_to_ready: float, load_time: float,
                   policy: DemandPolicy, switching: bool = True) -> Optional[ContextSpec]:
    """The context for a worker to start (None: none is worth a start now). A worker that would
    drop its engine for it (``switching``) must find it worth the start; a new worker takes any
    context with queued work (the demand model, by the same rule, decided it was worth having)."""
    worth = [c for c in options if c.queued_batches and (not switching or worth_starting(
        c, load_time if c.cached else time_to_ready, policy))]
    if not worth:
        return None

    def share(c: ContextWork) -> float:  # seconds of work per worker once this one joins
        return c.rows_left / (c.rate or 1.0) / (c.warm + 1)

    return max(worth, key=lambda c: (c.warm == 0, c.cached, share(c), -c.first_batch)).spec


class Placement:
    """The service's side of placement: the work, warm workers, rates and caches it decides on."""

    def __init__(self, clock: Callable[[], float], throughput: ThroughputMeter, policy: DemandPolicy,
                 replicas: ReplicaMap) -> None:
        self.clock, self.throughput, self.policy, self.replicas = clock, throughput, policy, replicas

    def place(self, db: sqlite3.Connection, worker_id: str, current: Optional[str] = None) -> Optional[ContextSpec]:
        """The context ``worker_id`` should load next (None: none worth a start); ``current``
        is the one it has loaded (its own work there is done)."""
        queued = {r["context_id"]: (r["n"], r["first"]) for r in db.execute(
            "SELECT context_id, COUNT(*) AS n, MIN(batch_id) AS first FROM batches WHERE state=?"
            " GROUP BY context_id", (BatchState.QUEUED.value,)) if r["context_id"] != current}
        if not queued:
            return None
        marks, ids = in_list(list(queued))
        specs = {r["context_id"]: ContextSpec.model_validate_json(r["spec"]) for r in db.execute(
            f"SELECT context_id, spec FROM contexts WHERE context_id IN {marks}", ids)}
        env = db.execute("SELECT environment FROM workers WHERE worker_id=?", (worker_id,)).fetchone()
        # a context made for a packed environment runs only in a worker started from it
        runnable = {c for c, spec in specs.items() if not spec.environment or spec.environment == env[0]}
        queued = {c: q for c, q in queued.items() if c in runnable}
        if not queued:
            return None
        left = {r[0]: r[1] for r in db.execute(
            f"SELECT context_id, SUM(rows_total - rows_done) FROM workloads WHERE state=? AND context_id IN {marks}"
            " GROUP BY context_id", (WorkloadState.RUNNING.value, *ids))}
        staying, states = in_list(STAYING_WORKER_STATES)
        warm_marks, warm_states = in_list(WARM_CONTEXT_STATES)
        on = {r["worker_id"]: r["context_id"] for r in db.execute(
            f"SELECT worker_id, context_id FROM workers WHERE state IN {staying} AND context_state IN {warm_marks}"
            f" AND {RUNS_ROWS} AND worker_id != ?", (*states, *warm_states, MANAGER_KIND, worker_id))}
        rates = self.throughput.worker_rates(self.clock(), RATE_MIN_SPAN)
        by_context: dict[str, list[float]] = defaultdict(list)
        for wid, r in rates.items():
            if wid in on:
                by_context[on[wid]].append(r)
        pool_rate = mean(rates.values()) if rates else None
        held = held_by(db, worker_id)
        warm = Counter(on.values())
        options = [ContextWork(spec=specs[c], rows_left=left.get(c) or 0, queued_batches=n, first_batch=first,
                               warm=warm[c], rate=mean(by_context[c]) if by_context[c] else pool_rate,
                               cached=bool(held) and self._holds_model(held, specs[c]))
                   for c, (n, first) in queued.items()]
        policy = self.policy
        t_ready = time_to_ready(db) or policy.ready_estimate
        return choose_context(options, t_ready, load_time(db) or t_ready, policy, switching=current is not None)

    def _holds_model(self, held: set[str], spec: ContextSpec) -> bool:
        try:
            chunks = self.replicas.manifest(spec.model_digest).chunk_lengths
        except KeyError:
            return False
        return all(c in held for c in chunks)
