"""Status records built from SQLite rows: what `pcm status` and the API report."""
from __future__ import annotations

import sqlite3
from typing import Optional

from pcm_service.core.demand import WorkLeft
from pcm_service.protocol import (
    OPEN_BATCH_STATES,
    READY_WORKER_STATES,
    ContextState,
    FetchProgress,
    Resources,
    WorkerKind,
    WorkerState,
    WorkerStatus,
    WorkloadState,
    WorkloadStatus,
)
from pcm_service.store import MANAGER_KIND, RUNS_ROWS, in_list


def workload_status(r: sqlite3.Row, now: float) -> WorkloadStatus:
    elapsed = (r["finished_at"] or now) - r["created_at"]
    return WorkloadStatus(
        workload_id=r["workload_id"], name=r["name"], state=WorkloadState(r["state"]),
        context_id=r["context_id"], model=r["model_name"], rows_total=r["rows_total"], rows_done=r["rows_done"],
        rows_failed=r["rows_failed"], rows_per_second=r["rows_done"] / elapsed if elapsed > 0 else 0.0,
        output=r["output"], created_at=r["created_at"], finished_at=r["finished_at"])


def worker_status(w: sqlite3.Row, starts: int, now: float, fetch: Optional[FetchProgress]) -> WorkerStatus:
    return WorkerStatus(
        worker_id=w["worker_id"], host=w["host"], glidein_id=w["glidein_id"],
        gpus=Resources.model_validate_json(w["resources"]).gpus,
        state=WorkerState(w["state"]), context_id=w["context_id"],
        context_state=ContextState(w["context_state"]), inflight_batches=w["inflight"],
        rows_done=w["rows_done"], library_starts=starts,
        idle_seconds=0.0 if w["inflight"] else now - w["last_busy"],
        last_heartbeat_age=now - w["last_heartbeat"], fetch=fetch,
        kind=WorkerKind(w["kind"] or WorkerKind.AGENT.value))


def demand_inputs(db: sqlite3.Connection, last: int = 8) -> tuple[WorkLeft, int, Optional[float]]:
    """Work left, ready workers, and the mean seconds from registration to a loaded engine over
    the last workers that got there (None before any did)."""
    rows = db.execute("SELECT COALESCE(SUM(rows_total - rows_done), 0) FROM workloads WHERE state=?",
                      (WorkloadState.RUNNING.value,)).fetchone()[0]
    waiting, waiting_states = in_list(OPEN_BATCH_STATES)
    batches = db.execute(f"SELECT COUNT(*) FROM batches WHERE state IN {waiting}", waiting_states).fetchone()[0]
    marks, states = in_list(READY_WORKER_STATES)
    ready = db.execute(f"SELECT COUNT(*) FROM workers WHERE state IN {marks} AND {RUNS_ROWS}",
                       (*states, MANAGER_KIND)).fetchone()[0]
    return WorkLeft(rows=rows, batches=batches), ready, time_to_ready(db, last)


def time_to_ready(db: sqlite3.Connection, last: int = 8) -> Optional[float]:
    """Mean seconds from a worker's registration to its first loaded engine (fetch + load),
    over the last ``last`` workers that got there (None before any did)."""
    spans = db.execute("SELECT MIN(e.at) - w.registered_at AS t FROM library_events e"
                       " JOIN workers w USING (worker_id) WHERE e.state=? GROUP BY e.worker_id"
                       " ORDER BY MIN(e.at) DESC LIMIT ?", (ContextState.READY.value, last)).fetchall()
    return sum(max(0.0, r["t"]) for r in spans) / len(spans) if spans else None


def load_time(db: sqlite3.Connection, last: int = 8) -> Optional[float]:
    """Mean seconds an engine took to load its cached weights, over the last ``last`` starts."""
    r = db.execute("SELECT AVG(seconds) FROM (SELECT seconds FROM library_events WHERE state=?"
                   " ORDER BY event_id DESC LIMIT ?)", (ContextState.READY.value, last)).fetchone()
    return r[0]
