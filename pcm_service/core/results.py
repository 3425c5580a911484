"""Row results inside a service transaction: final results, requeues, the output files (plain
functions of the open transaction, shared by the parts of the core that end rows or batches).

Every row ends with exactly one final result: the first one recorded wins (a row is only
updated while ``pending``), and the output is written once, atomically, in input order:
PCM's own lines, or OpenAI Batch output and error lines for an OpenAI-format workload.
"""
from __future__ import annotations

import json
import os
import sqlite3
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Sequence

from pcm_service.batchapi.outputs import error_line, output_line
from pcm_service.protocol import (
    LIVE_WORKER_STATES,
    OPEN_BATCH_STATES,
    BatchState,
    Choice,
    Heartbeat,
    OpenAIOutput,
    RowErrorCode,
    RowState,
    WorkloadState,
)
from pcm_service.store import MANAGER_KIND, RUNS_ROWS, in_list

DONE, PENDING = RowState.DONE.value, RowState.PENDING.value
# one row of a batch, found by its primary key (workload_id, idx): by (batch_id, idx) SQLite walks
# the batch's index entries for every row, a report of n rows costing n² steps
ROW_OF_BATCH = "workload_id=? AND idx=? AND batch_id=? AND state=?"


def fail_rows(db: sqlite3.Connection, now: float, batch_id: int, wl_id: str, code: RowErrorCode, error: str,
              idx: list[int] | None = None) -> int:
    """End pending rows of a batch (all, or those in ``idx``) with ``error``; returns how many."""
    if idx is None:
        n = db.execute("UPDATE rows SET state=?, error=?, error_code=?, finished_at=? WHERE batch_id=? AND state=?",
                       (DONE, error, code.value, now, batch_id, PENDING)).rowcount
        db.execute("UPDATE batches SET state=? WHERE batch_id=?", (BatchState.DONE.value, batch_id))
    else:
        n = db.executemany(f"UPDATE rows SET state=?, error=?, error_code=?, finished_at=? WHERE {ROW_OF_BATCH}",
                           [(DONE, error, code.value, now, wl_id, i, batch_id, PENDING) for i in idx]).rowcount
    count_done(db, now, wl_id, n, n)
    return n


def count_done(db: sqlite3.Connection, now: float, wl_id: str, done: int, failed: int) -> Optional[WorkloadState]:
    """Count finished rows; the workload's state before (None: nothing counted). The last row
    of a running workload completes it."""
    if not done:
        return None
    wl = db.execute("UPDATE workloads SET rows_done=rows_done+?, rows_failed=rows_failed+?"
                    " WHERE workload_id=? RETURNING rows_done, rows_total, state", (done, failed, wl_id)).fetchone()
    if wl["rows_done"] >= wl["rows_total"] and wl["state"] == WorkloadState.RUNNING.value:
        maybe_complete(db, now, wl_id)
    return WorkloadState(wl["state"])


def row_identity(w: sqlite3.Row) -> str:
    """A worker's host for audits (core/audit.py): its address, else its declared name."""
    return str(w["address"] or w["host"])


def maybe_complete(db: sqlite3.Connection, now: float, wl_id: str) -> bool:
    """Complete a running workload whose rows are all done and whose audits are (core/audit.py):
    a queued audit that no live, unbarred worker of another host could run is dropped."""
    wl = db.execute("SELECT rows_done, rows_total, state FROM workloads WHERE workload_id=?", (wl_id,)).fetchone()
    if wl["rows_done"] < wl["rows_total"] or wl["state"] != WorkloadState.RUNNING.value:
        return False
    open_, states = in_list(OPEN_BATCH_STATES)
    live, live_states = in_list(LIVE_WORKER_STATES)
    audits = db.execute(f"SELECT b.batch_id, b.state, a.original_host, a.excluded_host FROM batches b JOIN audits a"
                        f" ON a.audit_batch=b.batch_id WHERE b.workload_id=? AND b.state IN {open_}",
                        (wl_id, *states)).fetchall()
    waiting = False
    for a in audits:
        auditor = a["state"] == BatchState.LEASED.value or db.execute(
            f"SELECT 1 FROM workers WHERE state IN {live} AND {RUNS_ROWS} AND COALESCE(address, host) NOT IN (?, ?)"
            " AND COALESCE(address, host) NOT IN (SELECT host FROM barred_hosts) LIMIT 1",
            (*live_states, MANAGER_KIND, a["original_host"], a["excluded_host"] or a["original_host"])
        ).fetchone() is not None
        if auditor:
            waiting = True
        else:
            db.execute("UPDATE batches SET state=? WHERE batch_id=?", (BatchState.CANCELLED.value, a["batch_id"]))
    if waiting:
        return False
    complete(db, now, wl_id)
    return True


def settle_batch(db: sqlite3.Connection, batch_id: int) -> bool:
    """Mark a batch done when none of its rows is pending; True if it was."""
    left = db.execute("SELECT COUNT(*) FROM rows WHERE batch_id=? AND state=?",
                      (batch_id, PENDING)).fetchone()[0]
    if left == 0:
        db.execute("UPDATE batches SET state=? WHERE batch_id=?", (BatchState.DONE.value, batch_id))
    return left == 0


def requeue(db: sqlite3.Connection, where: str, params: Sequence[Any], lost: int = 0) -> int:
    """Leased batches matching ``where`` go back to the queue: their worker left or was lost,
    forgot them, or handed their rows back. ``lost`` counts a worker loss against each.
    A batch of a cancelled workload is not queued again: it is cancelled."""
    return db.execute(
        "UPDATE batches SET state=CASE WHEN workload_id IN (SELECT workload_id FROM workloads WHERE state=?)"
        f" THEN ? ELSE ? END, worker_id=NULL, losses=losses+? WHERE state=? AND {where}",
        (WorkloadState.CANCELLING.value, BatchState.CANCELLED.value, BatchState.QUEUED.value, lost,
         BatchState.LEASED.value, *params)).rowcount


