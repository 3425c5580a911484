"""Workloads: submitted in one transaction, then watched until their output is written."""
from __future__ import annotations

import json
import sqlite3
import uuid
from typing import Iterable, Optional

from pcm_service.core.base import CoreBase, NoChatTemplate, UnknownWorkload
from pcm_service.core.views import worker_status, workload_status
from pcm_service.protocol import (
    LIVE_WORKER_STATES,
    ContextSpec,
    ContextState,
    OpenAIOutput,
    RowIn,
    SamplingSettings,
    ServiceStatus,
    SubmitResponse,
    WorkloadState,
    WorkloadStatus,
    WorkloadSubmission,
)
from pcm_service.store import MANAGER_KIND, RUNS_ROWS, in_list
from pcm_service.weights.modelpaths import has_chat_template, no_chat_template

INSERT_CHUNK = 1000  # rows per executemany: a million-row submission never sits in memory twice


def row_request(row: RowIn, default: SamplingSettings) -> Optional[str]:
    """What a row carries beyond its prompt (json), or None: its messages, and its sampling
    settings where they differ from the workload's."""
    extra: dict[str, object] = {}
    if row.messages is not None:
        extra["messages"] = [m.model_dump(mode="json", exclude_none=True) for m in row.messages]
    if row.sampling is not None and row.sampling != default:
        extra["sampling"] = row.sampling.model_dump(mode="json")
    return json.dumps(extra) if extra else None


class WorkloadOps(CoreBase):
    """Submit workloads and report how they and the pool stand."""

    def context_of(self, model: Optional[str], context: Optional[ContextSpec]) -> ContextSpec:
        """The context a submission names: a model directory, or a registered model's name.
        Raises UnknownModel or ModelUnavailable."""
        spec = self.named_model(model).context() if model is not None else context
        assert spec is not None
        spec = spec.model_copy(deep=True)
        spec.model_digest = self.replicas.register_model(spec.model).digest
        return spec

    def check_chat(self, context: ContextSpec, model: Optional[str]) -> None:
        if not has_chat_template(context.model):
            raise NoChatTemplate(no_chat_template(model or context.model))

    def submit(self, sub: WorkloadSubmission) -> SubmitResponse:
        """Raises ModelUnavailable, UnknownModel or NoChatTemplate; then nothing is stored."""
        context = self.context_of(sub.model, sub.context)
        if any(r.messages is not None for r in sub.rows):
            self.check_chat(context, sub.model)
        return self.insert_workload(sub.name, context, sub.model, sub.sampling, sub.batch_size,
                                    sub.output, sub.openai, sub.rows)

    def insert_workload(self, name: str, context: ContextSpec, model: Optional[str],
                        sampling: SamplingSettings, batch_size: int, output: str,
                        openai: Optional[OpenAIOutput], rows: Iterable[RowIn]) -> SubmitResponse:
        """Store a workload and its rows in one transaction, streaming ``rows`` in chunks."""
        ctx_id = context.context_id
        wl_id = "wl-" + uuid.uuid4().hex[:12]
        n_rows = n_batches = 0
        with self.store.transaction() as db:
            db.execute("INSERT OR IGNORE INTO contexts VALUES (?, ?)", (ctx_id, context.model_dump_json()))
            db.execute(
                "INSERT INTO workloads (workload_id, name, context_id, sampling, batch_size, output,"
                " rows_total, state, created_at, model_name, openai) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (wl_id, name, ctx_id, sampling.model_dump_json(), batch_size, output, 0,
                 WorkloadState.RUNNING.value, self.clock(), model,
                 openai.model_dump_json() if openai else None))
            chunk: list[tuple[object, ...]] = []
            batch_id = 0
            for row in rows:
                if n_rows % batch_size == 0:
                    batch_id = db.execute("INSERT INTO batches (workload_id, context_id) VALUES (?, ?)",
                                          (wl_id, ctx_id)).lastrowid or 0
                    n_batches += 1
                chunk.append((wl_id, n_rows, row.row_id, row.prompt or "", batch_id, row_request(row, sampling)))
                n_rows += 1
                if len(chunk) >= INSERT_CHUNK:
                    self._insert_rows(db, chunk)
            self._insert_rows(db, chunk)
            if n_rows == 0:
                raise ValueError("a workload needs at least one row")
            db.execute("UPDATE workloads SET rows_total=? WHERE workload_id=?", (n_rows, wl_id))
        return SubmitResponse(workload_id=wl_id, context_id=ctx_id, rows=n_rows, batches=n_batches)

    @staticmethod
    def _insert_rows(db: sqlite3.Connection, chunk: list[tuple[object, ...]]) -> None:
        db.executemany(
            "INSERT INTO rows (workload_id, idx, row_id, prompt, batch_id, request) VALUES (?,?,?,?,?,?)", chunk)
        chunk.clear()

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
        where, params = (f"WHERE {RUNS_ROWS}", [MANAGER_KIND]) if include_gone else (
            f"WHERE {RUNS_ROWS} AND state IN {live}", [MANAGER_KIND, *states])
        with self.store.read() as db:
            workers = db.execute(f"SELECT * FROM workers {where} ORDER BY registered_at", params).fetchall()
            workloads = db.execute("SELECT * FROM workloads ORDER BY created_at").fetchall()
        fetching = ContextState.FETCHING.value
        return ServiceStatus(
            workers=[worker_status(w, starts.get(w["worker_id"], 0), now,
                                   self.replicas.progress(w["worker_id"])
                                   if w["context_state"] == fetching else None) for w in workers],
            workloads=[workload_status(r, now) for r in workloads],
            demand=self.demand(), glideins=self.factories.glideins(now),
            transfers=self.replicas.stats())
