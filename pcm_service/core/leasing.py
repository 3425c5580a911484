"""Leases: which batches a worker runs, and what comes back from them."""
from __future__ import annotations

import json
import sqlite3
import threading
from functools import lru_cache
from typing import Callable, Optional

from pcm_service.core.audit import Audits
from pcm_service.core.config import ServiceConfig
from pcm_service.core.demand import ThroughputMeter
from pcm_service.core.errors import Refused, UnknownBatch
from pcm_service.core.placement import Placement
from pcm_service.core.results import (
    ROW_OF_BATCH,
    count_done,
    fail_rows,
    requeue,
    row_identity,
    settle_batch,
    settle_cancelling,
)
from pcm_service.core.workers import live_worker
from pcm_service.protocol import (
    OPEN_BATCH_STATES,
    BatchLease,
    BatchReport,
    BatchState,
    ChatMessage,
    ContextSpec,
    ContextState,
    ErrorCode,
    LeaseRequest,
    LeaseResponse,
    ReportResponse,
    RowErrorCode,
    RowState,
    RowTask,
    SamplingSettings,
    WorkerState,
    WorkloadState,
)
from pcm_service.store import Store, in_list


def row_task(r: sqlite3.Row) -> RowTask:
    if r["request"] is None:
        return RowTask(idx=r["idx"], row_id=r["row_id"], prompt=r["prompt"])
    extra = json.loads(r["request"])
    messages = extra.get("messages")
    sampling = extra.get("sampling")
    return RowTask(idx=r["idx"], row_id=r["row_id"], prompt=None if messages else r["prompt"],
                   messages=[ChatMessage.model_validate(m, strict=False) for m in messages] if messages else None,
                   sampling=SamplingSettings.model_validate(sampling, strict=False) if sampling else None)


@lru_cache(maxsize=256)
def sampling_of(stored: str) -> SamplingSettings:
    """A workload's sampling settings, parsed once per workload, not once per leased batch."""
    return SamplingSettings.model_validate_json(stored)


