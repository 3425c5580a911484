"""The service core: workloads, batches, leases, results, workers, demand.

The HTTP layer (``api.py``) and tests both drive this class directly; it owns all
policy and keeps every state change inside one SQLite transaction.
"""
from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from pcm_service.factories import FactoryRegistry
from pcm_service.protocol import (
    LIVE_WORKER_STATES,
    BatchLease,
    BatchReport,
    ContextSpec,
    ContextState,
    Demand,
    FactoryLimits,
    FactoryReport,
    FactoryView,
    FetchPlan,
    FetchRequest,
    Heartbeat,
    HeartbeatResponse,
    LeaseRequest,
    LeaseResponse,
    LibraryEvent,
    RegisterResponse,
    ReportResponse,
    Resources,
    RowTask,
    SamplingSettings,
    ServiceStatus,
    SubmitResponse,
    WorkerRegistration,
    WorkerState,
    WorkerStatus,
    WorkloadState,
    WorkloadStatus,
    WorkloadSubmission,
)
from pcm_service.replicas import ReplicaMap, TransferPolicy
from pcm_service.store import Store


class UnknownWorker(LookupError):
    pass


class UnknownWorkload(LookupError):
    pass


@dataclass
class ServiceConfig:
    heartbeat_interval: float = 2.0
    worker_timeout: float = 30.0  # no heartbeat for this long: the worker is lost
    idle_timeout: float = 60.0  # a worker with nothing to do retires after this
    batches_per_worker: int = 4  # demand: one worker per this many batches left
    max_attempts: int = 3  # a batch leased this often without finishing is failed
    transfers: TransferPolicy = field(default_factory=TransferPolicy)  # model weights


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
        self.replicas = ReplicaMap(self.store, self.config.transfers, clock)
        self._progress = threading.Condition()
        self._recover()

    # ----- start-up -------------------------------------------------------------
    def _recover(self) -> None:
        """Give known workers a full timeout to reconnect and finish interrupted completions."""
        now = self.clock()
        with self.store.transaction() as db:
            db.execute(f"UPDATE workers SET last_heartbeat=? WHERE state IN {LIVE_WORKER_STATES}", (now,))
            pending = [r["workload_id"] for r in db.execute(
                "SELECT workload_id FROM workloads WHERE state=? AND rows_done=rows_total",
                (WorkloadState.RUNNING.value,))]
            for wl in pending:
                self._complete(db, wl)

    # ----- workloads ------------------------------------------------------------
    def submit(self, sub: WorkloadSubmission) -> SubmitResponse:
        """Raises ModelUnavailable when the service cannot read the model (its origin copy)."""
        sub.context.model_digest = self.replicas.register_model(Path(sub.context.model)).digest
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

    def _complete(self, db: sqlite3.Connection, wl_id: str) -> None:
        """Write the output file (atomically, in input order), then mark the workload done."""
        wl = db.execute("SELECT output FROM workloads WHERE workload_id=?", (wl_id,)).fetchone()
        out = Path(wl["output"])
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for r in db.execute(
                    "SELECT row_id, text, finish_reason, prompt_tokens, completion_tokens,"
                    " worker_id, error FROM rows WHERE workload_id=? ORDER BY idx", (wl_id,)):
                fh.write(json.dumps({
                    "id": r["row_id"], "text": r["text"], "finish_reason": r["finish_reason"],
                    "prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                    "worker_id": r["worker_id"], "error": r["error"]}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
        db.execute("UPDATE workloads SET state=?, finished_at=? WHERE workload_id=?",
                   (WorkloadState.COMPLETED.value, self.clock(), wl_id))

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
        if w is None or w["state"] not in LIVE_WORKER_STATES:
            raise UnknownWorker(worker_id)
        return w

    def heartbeat(self, worker_id: str, hb: Heartbeat) -> HeartbeatResponse:
        now = self.clock()
        limits = self.factories.explicit_limits()
        with self.store.transaction() as db:
            w = self._live_worker(db, worker_id)
            state = (WorkerState.DRAINING if hb.draining else
                     WorkerState.BUSY if hb.inflight_batches else
                     WorkerState.IDLE if hb.context_state == ContextState.READY else WorkerState.STARTING)
            last_busy = now if hb.inflight_batches else w["last_busy"]
            db.execute(
                "UPDATE workers SET state=?, context_id=?, context_state=?, inflight=?, last_heartbeat=?,"
                " last_busy=? WHERE worker_id=?",
                (state.value, hb.context_id, hb.context_state.value, hb.inflight_batches, now,
                 last_busy, worker_id))
            # with no limits set, no factory manages this pool: workers started by hand all stay
            retire = (limits is not None and not hb.draining
                      and worker_id in self._surplus_workers(db, limits.max_workers))
        return HeartbeatResponse(retire=retire)

    def _surplus_workers(self, db: sqlite3.Connection, max_workers: int) -> set[str]:
        """Workers beyond the factory's max (e.g. after `pcm factory set --max`): they finish
        their batches and exit. The least busy, newest ones go first."""
        live = db.execute("SELECT worker_id FROM workers WHERE state IN (?, ?, ?)"
                          " ORDER BY inflight ASC, registered_at DESC",
                          (WorkerState.STARTING.value, WorkerState.IDLE.value,
                           WorkerState.BUSY.value)).fetchall()
        extra = len(live) - max_workers
        return {r["worker_id"] for r in live[:extra]} if extra > 0 else set()

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
        for b in db.execute("SELECT batch_id, workload_id FROM batches WHERE context_id=?"
                            " AND state!='done'", (ev.context_id,)).fetchall():
            self._fail_batch(db, b["batch_id"], b["workload_id"],
                             f"engine failed to start {n} times; last error: {ev.error}")

    def library_starts(self, worker_id: Optional[str] = None) -> dict[str, int]:
        """Engine starts per worker: the context cost PCM exists to pay once."""
        with self.store.read() as db:
            rows = db.execute("SELECT worker_id, COUNT(*) AS n FROM library_events WHERE state=?"
                              " GROUP BY worker_id", (ContextState.READY.value,)).fetchall()
        starts = {r["worker_id"]: r["n"] for r in rows}
        return {worker_id: starts.get(worker_id, 0)} if worker_id else starts

    def retire(self, worker_id: str, state: WorkerState = WorkerState.RETIRED) -> int:
        """A worker left (or was declared lost): its unfinished batches go back to the queue."""
        with self.store.transaction() as db:
            db.execute("UPDATE workers SET state=?, inflight=0 WHERE worker_id=?",
                       (state.value, worker_id))
            n = db.execute("UPDATE batches SET state='queued', worker_id=NULL"
                           " WHERE worker_id=? AND state='leased'", (worker_id,)).rowcount
        self.replicas.drop_worker(worker_id)
        return n

    def reap(self) -> list[str]:
        """Declare workers without a recent heartbeat lost and requeue their work."""
        cutoff = self.clock() - self.config.worker_timeout
        with self.store.read() as db:
            lost = [r["worker_id"] for r in db.execute(
                f"SELECT worker_id FROM workers WHERE state IN {LIVE_WORKER_STATES}"
                " AND last_heartbeat < ?", (cutoff,))]
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
                         " WHERE b.state='queued' GROUP BY b.context_id"
                         " ORDER BY COUNT(*) DESC, MIN(b.batch_id) LIMIT 1").fetchone()
        return ContextSpec.model_validate_json(row["spec"]) if row else None

    def lease_batch(self, worker_id: str, req: LeaseRequest) -> LeaseResponse:
        """Lease up to ``max_batches`` of the worker's loaded context, or tell it what to load."""
        now = self.clock()
        with self.store.transaction() as db:
            w = self._live_worker(db, worker_id)
            if req.context_id is None or req.context_state != ContextState.READY:
                want = self._context_with_most_work(db)
                return LeaseResponse(assign_context=want)
            leases: list[BatchLease] = []
            for b in db.execute("SELECT b.*, w.sampling FROM batches b JOIN workloads w USING (workload_id)"
                                " WHERE b.state='queued' AND b.context_id=? ORDER BY b.batch_id LIMIT ?",
                                (req.context_id, req.max_batches)).fetchall():
                if b["attempts"] >= self.config.max_attempts:
                    self._fail_batch(db, b["batch_id"], b["workload_id"],
                                     f"abandoned after {b['attempts']} attempts that did not finish")
                    continue
                db.execute("UPDATE batches SET state='leased', worker_id=?, attempts=attempts+1,"
                           " leased_at=? WHERE batch_id=?", (worker_id, now, b["batch_id"]))
                rows = [RowTask(idx=r["idx"], row_id=r["row_id"], prompt=r["prompt"]) for r in db.execute(
                    "SELECT idx, row_id, prompt FROM rows WHERE batch_id=? AND state='pending' ORDER BY idx",
                    (b["batch_id"],))]
                leases.append(BatchLease(batch_id=b["batch_id"], workload_id=b["workload_id"],
                                         context_id=b["context_id"],
                                         sampling=SamplingSettings.model_validate_json(b["sampling"]),
                                         rows=rows))
            if leases:
                db.execute("UPDATE workers SET last_busy=? WHERE worker_id=?", (now, w["worker_id"]))
            elif w["inflight"] == 0 and req.max_batches > 0:
                other = self._context_with_most_work(db)
                if other is not None and other.context_id != req.context_id:
                    return LeaseResponse(assign_context=other)
            return LeaseResponse(batches=leases)

    def _fail_batch(self, db: sqlite3.Connection, batch_id: int, wl_id: str, error: str) -> None:
        n = db.execute("UPDATE rows SET state='done', error=?, finished_at=? WHERE batch_id=?"
                       " AND state='pending'", (error, self.clock(), batch_id)).rowcount
        db.execute("UPDATE batches SET state='done' WHERE batch_id=?", (batch_id,))
        self._count_done(db, wl_id, n, n)

    def _count_done(self, db: sqlite3.Connection, wl_id: str, done: int, failed: int) -> None:
        db.execute("UPDATE workloads SET rows_done=rows_done+?, rows_failed=rows_failed+?"
                   " WHERE workload_id=?", (done, failed, wl_id))
        wl = db.execute("SELECT rows_done, rows_total, state FROM workloads WHERE workload_id=?",
                        (wl_id,)).fetchone()
        if wl["rows_done"] >= wl["rows_total"] and wl["state"] == WorkloadState.RUNNING.value:
            self._complete(db, wl_id)

    def report(self, worker_id: str, rep: BatchReport) -> ReportResponse:
        """Record row results; the first result for a row wins, later ones are dropped."""
        now = self.clock()
        with self.store.transaction() as db:
            b = db.execute("SELECT * FROM batches WHERE batch_id=?", (rep.batch_id,)).fetchone()
            if b is None:
                raise LookupError(f"unknown batch {rep.batch_id}")
            accepted = failed = 0
            for r in rep.results:
                cur = db.execute(
                    "UPDATE rows SET state='done', text=?, finish_reason=?, prompt_tokens=?,"
                    " completion_tokens=?, error=?, worker_id=?, finished_at=?"
                    " WHERE batch_id=? AND idx=? AND state='pending'",
                    (r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens, r.error,
                     worker_id, now, rep.batch_id, r.idx))
                accepted += cur.rowcount
                failed += cur.rowcount if r.error else 0
            db.execute("UPDATE workers SET rows_done=rows_done+?, last_busy=? WHERE worker_id=?",
                       (accepted, now, worker_id))
            left = db.execute("SELECT COUNT(*) FROM rows WHERE batch_id=? AND state='pending'",
                              (rep.batch_id,)).fetchone()[0]
            if left == 0:
                db.execute("UPDATE batches SET state='done' WHERE batch_id=?", (rep.batch_id,))
            elif rep.returned and b["worker_id"] == worker_id:
                db.execute("UPDATE batches SET state='queued', worker_id=NULL WHERE batch_id=?",
                           (rep.batch_id,))
            if accepted:
                self._count_done(db, b["workload_id"], accepted, failed)
        with self._progress:
            self._progress.notify_all()
        return ReportResponse(accepted=accepted, duplicates=len(rep.results) - accepted)

    def wait_for_progress(self, timeout: float) -> None:
        """Block until some row result arrives (or ``timeout``): lets in-process callers await progress."""
        with self._progress:
            self._progress.wait(timeout)

    # ----- demand and status ----------------------------------------------------
    def factory_limits(self) -> FactoryLimits:
        return self.factories.limits()

    def set_factory_limits(self, limits: FactoryLimits, from_config: bool = False) -> FactoryLimits:
        return self.factories.set_limits(limits, from_config)

    def factory_report(self, rep: FactoryReport) -> None:
        self.factories.report(rep)

    def factory_view(self) -> FactoryView:
        return self.factories.view(self.clock())

    def demand(self) -> Demand:
        limits = self.factory_limits()
        with self.store.read() as db:
            left = db.execute("SELECT COUNT(*) FROM batches WHERE state!='done'").fetchone()[0]
        raw = math.ceil(left / self.config.batches_per_worker)
        wanted = max(limits.min_workers, min(limits.max_workers, raw))
        reason = (f"{left} batches left, 1 worker per {self.config.batches_per_worker} → {raw};"
                  f" limits [{limits.min_workers}, {limits.max_workers}]")
        return Demand(workers_wanted=wanted, reason=reason, limits=limits)

    def workload_status(self, wl_id: str) -> WorkloadStatus:
        with self.store.read() as db:
            r = db.execute("SELECT * FROM workloads WHERE workload_id=?", (wl_id,)).fetchone()
        if r is None:
            raise UnknownWorkload(wl_id)
        return self._workload_status(r)

    def _workload_status(self, r: sqlite3.Row) -> WorkloadStatus:
        elapsed = (r["finished_at"] or self.clock()) - r["created_at"]
        return WorkloadStatus(
            workload_id=r["workload_id"], name=r["name"], state=WorkloadState(r["state"]),
            context_id=r["context_id"], rows_total=r["rows_total"], rows_done=r["rows_done"],
            rows_failed=r["rows_failed"], rows_per_second=r["rows_done"] / elapsed if elapsed > 0 else 0.0,
            output=r["output"], created_at=r["created_at"], finished_at=r["finished_at"])

    def status(self, include_gone: bool = False) -> ServiceStatus:
        now = self.clock()
        starts = self.library_starts()
        where = "" if include_gone else f" WHERE state IN {LIVE_WORKER_STATES}"
        with self.store.read() as db:
            workers = db.execute(f"SELECT * FROM workers{where} ORDER BY registered_at").fetchall()
            workloads = db.execute("SELECT * FROM workloads ORDER BY created_at").fetchall()
        return ServiceStatus(
            workers=[WorkerStatus(
                worker_id=w["worker_id"], host=w["host"], glidein_id=w["glidein_id"],
                gpus=Resources.model_validate_json(w["resources"]).gpus,
                state=WorkerState(w["state"]), context_id=w["context_id"],
                context_state=ContextState(w["context_state"]), inflight_batches=w["inflight"],
                rows_done=w["rows_done"], library_starts=starts.get(w["worker_id"], 0),
                idle_seconds=0.0 if w["inflight"] else now - w["last_busy"],
                last_heartbeat_age=now - w["last_heartbeat"],
                fetch=self.replicas.progress(w["worker_id"])
                if w["context_state"] == ContextState.FETCHING.value else None) for w in workers],
            workloads=[self._workload_status(r) for r in workloads],
            demand=self.demand(), glideins=self.factories.glideins(now),
            transfers=self.replicas.stats())

    def close(self) -> None:
        self.store.close()
