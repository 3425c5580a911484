"""Workloads: submitted in one transaction, then watched until their output is written."""
from __future__ import annotations

import math
import uuid

from pcm_service.core.base import CoreBase, UnknownWorkload
from pcm_service.core.views import worker_status, workload_status
from pcm_service.protocol import (
    LIVE_WORKER_STATES,
    ContextState,
    ServiceStatus,
    SubmitResponse,
    WorkloadState,
    WorkloadStatus,
    WorkloadSubmission,
)
from pcm_service.store import in_list


class WorkloadOps(CoreBase):
    """Submit workloads and report how they and the pool stand."""

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
