"""Workers: registration, heartbeats, engine events, retirement, loss."""
from __future__ import annotations

import hmac
import sqlite3
import uuid
from typing import Callable, Optional

from pcm_service.core.config import ServiceConfig
from pcm_service.core.demand import ThroughputMeter
from pcm_service.core.errors import Refused, UnknownWorker
from pcm_service.core.factories import FactoryRegistry
from pcm_service.core.results import fail_rows, reconcile, requeue
from pcm_service.core.trust import audit_address, check_blob_url
from pcm_service.protocol import (
    LIVE_WORKER_STATES,
    OPEN_BATCH_STATES,
    STAYING_WORKER_STATES,
    BatchState,
    ContextState,
    ErrorCode,
    FetchPlan,
    FetchRequest,
    Heartbeat,
    HeartbeatResponse,
    IdleReport,
    LibraryEvent,
    RegisterResponse,
    RetireDecision,
    RowErrorCode,
    WorkerKind,
    WorkerRegistration,
    WorkerState,
)
from pcm_service.store import MANAGER_KIND, RUNS_ROWS, Store, in_list
from pcm_service.tokens import new_worker_token, worker_token_digest
from pcm_service.weights.replicas import ReplicaMap


def live_worker(db: sqlite3.Connection, worker_id: str) -> sqlite3.Row:
    """The worker's row, if it is live (with ``barred``: its host failed audits, core/audit.py,
    read here to spare the lease a statement); else raises UnknownWorker saying why."""
    w = db.execute("SELECT *, EXISTS (SELECT 1 FROM barred_hosts b WHERE b.host=COALESCE(workers.address,"
                   " workers.host)) AS barred FROM workers WHERE worker_id=?", (worker_id,)).fetchone()
    if w is None:
        raise UnknownWorker(worker_id)
    if w["state"] not in LIVE_WORKER_STATES:
        raise UnknownWorker(worker_id, WorkerState(w["state"]))
    return w