def reconcile(db: sqlite3.Connection, worker_id: str, hb: Heartbeat) -> None:
    """Requeue batches leased to this worker in a response it has seen but that it no longer
    holds (a report lost for good, a lease answered just before a service crash)."""
    held, ids = in_list(hb.batches)
    requeue(db, f"worker_id=? AND lease_seq<=? AND batch_id NOT IN {held}", (worker_id, hb.lease_seq, *ids))


def settle_cancelling(db: sqlite3.Connection, now: float, wl_id: Optional[str] = None) -> None:
    """Cancelling workloads (all, or ``wl_id``) with no batch in flight any more end cancelled."""
    for r in db.execute("SELECT workload_id FROM workloads w WHERE state=? AND (?2 IS NULL OR workload_id=?2)"
                        " AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.workload_id=w.workload_id"
                        " AND b.state=?3)",
                        (WorkloadState.CANCELLING.value, wl_id, BatchState.LEASED.value)).fetchall():
        end_workload(db, now, r["workload_id"], WorkloadState.CANCELLED, RowErrorCode.CANCELLED)


def end_workload(db: sqlite3.Connection, now: float, wl_id: str, state: WorkloadState, code: RowErrorCode) -> None:
    """Cancel or expire: every row still pending ends with ``code``, then the output is written."""
    message = {RowErrorCode.EXPIRED: "the completion window expired first",
               RowErrorCode.CANCELLED: "the batch was cancelled first"}[code]
    n = db.execute("UPDATE rows SET state=?, error=?, error_code=?, finished_at=? WHERE workload_id=? AND state=?",
                   (DONE, message, code.value, now, wl_id, PENDING)).rowcount
    db.execute("UPDATE workloads SET rows_done=rows_done+?, rows_failed=rows_failed+? WHERE workload_id=?",
               (n, n, wl_id))
    open_, states = in_list(OPEN_BATCH_STATES)
    db.execute(f"UPDATE batches SET state=? WHERE workload_id=? AND state IN {open_}",
               (BatchState.CANCELLED.value, wl_id, *states))
    complete(db, now, wl_id, state)


@contextmanager
def _atomic(path: Path) -> Iterator[IO[str]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _choices(r: sqlite3.Row) -> list[Choice]:
    if r["choices"]:
        return [Choice.model_validate(c, strict=False) for c in json.loads(r["choices"])]
    return [Choice(text=r["text"] or "", finish_reason=r["finish_reason"],
                   completion_tokens=r["completion_tokens"] or 0)]


def _register_file(db: sqlite3.Connection, now: float, path: Path) -> str:
    file_id = "file-" + uuid.uuid4().hex[:24]
    db.execute("INSERT INTO files (file_id, filename, purpose, bytes, path, created_at) VALUES (?,?,?,?,?,?)",
               (file_id, path.name, "batch_output", path.stat().st_size, str(path), now))
    return file_id


def _write_openai(db: sqlite3.Connection, now: float, wl: sqlite3.Row, spec: OpenAIOutput) -> None:
    created = int(now)
    model = spec.model or wl["model_name"] or ""
    oks = errs = 0
    with _atomic(Path(wl["output"])) as out, _atomic(Path(spec.error_output)) as err:
        for r in db.execute("SELECT * FROM rows WHERE workload_id=? ORDER BY idx", (wl["workload_id"],)):
            if r["error"] is None:
                line = output_line(wl["workload_id"], r["row_id"], spec.endpoint, model, created,
                                   _choices(r), r["prompt_tokens"] or 0)
                out.write(json.dumps(line) + "\n")
                oks += 1
            else:
                code = RowErrorCode(r["error_code"]) if r["error_code"] else None
                err.write(json.dumps(error_line(wl["workload_id"], r["row_id"], code, r["error"])) + "\n")
                errs += 1
    if spec.batch_id is not None:  # the results become Files of the OpenAI batch
        out_id = _register_file(db, now, Path(wl["output"])) if oks else None
        err_id = _register_file(db, now, Path(spec.error_output)) if errs else None
        db.execute("UPDATE openai_batches SET output_file_id=?, error_file_id=? WHERE batch_id=?",
                   (out_id, err_id, spec.batch_id))


def _write_pcm(db: sqlite3.Connection, wl: sqlite3.Row) -> None:
    with _atomic(Path(wl["output"])) as fh:
        for r in db.execute("SELECT * FROM rows WHERE workload_id=? ORDER BY idx", (wl["workload_id"],)):
            line: dict[str, Optional[object]] = {
                "id": r["row_id"], "text": r["text"], "finish_reason": r["finish_reason"],
                "prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                "worker_id": r["worker_id"], "error": r["error"]}
            if r["choices"]:
                line["choices"] = json.loads(r["choices"])
            fh.write(json.dumps(line) + "\n")


def complete(db: sqlite3.Connection, now: float, wl_id: str,
             state: WorkloadState = WorkloadState.COMPLETED) -> None:
    """Write the output (atomically, in input order), then give the workload its final state."""
    wl = db.execute("SELECT * FROM workloads WHERE workload_id=?", (wl_id,)).fetchone()
    if wl["openai"]:
        _write_openai(db, now, wl, OpenAIOutput.model_validate_json(wl["openai"]))
    else:
        _write_pcm(db, wl)
    db.execute("UPDATE workloads SET state=?, finished_at=? WHERE workload_id=?", (state.value, now, wl_id))