class Leasing:
    """Lease batches of the loaded context (or say what to load), record row results."""

    def __init__(self, store: Store, clock: Callable[[], float], config: ServiceConfig, throughput: ThroughputMeter,
                 placement: Placement, audits: Audits) -> None:
        self.store, self.clock, self.config, self.throughput = store, clock, config, throughput
        self.placement, self.audits = placement, audits
        self.progress = threading.Condition()  # notified once row results are committed

    def _assign(self, db: sqlite3.Connection, worker_id: str, current: Optional[str] = None) -> Optional[ContextSpec]:
        """Place the worker and record it as fetching the context at once, so the next worker
        asking counts it among that context's workers before its first heartbeat says so."""
        spec = self.placement.place(db, worker_id, current)
        if spec is not None:
            db.execute("UPDATE workers SET context_id=?, context_state=?, assigned_context=? WHERE worker_id=?",
                       (spec.context_id, ContextState.FETCHING.value, spec.context_id, worker_id))
        return spec

    def contexts_with_work(self) -> dict[str, tuple[ContextSpec, int]]:
        """Every context with batches queued or leased, and how many are queued."""
        open_, states = in_list(OPEN_BATCH_STATES)
        with self.store.read() as db:
            rows = db.execute(f"SELECT c.context_id, c.spec, SUM(b.state=?) AS queued FROM batches b"
                              f" JOIN contexts c USING (context_id) WHERE b.state IN {open_}"
                              " GROUP BY c.context_id", (BatchState.QUEUED.value, *states)).fetchall()
        return {r["context_id"]: (ContextSpec.model_validate_json(r["spec"]), r["queued"]) for r in rows}

    def lease_batch(self, worker_id: str, req: LeaseRequest) -> LeaseResponse:
        """Lease up to ``max_batches`` of the worker's loaded context, or tell it what to load."""
        now = self.clock()
        with self.store.transaction() as db:
            w = live_worker(db, worker_id)
            if w["state"] == WorkerState.DRAINING.value or w["barred"]:
                return LeaseResponse()  # it asked to retire, or its host failed an audit: no new work
            if req.context_id is None or req.context_state != ContextState.READY:
                return LeaseResponse(assign_context=self._assign(db, worker_id))
            seq = w["lease_seq"] + 1
            # an audit copy goes only to a worker of another host than the one that answered first
            # (a tie-break: than either of the two that disagreed)
            queued = db.execute("SELECT b.batch_id, b.workload_id, b.audit_of, w.sampling FROM batches b"
                                " JOIN workloads w USING (workload_id) WHERE b.state=? AND b.context_id=?"
                                " AND (b.audit_of IS NULL OR NOT EXISTS (SELECT 1 FROM audits a"
                                " WHERE a.audit_batch=b.batch_id AND ? IN (a.original_host, a.excluded_host)))"
                                " ORDER BY b.batch_id LIMIT ?",
                                (BatchState.QUEUED.value, req.context_id, row_identity(w),
                                 req.max_batches)).fetchall()
            # a lease shows the worker alive as a heartbeat does: a busy worker heartbeats seldom
            # a worker leased a context's batches is assigned that context (its engine events count)
            db.execute("UPDATE workers SET lease_seq=?, last_heartbeat=?,"
                       " last_busy=CASE WHEN ? THEN ? ELSE last_busy END,"
                       " assigned_context=CASE WHEN ? THEN ? ELSE assigned_context END WHERE worker_id=?",
                       (seq, now, bool(queued), now, bool(queued), req.context_id, worker_id))
            if not queued:
                if w["inflight"] == 0 and req.max_batches > 0:
                    other = self._assign(db, worker_id, current=req.context_id)
                    if other is not None:
                        return LeaseResponse(assign_context=other, lease_seq=seq)
                return LeaseResponse(lease_seq=seq)
            marks, ids = in_list(b["batch_id"] for b in queued)
            db.execute(f"UPDATE batches SET state=?, worker_id=?, lease_seq=?, leased_at=? WHERE batch_id IN {marks}",
                       (BatchState.LEASED.value, worker_id, seq, now, *ids))
            rows: dict[int, list[RowTask]] = {i: [] for i in ids}
            for r in db.execute(f"SELECT batch_id, idx, row_id, prompt, request FROM rows"
                                f" WHERE batch_id IN {marks} AND state=? ORDER BY batch_id, idx",
                                (*ids, RowState.PENDING.value)):
                rows[r["batch_id"]].append(row_task(r))
            for b in queued:  # an audit copy: the audited batch's rows that have a text
                if b["audit_of"] is not None:
                    rows[b["batch_id"]] = [row_task(r) for r in db.execute(
                        "SELECT idx, row_id, prompt, request FROM rows WHERE batch_id=? AND state=?"
                        " AND error IS NULL ORDER BY idx", (b["audit_of"], RowState.DONE.value))]
        self.throughput.leased(worker_id, now)
        return LeaseResponse(lease_seq=seq, batches=[
            BatchLease(batch_id=b["batch_id"], workload_id=b["workload_id"], context_id=req.context_id,
                       sampling=sampling_of(b["sampling"]), rows=rows[b["batch_id"]]) for b in queued])

    def report(self, worker_id: str, *reports: BatchReport, leased_to: Optional[str] = None) -> ReportResponse:
        """Record row results (the first result for a row wins, later ones are dropped); requeue
        rows handed back; count library crashes against the rows that were in flight. Several
        batches' reports are one transaction: one commit however many batches they cover.
        ``leased_to``: the batches' lease holder when it is not the worker that ran them (the
        TaskVine executor leases, its vine_workers run; in-process only, never from HTTP)."""
        now = self.clock()
        accepted = results = 0
        with self.store.transaction() as db:
            self._check_leased(db, leased_to or worker_id, reports)
            for rep in reports:
                accepted += self._record(db, now, worker_id, rep)
                results += len(rep.results)
            db.execute("UPDATE workers SET rows_done=rows_done+?, last_busy=?, last_heartbeat=? WHERE worker_id=?",
                       (accepted, now, now, worker_id))
        self.throughput.rows(worker_id, accepted, now)
        self.store.after_commit(self._notify_progress)
        return ReportResponse(accepted=accepted, duplicates=results - accepted)

    def _check_leased(self, db: sqlite3.Connection, worker_id: str, reports: tuple[BatchReport, ...]) -> None:
        """Every report is for a batch leased to this worker (or one it held, now ended: a late
        duplicate); else the whole request is refused before anything is written."""
        marks, ids = in_list({rep.batch_id for rep in reports})
        owner = {r["batch_id"]: r["worker_id"] for r in db.execute(
            f"SELECT batch_id, worker_id FROM batches WHERE batch_id IN {marks}", ids)}
        for rep in reports:
            if rep.batch_id not in owner:
                raise UnknownBatch(rep.batch_id)
            if owner[rep.batch_id] != worker_id:
                raise Refused(ErrorCode.BATCH_NOT_LEASED, f"batch {rep.batch_id} is not leased to worker"
                              f" {worker_id}: its results are not taken", "batch_id")

    def _record(self, db: sqlite3.Connection, now: float, worker_id: str, rep: BatchReport) -> int:
        """One batch's report; how many of its results were the rows' first."""
        b = db.execute("SELECT batch_id, workload_id, worker_id, audit_of FROM batches WHERE batch_id=?",
                       (rep.batch_id,)).fetchone()
        if b["audit_of"] is not None:  # an auditor's answers are compared, never a row's result
            if b["worker_id"] == worker_id:
                self.audits.record_audit(db, now, worker_id, b, rep)
            return 0
        done, pending, rejected = RowState.DONE.value, RowState.PENDING.value, RowErrorCode.REJECTED.value
        counts = [0, 0]  # first results: texts, errors
        split = ([r for r in rep.results if not r.error], [r for r in rep.results if r.error])
        for failed, results in enumerate(split):
            if results:
                counts[failed] = db.executemany(
                    "UPDATE rows SET state=?, text=?, finish_reason=?, prompt_tokens=?,"
                    " completion_tokens=?, error=?, error_code=?, choices=?, worker_id=?, finished_at=?"
                    f" WHERE {ROW_OF_BATCH}",
                    [(done, r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens, r.error,
                      rejected if failed else None,
                      json.dumps([c.model_dump(mode="json") for c in r.choices]) if r.choices else None,
                      worker_id, now, b["workload_id"], r.idx, rep.batch_id, pending) for r in results]).rowcount
        accepted = counts[0] + counts[1]
        settled = bool(accepted) and settle_batch(db, rep.batch_id)
        if settled:  # before counting: completion waits for its audit
            self.audits.maybe_audit(db, now, rep.batch_id)
        state = count_done(db, now, b["workload_id"], accepted, counts[1])
        if rep.crashed:
            self._count_crashes(db, now, b, rep.crashed)  # may fail its last pending rows
        if not settled and (rep.crashed or not accepted):
            settled = settle_batch(db, rep.batch_id)
        if not settled and (rep.returned or rep.crashed) and b["worker_id"] == worker_id:
            requeue(db, "batch_id=?", (rep.batch_id,))
        if state != WorkloadState.RUNNING:  # (None: nothing counted, its state unread)
            settle_cancelling(db, now, b["workload_id"])
        return accepted

    def _count_crashes(self, db: sqlite3.Connection, now: float, b: sqlite3.Row, idx: list[int]) -> None:
        db.executemany(f"UPDATE rows SET crashes=crashes+1 WHERE {ROW_OF_BATCH}",
                       [(b["workload_id"], i, b["batch_id"], RowState.PENDING.value) for i in idx])
        poisoned = [r["idx"] for r in db.execute(
            "SELECT idx FROM rows WHERE batch_id=? AND state=? AND crashes>=?",
            (b["batch_id"], RowState.PENDING.value, self.config.poison_after))]
        if poisoned:
            fail_rows(db, now, b["batch_id"], b["workload_id"], RowErrorCode.FAILED,
                      f"poisoned: the library process died {self.config.poison_after} times while"
                      " running this row; not retried", poisoned)

    def _notify_progress(self) -> None:
        with self.progress:
            self.progress.notify_all()

    def wait_for_progress(self, timeout: float) -> None:
        """Block until some row result arrives (or ``timeout``): lets in-process callers await progress."""
        with self.progress:
            self.progress.wait(timeout)
