"""The service core: workloads, batches, leases, results, workers, demand.

The HTTP layer (``api.py``) and tests both drive this class directly; it owns all
policy and keeps every state change inside one SQLite transaction.
"""
from __future__ import annotations

import math
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from pcm_service.demand import DemandPolicy, Ramp, ThroughputMeter, make_demand
from pcm_service.factories import FactoryRegistry
from pcm_service.protocol import (
    LIVE_WORKER_STATES,
    STAYING_WORKER_STATES,
    BatchLease,
    BatchReport,
    BatchState,
    ContextSpec,
    ContextState,
    Demand,
    FactoryLimits,
    FactoryReport,
    FactoryView,
    FetchPlan,
    FetchRequest,
    GlideinState,
    Heartbeat,
    HeartbeatResponse,
    IdleReport,
    LeaseRequest,
    LeaseResponse,
    LibraryEvent,
    RegisterResponse,
    ReportResponse,
    RetireDecision,
    RowState,
    RowTask,
    SamplingSettings,
    ServiceStatus,
    SubmitResponse,
    WorkerRegistration,
    WorkerState,
    WorkloadState,
    WorkloadStatus,
    WorkloadSubmission,
)
from pcm_service.results import complete, count_done, fail_rows, requeue, settle_batch
from pcm_service.store import Store, in_list
from pcm_service.views import demand_inputs, worker_status, workload_status
from pcm_service.weights.modelpaths import ModelPolicy
from pcm_service.weights.replicas import ReplicaMap, TransferPolicy


class UnknownWorker(LookupError):
    """No live worker by that id. ``state`` says why: None (never registered here), LOST (the
    service gave up on it: it may register again) or RETIRED (it left: it must not come back)."""

    def __init__(self, worker_id: str, state: Optional[WorkerState] = None) -> None:
        super().__init__(worker_id)
        self.worker_id = worker_id
        self.state = state


class UnknownWorkload(LookupError):
    pass


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
    # model weights are read only from directories under these (ModelPolicy); never from the
    # state directory or these secret files (token files, the TLS key), whatever the roots
    model_roots: tuple[Path, ...] = ()
    secret_paths: tuple[Path, ...] = ()
    max_request_bytes: int = 64 * 2**20  # larger request bodies get 413
    max_submission_bytes: int = 2**30  # the same for a workload submission (it holds every row)


def _now() -> float:
    return time.time()