class Workers:
    """The life of a worker as the service sees it, and the weights it fetches."""

    def __init__(self, store: Store, clock: Callable[[], float], config: ServiceConfig, replicas: ReplicaMap,
                 factories: FactoryRegistry, throughput: ThroughputMeter) -> None:
        self.store, self.clock, self.config = store, clock, config
        self.replicas, self.factories, self.throughput = replicas, factories, throughput
        self.tokens: dict[str, str] = {}  # worker → its credential's digest (a cache of the table)

    def register(self, reg: WorkerRegistration, client_host: Optional[str] = None) -> RegisterResponse:
        """A new worker and its own credential (the service keeps only its digest). ``client_host``:
        the address its request came from (None: an in-process caller, the service's executor)."""
        if reg.blob_url:
            check_blob_url(reg.blob_url, client_host, self.config.trust)
        worker_id = "w-" + uuid.uuid4().hex[:10]
        token, digest = new_worker_token()
        now = self.clock()
        with self.store.transaction() as db:
            self._check_room(db, reg.glidein_id)
            db.execute(
                "INSERT INTO workers (worker_id, host, pid, glidein_id, kind, resources, state, context_state,"
                " registered_at, last_heartbeat, last_busy, environment, token_hash, address)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (worker_id, reg.host, reg.pid, reg.glidein_id, reg.kind.value, reg.resources.model_dump_json(),
                 WorkerState.STARTING.value, ContextState.ABSENT.value, now, now, now, reg.environment or None,
                 digest, audit_address(client_host)))
            self.replicas.add_worker(db, worker_id, reg, client_host)
        self.tokens[worker_id] = digest
        return RegisterResponse(worker_id=worker_id, worker_token=token,
                                heartbeat_interval=self.config.heartbeat_interval,
                                idle_timeout=self.config.idle_timeout)

    def _check_room(self, db: sqlite3.Connection, glidein_id: Optional[str]) -> None:
        """Registrations are bounded per glidein and in all: one host must not fill the tables."""
        live, states = in_list(LIVE_WORKER_STATES)
        trust = self.config.trust
        if glidein_id is not None and db.execute(
                f"SELECT COUNT(*) FROM workers WHERE glidein_id=? AND state IN {live}",
                (glidein_id, *states)).fetchone()[0] >= trust.max_workers_per_glidein:
            raise Refused(ErrorCode.TOO_MANY_WORKERS, f"glidein {glidein_id} already has"
                          f" {trust.max_workers_per_glidein} live workers", "glidein_id")
        if db.execute(f"SELECT COUNT(*) FROM workers WHERE state IN {live}",
                      states).fetchone()[0] >= trust.max_live_workers:
            raise Refused(ErrorCode.TOO_MANY_WORKERS, f"the service has {trust.max_live_workers} live workers,"
                          " its bound; try again later")

    def worker_token_matches(self, worker_id: str, token: str) -> Optional[bool]:
        """Whether ``token`` is ``worker_id``'s own credential; None for a worker never registered."""
        digest = self.tokens.get(worker_id)
        if digest is None:
            with self.store.read() as db:
                row = db.execute("SELECT token_hash FROM workers WHERE worker_id=?", (worker_id,)).fetchone()
            if row is None:
                return None
            digest = row[0] or ""  # a worker registered before credentials existed: re-registers
            self.tokens[worker_id] = digest
        return bool(digest) and hmac.compare_digest(worker_token_digest(token), digest)

    def heartbeat(self, worker_id: str, hb: Heartbeat) -> HeartbeatResponse:
        now = self.clock()
        limits = self.factories.explicit_limits()
        with self.store.transaction() as db:
            w = live_worker(db, worker_id)
            state = (WorkerState.DRAINING if hb.draining or w["state"] == WorkerState.DRAINING.value else
                     WorkerState.BUSY if hb.inflight_batches else
                     # an engine that failed to start, with nothing in flight: idle, removable
                     WorkerState.IDLE if hb.context_state in (ContextState.READY, ContextState.FAILED)
                     else WorkerState.STARTING)
            last_busy = now if hb.inflight_batches else w["last_busy"]
            db.execute(
                "UPDATE workers SET state=?, context_id=?, context_state=?, inflight=?, last_heartbeat=?,"
                " last_busy=? WHERE worker_id=?",
                (state.value, hb.context_id, hb.context_state.value, hb.inflight_batches, now,
                 last_busy, worker_id))
            reconcile(db, worker_id, hb)
            # with no limits set, no factory manages this pool: workers started by hand all stay
            retire = (limits is not None and state != WorkerState.DRAINING
                      and worker_id in self._surplus_workers(db, limits.max_workers))
            if retire:  # draining from now on: the others' heartbeats no longer count it as surplus
                db.execute("UPDATE workers SET state=? WHERE worker_id=?",
                           (WorkerState.DRAINING.value, worker_id))
        return HeartbeatResponse(retire=retire)

    def _surplus_workers(self, db: sqlite3.Connection, max_workers: int) -> set[str]:
        """Workers beyond the factory's max (e.g. after `pcm factory set --max`): they finish
        their batches and exit. The least busy, newest ones go first."""
        staying, states = in_list(STAYING_WORKER_STATES)
        live = db.execute(f"SELECT worker_id FROM workers WHERE state IN {staying} AND {RUNS_ROWS}"
                          " ORDER BY inflight ASC, registered_at DESC", (*states, MANAGER_KIND)).fetchall()
        extra = len(live) - max_workers
        return {r["worker_id"] for r in live[:extra]} if extra > 0 else set()

    def idle(self, worker_id: str, rep: IdleReport) -> RetireDecision:
        """An idle worker asks to retire: yes (and it starts draining, so two idle workers
        cannot both leave the pool below the minimum) unless the factory's minimum keeps it."""
        min_workers = self.factories.limits().min_workers
        with self.store.transaction() as db:
            live_worker(db, worker_id)
            marks, states = in_list(STAYING_WORKER_STATES)
            staying = db.execute(f"SELECT COUNT(*) FROM workers WHERE state IN {marks} AND {RUNS_ROWS}",
                                 (*states, MANAGER_KIND)).fetchone()[0]
            if staying <= min_workers:
                return RetireDecision(retire=False, reason=f"kept: {staying} workers, factory minimum"
                                                           f" {min_workers}")
            db.execute("UPDATE workers SET state=? WHERE worker_id=?",
                       (WorkerState.DRAINING.value, worker_id))
        return RetireDecision(retire=True, reason=f"idle for {rep.idle_seconds:.0f}s with no work")

    def library_event(self, worker_id: str, ev: LibraryEvent, assigned_only: bool = False) -> None:
        """An engine event. ``assigned_only`` (what a worker itself sends): it counts only for
        the context the service assigned that worker, else Refused, so a worker cannot fail a
        context it was never given. In-process callers (the TaskVine executor) saw the call."""
        with self.store.transaction() as db:
            w = live_worker(db, worker_id)
            if assigned_only and ev.context_id != w["assigned_context"]:
                raise Refused(ErrorCode.CONTEXT_NOT_ASSIGNED, f"context {ev.context_id} is not the one assigned"
                              f" to worker {worker_id}", "context_id")
            db.execute("INSERT INTO library_events (worker_id, context_id, state, seconds, error, at)"
                       " VALUES (?,?,?,?,?,?)",
                       (worker_id, ev.context_id, ev.state.value, ev.seconds, ev.error, self.clock()))
            db.execute("UPDATE workers SET context_id=?, context_state=? WHERE worker_id=?",
                       (ev.context_id, ev.state.value, worker_id))
            if ev.state == ContextState.READY:  # the context can start: earlier failures were the workers'
                db.execute("UPDATE contexts SET start_failures=0 WHERE context_id=?", (ev.context_id,))
            elif ev.state == ContextState.FAILED:
                self._fail_broken_context(db, ev)

    def _fail_broken_context(self, db: sqlite3.Connection, ev: LibraryEvent) -> None:
        """An engine that failed to start ``max_attempts`` times since one was last ready fails
        its context's open rows instead of looping (and the count starts again)."""
        row = db.execute("UPDATE contexts SET start_failures=start_failures+1 WHERE context_id=?"
                         " RETURNING start_failures", (ev.context_id,)).fetchone()
        n = row[0] if row is not None else 0
        if n < self.config.max_attempts:
            return
        db.execute("UPDATE contexts SET start_failures=0 WHERE context_id=?", (ev.context_id,))
        open_, states = in_list(OPEN_BATCH_STATES)
        for b in db.execute(f"SELECT batch_id, workload_id FROM batches WHERE context_id=? AND state IN {open_}",
                            (ev.context_id, *states)).fetchall():
            fail_rows(db, self.clock(), b["batch_id"], b["workload_id"], RowErrorCode.FAILED,
                      f"engine failed to start {n} times; last error: {ev.error}")

    def library_starts(self, worker_id: Optional[str] = None) -> dict[str, int]:
        """Engine starts per worker: the context cost PCM exists to pay once."""
        with self.store.read() as db:
            rows = db.execute("SELECT worker_id, COUNT(*) AS n FROM library_events WHERE state=?"
                              " GROUP BY worker_id", (ContextState.READY.value,)).fetchall()
        starts = {r["worker_id"]: r["n"] for r in rows}
        return {worker_id: starts.get(worker_id, 0)} if worker_id else starts

    def engine_ready_seconds(self) -> list[float]:
        """Each engine start's seconds from the library's start to ready (every worker, ever)."""
        with self.store.read() as db:
            return [r[0] for r in db.execute("SELECT seconds FROM library_events WHERE state=?",
                                             (ContextState.READY.value,))]

    def retire(self, worker_id: str, state: WorkerState = WorkerState.RETIRED) -> int:
        """A worker left (or was declared lost): its unfinished batches go back to the queue. A
        batch lost ``max_losses`` times with its worker is failed: it may be what kills them."""
        now = self.clock()
        with self.store.transaction() as db:
            db.execute("UPDATE workers SET state=?, inflight=0, left_at=? WHERE worker_id=?",
                       (state.value, now, worker_id))
            held = db.execute("SELECT batch_id, workload_id, losses FROM batches WHERE worker_id=? AND state=?",
                              (worker_id, BatchState.LEASED.value)).fetchall()
            lost = 1 if state == WorkerState.LOST else 0
            requeue(db, "worker_id=?", (worker_id,), lost)
            for b in held:
                if b["losses"] + lost >= self.config.max_losses:
                    fail_rows(db, now, b["batch_id"], b["workload_id"], RowErrorCode.FAILED,
                              f"abandoned: its worker was lost {b['losses'] + lost} times while running it")
        self.replicas.drop_worker(worker_id)
        self.throughput.forget(worker_id)
        return len(held)

    def live_workers(self, kind: WorkerKind) -> list[str]:
        """Ids of the live workers of one kind (a restarted TaskVine executor retires its old manager)."""
        live, states = in_list(LIVE_WORKER_STATES)
        with self.store.read() as db:
            return [r["worker_id"] for r in db.execute(
                f"SELECT worker_id FROM workers WHERE state IN {live} AND kind=? ORDER BY registered_at",
                (*states, kind.value))]

    def reap(self) -> list[str]:
        """Declare workers without a recent heartbeat lost: their leases expire, work is requeued."""
        cutoff = self.clock() - self.config.worker_timeout
        with self.store.read() as db:
            live, states = in_list(LIVE_WORKER_STATES)
            lost = [r["worker_id"] for r in db.execute(
                f"SELECT worker_id FROM workers WHERE state IN {live} AND last_heartbeat < ?", (*states, cutoff))]
        for worker_id in lost:
            self.retire(worker_id, WorkerState.LOST)
        return lost

    def fetch_plan(self, worker_id: str, req: FetchRequest) -> FetchPlan:
        """Record finished chunk transfers, then hand out sources for up to ``req.want`` more."""
        with self.store.read() as db:
            live_worker(db, worker_id)
        return self.replicas.plan(worker_id, req)
