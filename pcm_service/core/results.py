"""Row results inside a service transaction: final results, requeues, the output file.

Every row ends with exactly one final result: the first one recorded wins (a row is only
updated while ``pending``), and the output is written once, atomically, in input order.
"""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Sequence

from pcm_service.protocol import BatchState, RowState, WorkloadState

DONE, PENDING = RowState.DONE.value, RowState.PENDING.value


def fail_rows(db: sqlite3.Connection, now: float, batch_id: int, wl_id: str, error: str,
              idx: list[int] | None = None) -> int:
    """End pending rows of a batch (all, or those in ``idx``) with ``error``; returns how many."""
    if idx is None:
        n = db.execute("UPDATE rows SET state=?, error=?, finished_at=? WHERE batch_id=? AND state=?",
                       (DONE, error, now, batch_id, PENDING)).rowcount
        db.execute("UPDATE batches SET state=? WHERE batch_id=?", (BatchState.DONE.value, batch_id))
    else:
        n = sum(db.execute("UPDATE rows SET state=?, error=?, finished_at=? WHERE batch_id=? AND idx=?"
                           " AND state=?", (DONE, error, now, batch_id, i, PENDING)).rowcount
                for i in idx)
    count_done(db, now, wl_id, n, n)
    return n


def count_done(db: sqlite3.Connection, now: float, wl_id: str, done: int, failed: int) -> None:
    if not done:
        return
    db.execute("UPDATE workloads SET rows_done=rows_done+?, rows_failed=rows_failed+?"
               " WHERE workload_id=?", (done, failed, wl_id))
    wl = db.execute("SELECT rows_done, rows_total, state FROM workloads WHERE workload_id=?",
                    (wl_id,)).fetchone()
    if wl["rows_done"] >= wl["rows_total"] and wl["state"] == WorkloadState.RUNNING.value:
        complete(db, now, wl_id)


def settle_batch(db: sqlite3.Connection, batch_id: int) -> bool:
    """Mark a batch done when none of its rows is pending; True if it was."""
    left = db.execute("SELECT COUNT(*) FROM rows WHERE batch_id=? AND state=?",
                      (batch_id, PENDING)).fetchone()[0]
    if left == 0:
        db.execute("UPDATE batches SET state=? WHERE batch_id=?", (BatchState.DONE.value, batch_id))
    return left == 0


def requeue(db: sqlite3.Connection, where: str, params: Sequence[Any], lost: int = 0) -> int:
    """Leased batches matching ``where`` go back to the queue: their worker left or was lost,
    forgot them, or handed their rows back. ``lost`` counts a worker loss against each."""
    return db.execute(f"UPDATE batches SET state=?, worker_id=NULL, losses=losses+? WHERE state=? AND {where}",
                      (BatchState.QUEUED.value, lost, BatchState.LEASED.value, *params)).rowcount


def complete(db: sqlite3.Connection, now: float, wl_id: str) -> None:
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
               (WorkloadState.COMPLETED.value, now, wl_id))