class ServiceCore:
    def __init__(self, state_dir: str | Path, config: Optional[ServiceConfig] = None,
                 clock: Callable[[], float] = _now) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config = config or ServiceConfig()
        self.clock = clock
        self.store = Store(self.state_dir / "pcm.sqlite3")
        self.factories = FactoryRegistry(self.store)
        models = ModelPolicy.of(self.config.model_roots, (self.state_dir, *self.config.secret_paths))
        self.replicas = ReplicaMap(self.store, self.config.transfers, clock, models)
        self.throughput = ThroughputMeter(self.config.demand)
        self.ramp = Ramp(self.config.demand)
        self._progress = threading.Condition()
        self._recover()

    # ----- start-up -------------------------------------------------------------
    def _recover(self) -> None:
        """Give known workers a full timeout to reconnect and finish interrupted completions."""
        now = self.clock()
        with self.store.transaction() as db:
            live, states = in_list(LIVE_WORKER_STATES)
            db.execute(f"UPDATE workers SET last_heartbeat=? WHERE state IN {live}", (now, *states))
            pending = [r["workload_id"] for r in db.execute(
                "SELECT workload_id FROM workloads WHERE state=? AND rows_done=rows_total",
                (WorkloadState.RUNNING.value,))]
            for wl in pending:
                complete(db, now, wl)

    # ----- workloads ------------------------------------------------------------
    def submit(self, sub: WorkloadSubmission) -> SubmitResponse:
        """Raises ModelUnavailable when the model policy refuses the model or it cannot be read."""
        sub.context.model_digest = self.replicas.register_model(sub.context.model).digest
        ctx_id = sub.context.context_id
        wl_id = "wl-" + uuid.uuid4().hex[:12]
        n_batches = math.ceil(len(sub.rows) / sub.batch_size)
        with self.store.transaction() as db:
            db.execute("INSERT OR IGNORE INTO contexts VALUES (?, ?)",
                       (ctx_id, sub.context.model_dump_json()))
            db.execute(
                "INSERT INTO workloads (workload_id, name, context_id, sampling, batch_size, output,"
                " rows_total, state, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (wl_id, sub.name, ctx_id, sub.sampling.model_dump_json(), sub.batch_size,
                 sub.output, len(sub.rows), WorkloadState.RUNNING.value, self.clock()))
            batch_ids = []
            for _ in range(n_batches):
                cur = db.execute("INSERT INTO batches (workload_id, context_id) VALUES (?, ?)",
                                 (wl_id, ctx_id))
                batch_ids.append(cur.lastrowid)
            db.executemany(
                "INSERT INTO rows (workload_id, idx, row_id, prompt, batch_id) VALUES (?,?,?,?,?)",
                ((wl_id, i, r.row_id, r.prompt, batch_ids[i // sub.batch_size])
                 for i, r in enumerate(sub.rows)))
        return SubmitResponse(workload_id=wl_id, context_id=ctx_id, rows=len(sub.rows),
                              batches=n_batches)

    # ----- workers --------------------------------------------------------------
    def register(self, reg: WorkerRegistration) -> RegisterResponse:
        worker_id = "w-" + uuid.uuid4().hex[:10]
        now = self.clock()
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO workers (worker_id, host, pid, glidein_id, resources, state, context_state,"
                " registered_at, last_heartbeat, last_busy) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (worker_id, reg.host, reg.pid, reg.glidein_id, reg.resources.model_dump_json(),
                 WorkerState.STARTING.value, ContextState.ABSENT.value, now, now, now))
            self.replicas.add_worker(db, worker_id, reg)
        return RegisterResponse(worker_id=worker_id, heartbeat_interval=self.config.heartbeat_interval,
                                idle_timeout=self.config.idle_timeout)

    def _live_worker(self, db: sqlite3.Connection, worker_id: str) -> sqlite3.Row:
        w = db.execute("SELECT * FROM workers WHERE worker_id=?", (worker_id,)).fetchone()
        if w is None:
            raise UnknownWorker(worker_id)
        if w["state"] not in LIVE_WORKER_STATES:
            raise UnknownWorker(worker_id, WorkerState(w["state"]))
        return w

    def heartbeat(self, worker_id: str, hb: Heartbeat) -> HeartbeatResponse:
        now = self.clock()
        limits = self.factories.explicit_limits()
        with self.store.transaction() as db:
            w = self._live_worker(db, worker_id)
            state = (WorkerState.DRAINING if hb.draining or w["state"] == WorkerState.DRAINING.value else
                     WorkerState.BUSY if hb.inflight_batches else
                     WorkerState.IDLE if hb.context_state == ContextState.READY else WorkerState.STARTING)
            last_busy = now if hb.inflight_batches else w["last_busy"]
            db.execute(
                "UPDATE workers SET state=?, context_id=?, context_state=?, inflight=?, last_heartbeat=?,"
                " last_busy=? WHERE worker_id=?",
                (state.value, hb.context_id, hb.context_state.value, hb.inflight_batches, now,
                 last_busy, worker_id))
            self._reconcile(db, worker_id, hb)
            # with no limits set, no factory manages this pool: workers started by hand all stay
            retire = (limits is not None and state != WorkerState.DRAINING
                      and worker_id in self._surplus_workers(db, limits.max_workers))
            if retire:  # draining from now on: the others' heartbeats no longer count it as surplus
                db.execute("UPDATE workers SET state=? WHERE worker_id=?",
                           (WorkerState.DRAINING.value, worker_id))
        return HeartbeatResponse(retire=retire)

    def _reconcile(self, db: sqlite3.Connection, worker_id: str, hb: Heartbeat) -> None:
        """Requeue batches leased to this worker in a response it has seen but that it no longer
        holds (a report lost for good, a lease answered just before a service crash)."""
        held, ids = in_list(hb.batches)
        requeue(db, f"worker_id=? AND lease_seq<=? AND batch_id NOT IN {held}", (worker_id, hb.lease_seq, *ids))

    def _surplus_workers(self, db: sqlite3.Connection, max_workers: int) -> set[str]:
        """Workers beyond the factory's max (e.g. after `pcm factory set --max`): they finish
        their batches and exit. The least busy, newest ones go first."""
        staying, states = in_list(STAYING_WORKER_STATES)
        live = db.execute(f"SELECT worker_id FROM workers WHERE state IN {staying}"
                          " ORDER BY inflight ASC, registered_at DESC", states).fetchall()
        extra = len(live) - max_workers
        return {r["worker_id"] for r in live[:extra]} if extra > 0 else set()

    def idle(self, worker_id: str, rep: IdleReport) -> RetireDecision:
        """An idle worker asks to retire: yes (and it starts draining, so two idle workers
        cannot both leave the pool below the minimum) unless the factory's minimum keeps it."""
        min_workers = self.factory_limits().min_workers
        with self.store.transaction() as db:
            self._live_worker(db, worker_id)
            marks, states = in_list(STAYING_WORKER_STATES)
            staying = db.execute(f"SELECT COUNT(*) FROM workers WHERE state IN {marks}", states).fetchone()[0]
            if staying <= min_workers:
                return RetireDecision(retire=False, reason=f"kept: {staying} workers, factory minimum"
                                                           f" {min_workers}")
            db.execute("UPDATE workers SET state=? WHERE worker_id=?",
                       (WorkerState.DRAINING.value, worker_id))
        return RetireDecision(retire=True, reason=f"idle for {rep.idle_seconds:.0f}s with no work")

    def library_event(self, worker_id: str, ev: LibraryEvent) -> None:
        with self.store.transaction() as db:
            self._live_worker(db, worker_id)
            db.execute("INSERT INTO library_events (worker_id, context_id, state, seconds, error, at)"
                       " VALUES (?,?,?,?,?,?)",
                       (worker_id, ev.context_id, ev.state.value, ev.seconds, ev.error, self.clock()))
            db.execute("UPDATE workers SET context_id=?, context_state=? WHERE worker_id=?",
                       (ev.context_id, ev.state.value, worker_id))
            if ev.state == ContextState.FAILED:
                self._fail_broken_context(db, ev)

    def _fail_broken_context(self, db: sqlite3.Connection, ev: LibraryEvent) -> None:
        """An engine that failed to start ``max_attempts`` times fails its rows instead of looping."""
        n = db.execute("SELECT COUNT(*) FROM library_events WHERE context_id=? AND state=?",
                       (ev.context_id, ContextState.FAILED.value)).fetchone()[0]
        if n < self.config.max_attempts:
            return
        for b in db.execute("SELECT batch_id, workload_id FROM batches WHERE context_id=? AND state!=?",
                            (ev.context_id, BatchState.DONE.value)).fetchall():
            fail_rows(db, self.clock(), b["batch_id"], b["workload_id"],
                      f"engine failed to start {n} times; last error: {ev.error}")

    def library_starts(self, worker_id: Optional[str] = None) -> dict[str, int]:
        """Engine starts per worker: the context cost PCM exists to pay once."""
        with self.store.read() as db:
            rows = db.execute("SELECT worker_id, COUNT(*) AS n FROM library_events WHERE state=?"
                              " GROUP BY worker_id", (ContextState.READY.value,)).fetchall()
        starts = {r["worker_id"]: r["n"] for r in rows}
        return {worker_id: starts.get(worker_id, 0)} if worker_id else starts

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
                    fail_rows(db, now, b["batch_id"], b["workload_id"],
                              f"abandoned: its worker was lost {b['losses'] + lost} times while running it")
        self.replicas.drop_worker(worker_id)
        self.throughput.forget(worker_id)
        return len(held)

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
            self._live_worker(db, worker_id)
        return self.replicas.plan(worker_id, req)

    # ----- leasing --------------------------------------------------------------
    def _context_with_most_work(self, db: sqlite3.Connection) -> Optional[ContextSpec]:
        row = db.execute("SELECT c.spec FROM batches b JOIN contexts c USING (context_id)"
                         " WHERE b.state=? GROUP BY b.context_id"
                         " ORDER BY COUNT(*) DESC, MIN(b.batch_id) LIMIT 1", (BatchState.QUEUED.value,)).fetchone()
        return ContextSpec.model_validate_json(row["spec"]) if row else None

    def lease_batch(self, worker_id: str, req: LeaseRequest) -> LeaseResponse:
        """Lease up to ``max_batches`` of the worker's loaded context, or tell it what to load."""
        now = self.clock()
        with self.store.transaction() as db:
            w = self._live_worker(db, worker_id)
            if req.context_id is None or req.context_state != ContextState.READY:
                want = self._context_with_most_work(db)
                return LeaseResponse(assign_context=want)
            if w["state"] == WorkerState.DRAINING.value:
                return LeaseResponse()  # it asked to retire: no new work
            seq = w["lease_seq"] + 1
            db.execute("UPDATE workers SET lease_seq=? WHERE worker_id=?", (seq, worker_id))
            leases: list[BatchLease] = []
            for b in db.execute("SELECT b.*, w.sampling FROM batches b JOIN workloads w USING (workload_id)"
                                " WHERE b.state=? AND b.context_id=? ORDER BY b.batch_id LIMIT ?",
                                (BatchState.QUEUED.value, req.context_id, req.max_batches)).fetchall():
                db.execute("UPDATE batches SET state=?, worker_id=?, lease_seq=?, leased_at=? WHERE batch_id=?",
                           (BatchState.LEASED.value, worker_id, seq, now, b["batch_id"]))
                rows = [RowTask(idx=r["idx"], row_id=r["row_id"], prompt=r["prompt"]) for r in db.execute(
                    "SELECT idx, row_id, prompt FROM rows WHERE batch_id=? AND state=? ORDER BY idx",
                    (b["batch_id"], RowState.PENDING.value))]
                leases.append(BatchLease(batch_id=b["batch_id"], workload_id=b["workload_id"],
                                         context_id=b["context_id"],
                                         sampling=SamplingSettings.model_validate_json(b["sampling"]),
                                         rows=rows))
            if leases:
                db.execute("UPDATE workers SET last_busy=? WHERE worker_id=?", (now, w["worker_id"]))
                self.throughput.leased(worker_id, now)
            elif w["inflight"] == 0 and req.max_batches > 0:
                other = self._context_with_most_work(db)
                if other is not None and other.context_id != req.context_id:
                    return LeaseResponse(assign_context=other, lease_seq=seq)
            return LeaseResponse(batches=leases, lease_seq=seq)

    def report(self, worker_id: str, rep: BatchReport) -> ReportResponse:
        """Record row results (the first result for a row wins, later ones are dropped); requeue
        rows handed back; count library crashes against the rows that were in flight."""
        now = self.clock()
        with self.store.transaction() as db:
            b = db.execute("SELECT * FROM batches WHERE batch_id=?", (rep.batch_id,)).fetchone()
            if b is None:
                raise LookupError(f"unknown batch {rep.batch_id}")
            accepted = failed = 0
            for r in rep.results:
                cur = db.execute(
                    "UPDATE rows SET state=?, text=?, finish_reason=?, prompt_tokens=?,"
                    " completion_tokens=?, error=?, worker_id=?, finished_at=?"
                    " WHERE batch_id=? AND idx=? AND state=?",
                    (RowState.DONE.value, r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens,
                     r.error, worker_id, now, rep.batch_id, r.idx, RowState.PENDING.value))
                accepted += cur.rowcount
                failed += cur.rowcount if r.error else 0
            db.execute("UPDATE workers SET rows_done=rows_done+?, last_busy=? WHERE worker_id=?",
                       (accepted, now, worker_id))
            count_done(db, now, b["workload_id"], accepted, failed)
            if rep.crashed:
                self._count_crashes(db, now, b, rep.crashed)
            if not settle_batch(db, rep.batch_id) and (rep.returned or rep.crashed) \
                    and b["worker_id"] == worker_id:
                requeue(db, "batch_id=?", (rep.batch_id,))
        self.throughput.rows(worker_id, accepted, now)
        with self._progress:
            self._progress.notify_all()
        return ReportResponse(accepted=accepted, duplicates=len(rep.results) - accepted)

    def _count_crashes(self, db: sqlite3.Connection, now: float, b: sqlite3.Row, idx: list[int]) -> None:
        for i in idx:
            db.execute("UPDATE rows SET crashes=crashes+1 WHERE batch_id=? AND idx=? AND state=?",
                       (b["batch_id"], i, RowState.PENDING.value))
        poisoned = [r["idx"] for r in db.execute(
            "SELECT idx FROM rows WHERE batch_id=? AND state=? AND crashes>=?",
            (b["batch_id"], RowState.PENDING.value, self.config.poison_after))]
        if poisoned:
            fail_rows(db, now, b["batch_id"], b["workload_id"],
                      f"poisoned: the library process died {self.config.poison_after} times while"
                      " running this row; not retried", poisoned)

    def wait_for_progress(self, timeout: float) -> None:
        """Block until some row result arrives (or ``timeout``): lets in-process callers await progress."""
        with self._progress:
            self._progress.wait(timeout)

    # ----- factories and demand -------------------------------------------------
    def factory_limits(self) -> FactoryLimits:
        return self.factories.limits()

    def set_factory_limits(self, limits: FactoryLimits, from_config: bool = False) -> FactoryLimits:
        return self.factories.set_limits(limits, from_config)

    def factory_report(self, rep: FactoryReport) -> list[str]:
        """Store the report; a worker whose glidein has left the batch system is gone: its
        leases expire now instead of after ``worker_timeout``. Returns those workers."""
        self.factories.report(rep)
        gone = [g.glidein_id for g in rep.glideins if g.state == GlideinState.EXITED]
        if not gone:
            return []
        with self.store.read() as db:
            live, states = in_list(LIVE_WORKER_STATES)
            marks, ids = in_list(gone)
            lost = [r["worker_id"] for r in db.execute(
                f"SELECT worker_id FROM workers WHERE state IN {live} AND glidein_id IN {marks}", (*states, *ids))]
        for worker_id in lost:
            self.retire(worker_id, WorkerState.LOST)
        return lost

    def factory_view(self) -> FactoryView:
        return self.factories.view(self.clock())

    def demand(self) -> Demand:
        now = self.clock()
        limits = self.factory_limits()
        with self.store.read() as db:
            work, ready, t_ready = demand_inputs(db)
        return make_demand(work, ready, self.throughput.rate(now), t_ready, limits, self.ramp, now)

    def workload_status(self, wl_id: str) -> WorkloadStatus:
        with self.store.read() as db:
            r = db.execute("SELECT * FROM workloads WHERE workload_id=?", (wl_id,)).fetchone()
        if r is None:
            raise UnknownWorkload(wl_id)
        return workload_status(r, self.clock())

    def status(self, include_gone: bool = False) -> ServiceStatus:
        now = self.clock()
        starts = self.library_starts()
        live, states = in_list(LIVE_WORKER_STATES)
        where, params = ("", []) if include_gone else (f" WHERE state IN {live}", states)
        with self.store.read() as db:
            workers = db.execute(f"SELECT * FROM workers{where} ORDER BY registered_at", params).fetchall()
            workloads = db.execute("SELECT * FROM workloads ORDER BY created_at").fetchall()
        fetching = ContextState.FETCHING.value
        return ServiceStatus(
            workers=[worker_status(w, starts.get(w["worker_id"], 0), now,
                                   self.replicas.progress(w["worker_id"])
                                   if w["context_state"] == fetching else None) for w in workers],
            workloads=[workload_status(r, now) for r in workloads],
            demand=self.demand(), glideins=self.factories.glideins(now),
            transfers=self.replicas.stats())

    def close(self) -> None:
        self.store.close()
